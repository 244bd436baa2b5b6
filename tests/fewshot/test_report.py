"""run_fewshot end to end with the Ray extractor replaced by the same computation in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _fewshot_helpers import blob_chips, blob_dataset, write_labelled
from sarjepa_dist.config import config_from_dict
from sarjepa_dist.fewshot import extract
from sarjepa_dist.fewshot.extract import extract_local
from sarjepa_dist.fewshot.report import render_markdown
from sarjepa_dist.fewshot.runner import quick_score, run_fewshot
from sarjepa_dist.fewshot.splits import SplitError

TINY = {"data": {"img_size": 16}, "gradient": {"radii": [2, 4]},
        "model": {"encoder": "vit_tiny", "patch_size": 4, "depth": 2}}


@pytest.fixture
def local_extract(monkeypatch):
    calls = []

    def fake(sources, datasets, **kwargs):
        calls.append(sorted(s.name for s in sources))
        return {s.name: {d: extract_local(s, r) for d, r in datasets.items()} for s in sources}

    monkeypatch.setattr(extract, "extract_features", fake)
    return calls


def cfg_for(tmp_path, **fewshot):
    tree = {**TINY, "fewshot": {"encoders": ["raw-pixels", "gradient-maps"], "shots": [1, 3], "seeds": 3,
                                "linear_epochs": 20, "out": str(tmp_path / "report"), **fewshot}}
    return config_from_dict(tree)


def test_report_files_hold_the_tables(tmp_path, local_extract):
    root = blob_dataset(str(tmp_path / "blobs"), per_class=10)
    res = run_fewshot(cfg_for(tmp_path, data=root))
    out = Path(res.out)
    assert {p.name for p in out.iterdir()} >= {"results.json", "report.md", "fewshot.png", "features"}
    md = (out / "report.md").read_text()
    assert "| encoder | K=1 | K=3 |" in md
    assert "## Accuracy (%): linear probe" in md and "nearest class prototype" in md
    assert "| raw-pixels |" in md and "| gradient-maps |" in md
    assert "t(0.975, 2)" in md and "stratified" in md
    results = json.loads((out / "results.json").read_text())
    assert results["split"]["kind"] == "stratified" and results["split"]["test_fraction"] == 0.3
    assert len(results["runs"]) == 2 * 3 * 2 * 3
    run = results["runs"][0]
    assert len(run["confusion"]) == 3 and len(run["per_class_accuracy"]) == 3
    assert {"config", "feature_domain", "encoders", "summary", "class_names"} <= set(results)
    enc = results["encoders"][0]
    assert {"lineage", "domain", "domain_description", "feature_dim", "extraction"} <= set(enc)
    assert (out / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # blobs are trivially separable: the hand-made features get them all
    assert res.interval("raw-pixels", "prototype", 3).mean == 1.0
    assert render_markdown(results) == md
    # the split never leaks: pool and test rows are disjoint and cover the dataset
    assert results["split"]["pool_size"] + results["split"]["test_size"] == 30


T_975_DF2 = 4.302652729911275  # Student's t, 0.975 quantile, 2 degrees of freedom (tables)


def _accuracy_cells(md: str, title: str) -> dict[str, list[str]]:
    """The table under ``## Accuracy (%): <title>``: encoder -> its cells, as printed."""
    lines = md.split(f"## Accuracy (%): {title}\n\n", 1)[1].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_report_tables_match_figures_computed_from_the_confusion_matrices(tmp_path, local_extract):
    """Every cell of every accuracy table against an independent computation: each run's accuracy
    from its confusion matrix, the mean and t-interval over the 3 seeds by hand (t from tables)."""
    labels = np.repeat(np.arange(3), 10)
    chips = blob_chips(labels, noise=3.0, seed=4)  # noisy: the accuracies are not all 100 %
    root = write_labelled(str(tmp_path / "noisy"), chips, labels, ["A", "B", "C"])
    res = run_fewshot(cfg_for(tmp_path, data=root, methods=["linear", "knn", "prototype"]))
    md = Path(res.report_uri).read_text()
    runs = res.results["runs"]
    assert len(runs) == 2 * 3 * 2 * 3
    by_cell: dict[tuple[str, str, int], list[float]] = {}
    for run in runs:
        cm = np.array(run["confusion"])
        assert cm.sum() == run["test_size"] == res.results["split"]["test_size"]
        assert run["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        by_cell.setdefault((run["encoder"], run["method"], run["shots"]), []).append(np.trace(cm) / cm.sum())
    assert any(np.mean(v) < 1.0 for v in by_cell.values()), "a trivial task cannot tell wrong figures apart"
    for method, title in (("linear", "linear probe"), ("knn", "k-nearest neighbours (cosine)"),
                          ("prototype", "nearest class prototype (cosine)")):
        table = _accuracy_cells(md, title)
        assert set(table) == {"raw-pixels", "gradient-maps"}
        for j, k in enumerate((1, 3)):
            means = {}
            for encoder, cells in table.items():
                acc = by_cell[(encoder, method, k)]
                assert len(acc) == 3
                mean, half = np.mean(acc), T_975_DF2 * np.std(acc, ddof=1) / np.sqrt(3)
                printed_mean, printed_half = (float(v) for v in cells[j].strip("*").split(" ± "))
                assert abs(printed_mean - 100 * mean) <= 0.05 + 1e-9, (method, k, encoder, cells[j], mean)
                assert abs(printed_half - 100 * half) <= 0.05 + 1e-9, (method, k, encoder, cells[j], half)
                means[encoder] = mean
            bold = {e for e, cells in table.items() if cells[j].startswith("**")}
            assert bold == {e for e, m in means.items() if m >= max(means.values()) - 1e-12}, (method, k, table)


def test_one_seed_says_the_interval_is_undefined(tmp_path, local_extract):
    root = blob_dataset(str(tmp_path / "blobs"), per_class=6)
    res = run_fewshot(cfg_for(tmp_path, data=root, seeds=1, methods=["knn"]))
    md = Path(res.report_uri).read_text()
    assert "interval is undefined" in md and "(no CI)" in md
    assert res.interval("raw-pixels", "knn", 1).half_width is None


def test_k_larger_than_the_pool_fails_before_any_feature_work(tmp_path, local_extract):
    labels = np.array([0] * 10 + [1] * 10 + [2] * 4)
    root = write_labelled(str(tmp_path / "uneven"), blob_chips(labels), labels, ["A", "B", "C"],
                          depression=[17.0] * 24)
    with pytest.raises(SplitError, match="class 'C' has only 2"):
        run_fewshot(cfg_for(tmp_path, data=root, shots=[1, 3], test_fraction=0.5))
    assert local_extract == []


def test_column_split_and_two_datasets(tmp_path, local_extract):
    root = blob_dataset(str(tmp_path / "blobs"), per_class=8)
    res = run_fewshot(cfg_for(tmp_path, data=root, split_column="depression_deg", train_values=[17],
                              test_values=[15]))
    split = res.results["split"]
    assert split["kind"] == "column" and split["pool_size"] == 12 and split["test_size"] == 12

    labels = np.tile([1, 0, 2], 4)
    test_root = write_labelled(str(tmp_path / "test"), blob_chips(labels, seed=9), labels, ["A", "B", "C"],
                               prefix="t")
    res2 = run_fewshot(cfg_for(tmp_path, data=root, test_data=test_root, out=str(tmp_path / "r2")))
    split2 = res2.results["split"]
    assert split2["kind"] == "datasets" and split2["pool_size"] == 24 and split2["test_size"] == 12
    assert split2["pool_dataset_id"] != split2["test_dataset_id"]
    assert res2.interval("raw-pixels", "linear", 3).mean == 1.0
    # one extraction pass per run covers both datasets
    assert local_extract[-1] == ["gradient-maps", "raw-pixels"]
    files = sorted(p.name for p in (tmp_path / "r2" / "features").iterdir())
    assert len(files) == 4 and all(f.count("__") == 2 for f in files)


def test_quick_score_uses_the_largest_k_that_fits(tmp_path, local_extract):
    root = blob_dataset(str(tmp_path / "blobs"), per_class=8)
    cfg = cfg_for(tmp_path, data=root, shots=[1, 2, 5, 40], methods=["prototype", "linear"])
    score = quick_score("random-init", cfg)
    assert score["shots"] == 5 and score["method"] == "prototype" and 0.0 <= score["accuracy"] <= 1.0
    assert not (tmp_path / "report").exists()  # writes nothing


def test_cache_is_keyed_by_domain_and_reused_across_runs(tmp_path, local_extract):
    root = blob_dataset(str(tmp_path / "blobs"), per_class=6)
    encoders = ["random-init", "raw-pixels"]
    run_fewshot(cfg_for(tmp_path, data=root, encoders=encoders, methods=["knn"], seeds=2))
    assert local_extract == [["random-init", "raw-pixels"]]
    run_fewshot(cfg_for(tmp_path, data=root, encoders=encoders, methods=["prototype"], seeds=3, shots=[2]))
    assert len(local_extract) == 1  # another protocol on the same features: nothing recomputed
    res = run_fewshot(cfg_for(tmp_path, data=root, encoders=encoders, methods=["knn"], seeds=2,
                              feature_domain="target"))
    assert local_extract[-1] == ["random-init"]  # the encoder's target domain is new; the baseline is not
    enc = {e["name"]: e for e in res.results["encoders"]}
    assert enc["random-init"]["domain"] == "target" and enc["random-init"]["input"] == "gx"
    assert "target domain" in Path(res.report_uri).read_text()
    assert len(list((tmp_path / "report" / "features").glob("*.npz"))) == 3


def test_undecodable_chips_are_dropped_and_counted(tmp_path, local_extract):
    labels = np.repeat(np.arange(3), 6)
    chips = blob_chips(labels)
    chips[4, 0, 0, 0] = np.nan  # check_chip refuses it when the features are computed
    root = write_labelled(str(tmp_path / "bad"), chips, labels, ["A", "B", "C"])
    res = run_fewshot(cfg_for(tmp_path, data=root, methods=["prototype"], seeds=2))
    split = res.results["split"]
    assert split["dropped_bad_chips"] == 1 and split["pool_size"] + split["test_size"] == 17
    assert "dropped 1 undecodable" in Path(res.report_uri).read_text()


def test_paired_differences_against_the_baselines(tmp_path, local_extract):
    from sarjepa_dist.fewshot.protocol import RunResult, paired_differences

    runs = [RunResult("enc", "knn", 5, s, a, [], [], 10, 10) for s, a in enumerate([0.8, 0.9, 0.7])]
    runs += [RunResult("raw-pixels", "knn", 5, s, a, [], [], 10, 10) for s, a in enumerate([0.6, 0.8, 0.4])]
    (row,) = paired_differences(runs, "enc", "raw-pixels")
    # differences 0.2, 0.1, 0.3 → mean 0.2, sd 0.1, half width 4.3027·0.1/√3
    assert row["mean"] == pytest.approx(0.2) and row["half_width"] == pytest.approx(0.2484, abs=1e-4)

    root = blob_dataset(str(tmp_path / "blobs"), per_class=6)
    ckpt = _tiny_checkpoint(tmp_path / "ckpt" / "checkpoint_000001")
    res = run_fewshot(cfg_for(tmp_path, data=root, encoders=[ckpt, "random-init", "raw-pixels"], methods=["knn"]))
    md = Path(res.report_uri).read_text()
    assert "## Paired differences vs the references" in md and "| knn | random-init − raw-pixels |" in md
    trained = next(e["name"] for e in res.results["encoders"] if e["name"] not in ("random-init", "raw-pixels"))
    # a pretrained encoder is compared with both references; the references are never the encoder side
    # of a pair with themselves, and a baseline is never compared with anything
    assert {(r["encoder"], r["reference"]) for r in res.results["paired"]} == {
        ("random-init", "raw-pixels"), (trained, "random-init"), (trained, "raw-pixels")}
    assert f"| knn | {trained} − random-init |" in md


def _tiny_checkpoint(dest: Path) -> str:
    import torch

    from sarjepa_dist.model.io import save_checkpoint_dir
    from sarjepa_dist.model.jepa import SarJEPA

    cfg = config_from_dict(TINY)
    torch.manual_seed(1)
    model = SarJEPA(cfg.model, cfg.data.img_size, cfg.data.channels, num_grad_scales=len(cfg.gradient.radii))
    save_checkpoint_dir(dest, model, None, {"step": 1}, cfg.to_dict(), {"run_name": "tiny", "step": 1})
    return str(dest)
