import numpy as np
import pytest

from sarjepa_dist.fewshot.protocol import EncoderFeatures, run_protocol
from sarjepa_dist.fewshot.splits import (LabelledSet, SplitError, check_shots, load_labelled_set, make_split,
                                         stratified_split, support_indices)

from _fewshot_helpers import blob_chips, write_labelled


def labelled(labels, depression=None, ids_prefix="c", names=None, dataset_id="d0"):
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    names = names or [f"class{i}" for i in range(int(labels.max()) + 1)]
    dep = np.asarray(depression if depression is not None else np.full(n, np.nan), dtype=np.float64)
    return LabelledSet(root=f"mem://{dataset_id}", dataset_id=dataset_id,
                       chip_ids=np.array([f"{ids_prefix}{i}" for i in range(n)]), labels=labels,
                       class_names=names, columns={"label": labels, "depression_deg": dep,
                                                   "sensor": np.array(["s"] * n, dtype=object)})


def test_stratified_split_never_leaks_and_keeps_proportions():
    counts = [50, 30, 20]
    labels = np.concatenate([np.full(c, i) for i, c in enumerate(counts)])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    ds = labelled(labels)
    split = stratified_split(ds, 0.3, seed=5)
    assert not set(split.pool) & set(split.test)
    assert len(split.pool) + len(split.test) == len(labels)
    test_counts = np.bincount(labels[split.test], minlength=3)
    assert test_counts.tolist() == [15, 9, 6]  # round(0.3 * n_c) of every class
    again = stratified_split(ds, 0.3, seed=5)
    assert (again.test == split.test).all()  # seeded
    other = stratified_split(ds, 0.3, seed=6)
    assert not np.array_equal(other.test, split.test)
    assert split.kind == "stratified" and "0.3" in split.description


def test_split_by_metadata_column():
    labels = np.tile([0, 1, 2], 10)
    dep = np.where(np.arange(30) < 18, 17.0, 15.0).astype(np.float32)  # float32 like the shards
    ds = labelled(labels, dep)
    split = make_split(ds, None, split_column="depression_deg", train_values=[17], test_values=[15.0],
                       test_fraction=0.3, seed=0)
    assert split.kind == "column"
    assert (dep[split.pool] == 17).all() and (dep[split.test] == 15).all()
    assert len(split.pool) == 18 and len(split.test) == 12
    d = split.to_dict(ds, ds, ds.class_names)
    assert d["column"] == "depression_deg" and d["pool_size"] == 18 and d["test_per_class"]["class0"] == 4


def test_column_split_errors_name_the_problem():
    ds = labelled(np.tile([0, 1], 5), np.full(10, 17.0))
    with pytest.raises(SplitError, match="values present: 17"):
        make_split(ds, None, split_column="depression_deg", train_values=[17], test_values=[15],
                   test_fraction=0.3, seed=0)
    with pytest.raises(SplitError, match="not a column"):
        make_split(ds, None, split_column="elevation", train_values=[1], test_values=[2],
                   test_fraction=0.3, seed=0)
    with pytest.raises(SplitError, match="share"):
        make_split(ds, None, split_column="depression_deg", train_values=[17], test_values=[17.0],
                   test_fraction=0.3, seed=0)


def test_two_datasets_harmonise_class_order_and_refuse_the_same_dataset():
    pool = labelled([0, 1, 0, 1], names=["A", "B"], dataset_id="p")
    test = labelled([0, 1, 1], names=["B", "A"], dataset_id="t", ids_prefix="t")
    split = make_split(pool, test, split_column=None, train_values=[], test_values=[], test_fraction=0.3, seed=0)
    assert split.kind == "datasets"
    assert test.class_names == ["A", "B"] and test.labels.tolist() == [1, 0, 0]
    with pytest.raises(SplitError, match="same dataset"):
        make_split(pool, labelled([0, 1], names=["A", "B"], dataset_id="p"), split_column=None,
                   train_values=[], test_values=[], test_fraction=0.3, seed=0)


def test_k_larger_than_a_class_pool_names_the_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(SplitError, match=r"K = 5 .*class 'tank' has only 3"):
        check_shots(labels, [1, 5], ["car", "tank", "truck"])
    check_shots(labels, [1, 3], ["car", "tank", "truck"])


def test_support_sets_are_seeded_and_independent_of_the_encoder():
    labels = np.repeat(np.arange(4), 12)
    a = support_indices(labels, 5, seed=2, base_seed=0)
    b = support_indices(labels, 5, seed=2, base_seed=0)
    c = support_indices(labels, 5, seed=3, base_seed=0)
    assert (a == b).all() and not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [5, 5, 5, 5] and len(set(a)) == 20
    # the protocol scores every encoder on the same support rows: identical features → identical runs
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 8)).astype(np.float32)
    feats = {"one": EncoderFeatures(x, x[:10]), "two": EncoderFeatures(x.copy(), x[:10].copy())}
    runs = run_protocol(feats, labels, labels[:10], ["a", "b", "c", "d"], shots=[2, 5], seeds=3,
                        methods=["knn", "linear"], linear_epochs=5)
    assert len(runs) == 2 * 3 * 2 * 2
    by = {(r.encoder, r.method, r.shots, r.seed): r.accuracy for r in runs}
    for (enc, m, k, s), acc in by.items():
        assert by[("two", m, k, s)] == acc


def test_load_labelled_set_reads_labels_and_metadata(tmp_path):
    labels = np.array([0, 1, 1, 0])
    root = write_labelled(str(tmp_path / "ds"), blob_chips(labels, size=8), labels, ["x", "y"],
                          depression=[17, 15, 17, 15])
    ds = load_labelled_set(root)
    assert ds.labels.tolist() == [0, 1, 1, 0] and ds.class_names == ["x", "y"]
    assert ds.columns["depression_deg"].tolist() == [17.0, 15.0, 17.0, 15.0]
    assert ds.chip_ids.tolist() == ["chip-00000", "chip-00001", "chip-00002", "chip-00003"]
    assert len(ds.dataset_id) == 64
