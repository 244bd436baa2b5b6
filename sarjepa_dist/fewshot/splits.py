"""Train pool / test set splits and K-shot support sampling (numpy only, no chips, no Ray).

Three ways to split, chosen by the config (``FewshotConfig``):

- ``column``: a metadata column separates them, e.g. ``depression_deg`` 17 (pool) vs 15 (test);
- ``datasets``: ``data`` is the pool, ``test_data`` the test set (a column filter, if given,
  applies ``train_values`` to the pool and ``test_values`` to the test set);
- ``stratified``: neither given: a seeded per-class split with ``test_fraction`` of each class
  held out, so class proportions stay as in the dataset.

Support sets depend only on the pool labels and ``(base_seed, K, seed)``, never on an encoder, so
every encoder is scored on the same support/test rows (paired comparisons).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sarjepa_dist.data import shards
from sarjepa_dist.errors import SarjepaError

log = logging.getLogger(__name__)

SPLITTABLE_COLUMNS = ("label", "class_name", *shards.METADATA_COLUMNS)


class SplitError(SarjepaError, ValueError):
    """A split or support set cannot be made as configured; the message says why and what to change."""


@dataclass
class LabelledSet:
    """The labels and metadata of one labelled shard dataset (chips stay in the shards)."""

    root: str
    dataset_id: str
    chip_ids: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64, -1 where unlabelled
    class_names: list[str]
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # SPLITTABLE_COLUMNS

    def __len__(self) -> int:
        return len(self.labels)


def load_labelled_set(root: str) -> LabelledSet:
    """Read only the label/metadata columns of a dataset (no chip bytes)."""
    manifest = shards.read_manifest(root)
    cols = ["chip_id", "label", "class_name", *shards.METADATA_COLUMNS]
    table = shards.read_table(root, columns=cols).to_pydict()
    labels = np.array([-1 if v is None else int(v) for v in table["label"]], dtype=np.int64)
    names = list(manifest.class_names)
    if not names and (labels >= 0).any():
        names = [f"class{i}" for i in range(int(labels.max()) + 1)]
    columns: dict[str, np.ndarray] = {"label": labels,
                                      "class_name": np.array(table["class_name"], dtype=object)}
    for c in shards.METADATA_COLUMNS:
        vals = table[c]
        if c in ("depression_deg", "azimuth_deg"):
            columns[c] = np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
        else:
            columns[c] = np.array(vals, dtype=object)
    return LabelledSet(root=root, dataset_id=manifest.dataset_id, chip_ids=np.array(table["chip_id"], dtype=str),
                       labels=labels, class_names=names, columns=columns)


@dataclass
class Split:
    """Row indices of the pool (into ``pool_set``) and test set (into ``test_set``)."""

    kind: str  # column | datasets | stratified
    pool: np.ndarray
    test: np.ndarray
    description: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, pool_set: LabelledSet, test_set: LabelledSet, class_names: Sequence[str]) -> dict[str, Any]:
        pool_y = pool_set.labels[self.pool]
        test_y = test_set.labels[self.test]
        c = len(class_names)
        return {
            "kind": self.kind,
            "description": self.description,
            "pool_dataset": pool_set.root,
            "pool_dataset_id": pool_set.dataset_id,
            "test_dataset": test_set.root,
            "test_dataset_id": test_set.dataset_id,
            "pool_size": int(len(self.pool)),
            "test_size": int(len(self.test)),
            "pool_per_class": dict(zip(class_names, np.bincount(pool_y, minlength=c).tolist())),
            "test_per_class": dict(zip(class_names, np.bincount(test_y, minlength=c).tolist())),
            **self.details,
        }


def _matches(column: np.ndarray, values: Sequence[Any]) -> np.ndarray:
    """Rows whose value is one of ``values`` (floats compared with a 1e-3 tolerance)."""
    mask = np.zeros(len(column), dtype=bool)
    numeric = column.dtype.kind in "fiu"
    for v in values:
        if numeric:
            try:
                fv = float(v)
            except (TypeError, ValueError) as exc:
                raise SplitError(f"split value {v!r} is not a number but the column is numeric") from exc
            mask |= np.isclose(column.astype(np.float64), fv, rtol=0.0, atol=1e-3)
        else:
            mask |= np.array([x is not None and str(x) == str(v) for x in column], dtype=bool)
    return mask


def _same_value(a: Any, b: Any) -> bool:
    try:
        return abs(float(a) - float(b)) <= 1e-3
    except (TypeError, ValueError):
        return str(a) == str(b)


def _column(ds: LabelledSet, name: str) -> np.ndarray:
    if name not in ds.columns:
        raise SplitError(f"fewshot.split_column = {name!r} is not a column of {ds.root}; "
                         f"choose one of {list(ds.columns)}")
    return ds.columns[name]


def _describe_values(col: np.ndarray) -> str:
    vals = [v for v in col.tolist() if v is not None and not (isinstance(v, float) and np.isnan(v))]
    uniq = sorted({str(v) for v in vals})
    return ", ".join(uniq[:12]) + (" …" if len(uniq) > 12 else "") if uniq else "(all missing)"


def split_by_column(ds: LabelledSet, column: str, train_values: Sequence[Any], test_values: Sequence[Any],
                    test_ds: LabelledSet | None = None) -> Split:
    """Pool = rows of ``ds`` whose ``column`` is in ``train_values``; test = rows of ``test_ds``
    (default ``ds``) whose ``column`` is in ``test_values``. Unlabelled rows are dropped."""
    test_ds = test_ds if test_ds is not None else ds
    same = test_ds is ds
    if same:
        overlap = [v for v in train_values if any(_same_value(v, w) for w in test_values)]
        if overlap:
            raise SplitError(f"fewshot.train_values and fewshot.test_values share {overlap}: the same chips "
                             f"would be in the pool and the test set")
    pool_col = _column(ds, column)
    test_col = _column(test_ds, column)
    pool_mask = _matches(pool_col, train_values) & (ds.labels >= 0)
    test_mask = _matches(test_col, test_values) & (test_ds.labels >= 0)
    if not pool_mask.any():
        raise SplitError(f"no labelled chip of {ds.root} has {column} in {list(train_values)}; "
                         f"values present: {_describe_values(pool_col)}")
    if not test_mask.any():
        raise SplitError(f"no labelled chip of {test_ds.root} has {column} in {list(test_values)}; "
                         f"values present: {_describe_values(test_col)}")
    pool = np.flatnonzero(pool_mask)
    test = np.flatnonzero(test_mask)
    desc = f"{column} in {list(train_values)} (pool) vs {list(test_values)} (test)"
    kind = "column"
    if not same:
        kind = "datasets"
        desc = f"pool: {ds.root} with {column} in {list(train_values)}; test: {test_ds.root} with {column} in {list(test_values)}"
    return Split(kind=kind, pool=pool, test=test, description=desc,
                 details={"column": column, "train_values": list(train_values), "test_values": list(test_values),
                          "unlabelled_dropped": int((ds.labels < 0).sum() + (0 if same else (test_ds.labels < 0).sum()))})


def split_by_datasets(pool_ds: LabelledSet, test_ds: LabelledSet) -> Split:
    """All labelled rows of ``pool_ds`` against all labelled rows of ``test_ds``."""
    if pool_ds.dataset_id == test_ds.dataset_id:
        raise SplitError(f"fewshot.test_data {test_ds.root} is the same dataset as fewshot.data "
                         f"(dataset_id {pool_ds.dataset_id[:12]}): the test set would be the train pool; "
                         f"give a split_column or drop test_data for a stratified split")
    pool = np.flatnonzero(pool_ds.labels >= 0)
    test = np.flatnonzero(test_ds.labels >= 0)
    if not len(pool) or not len(test):
        raise SplitError(f"{pool_ds.root if not len(pool) else test_ds.root} holds no labelled chips")
    return Split(kind="datasets", pool=pool, test=test,
                 description=f"pool: {pool_ds.root}; test: {test_ds.root}",
                 details={"unlabelled_dropped": int((pool_ds.labels < 0).sum() + (test_ds.labels < 0).sum())})


def stratified_split(ds: LabelledSet, test_fraction: float, seed: int) -> Split:
    """Per class, a seeded ``round(n_c * test_fraction)`` chips (at least one, and at least one
    left in the pool when the class has two or more) go to the test set; the rest is the pool."""
    if not 0.0 < test_fraction < 1.0:
        raise SplitError(f"fewshot.test_fraction = {test_fraction} must lie in (0, 1)")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5F117]))
    pool_parts, test_parts = [], []
    singletons = []
    for c in np.unique(ds.labels[ds.labels >= 0]):
        rows = np.flatnonzero(ds.labels == c)
        rows = rows[rng.permutation(len(rows))]
        if len(rows) < 2:
            singletons.append(int(c))
            pool_parts.append(rows)
            continue
        n_test = int(np.clip(round(len(rows) * test_fraction), 1, len(rows) - 1))
        test_parts.append(rows[:n_test])
        pool_parts.append(rows[n_test:])
    pool = np.sort(np.concatenate(pool_parts)) if pool_parts else np.zeros(0, dtype=np.int64)
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, dtype=np.int64)
    if not len(test):
        raise SplitError(f"{ds.root}: no class has two or more labelled chips; nothing to test on")
    details: dict[str, Any] = {"test_fraction": test_fraction, "seed": int(seed),
                               "unlabelled_dropped": int((ds.labels < 0).sum())}
    if singletons:
        details["classes_with_one_chip"] = [ds.class_names[c] for c in singletons]
    return Split(kind="stratified", pool=pool, test=test,
                 description=f"seeded stratified split of {ds.root}: {test_fraction:g} of each class held out "
                             f"for testing (seed {seed})", details=details)


def harmonise_classes(pool_ds: LabelledSet, test_ds: LabelledSet) -> None:
    """Make ``test_ds`` use ``pool_ds``'s label numbering (by class name); error on unknown classes."""
    if test_ds is pool_ds or test_ds.class_names == pool_ds.class_names:
        return
    index = {n: i for i, n in enumerate(pool_ds.class_names)}
    unknown = [n for n in test_ds.class_names if n not in index]
    if unknown:
        raise SplitError(f"test dataset {test_ds.root} has classes {unknown} that the pool dataset "
                         f"{pool_ds.root} does not have ({pool_ds.class_names})")
    remap = np.array([index[n] for n in test_ds.class_names], dtype=np.int64)
    labelled = test_ds.labels >= 0
    test_ds.labels = np.where(labelled, remap[np.clip(test_ds.labels, 0, None)], -1)
    test_ds.columns["label"] = test_ds.labels
    test_ds.class_names = list(pool_ds.class_names)


def make_split(pool_ds: LabelledSet, test_ds: LabelledSet | None, *, split_column: str | None,
               train_values: Sequence[Any], test_values: Sequence[Any], test_fraction: float,
               seed: int) -> Split:
    """The split the few-shot config asks for (see the module docstring)."""
    if test_ds is not None:
        harmonise_classes(pool_ds, test_ds)
        if split_column is not None:
            split = split_by_column(pool_ds, split_column, train_values, test_values, test_ds=test_ds)
        else:
            split = split_by_datasets(pool_ds, test_ds)
        shared = np.intersect1d(pool_ds.chip_ids[split.pool], test_ds.chip_ids[split.test])
        if len(shared):
            log.warning("pool and test datasets share %d chip ids (e.g. %s): check for leakage",
                        len(shared), shared[0])
        split.details["shared_chip_ids"] = int(len(shared))
    elif split_column is not None:
        split = split_by_column(pool_ds, split_column, train_values, test_values)
    else:
        split = stratified_split(pool_ds, test_fraction, seed)
    check_classes_covered(split, pool_ds, test_ds if test_ds is not None else pool_ds)
    return split


def check_classes_covered(split: Split, pool_ds: LabelledSet, test_ds: LabelledSet) -> None:
    pool_classes = set(np.unique(pool_ds.labels[split.pool]).tolist())
    test_classes = set(np.unique(test_ds.labels[split.test]).tolist())
    missing = sorted(test_classes - pool_classes)
    if missing:
        names = [pool_ds.class_names[c] for c in missing]
        raise SplitError(f"classes {names} have test chips but none in the train pool ({split.description})")
    if len(pool_classes) < 2:
        raise SplitError(f"the train pool holds {len(pool_classes)} class; few-shot classification needs two or more")


# --------------------------------------------------------------------------- support sets


def check_shots(pool_labels: np.ndarray, shots: Sequence[int], class_names: Sequence[str]) -> None:
    """Every K must fit every class in the pool; the error names the class and its pool size."""
    counts = np.bincount(pool_labels, minlength=len(class_names))
    present = [c for c in range(len(class_names)) if counts[c] > 0]
    for k in sorted(set(int(k) for k in shots), reverse=True):
        short = [(class_names[c], int(counts[c])) for c in present if counts[c] < k]
        if short:
            listing = ", ".join(f"class '{n}' has only {m}" for n, m in short)
            raise SplitError(f"K = {k} shots per class is more than the train pool holds: {listing} "
                             f"chip(s) in the pool; lower fewshot.shots to at most {min(m for _, m in short)}")


def support_indices(pool_labels: np.ndarray, k: int, seed: int, base_seed: int = 0) -> np.ndarray:
    """Positions (into ``pool_labels``) of ``k`` chips per class present in the pool, drawn without
    replacement from a generator seeded by ``(base_seed, k, seed)``; sorted by class then position."""
    rng = np.random.default_rng(np.random.SeedSequence([int(base_seed), int(k), int(seed)]))
    out = []
    for c in np.unique(pool_labels):
        rows = np.flatnonzero(pool_labels == c)
        if len(rows) < k:
            raise SplitError(f"K = {k} shots but class {int(c)} has only {len(rows)} chips in the pool")
        out.append(np.sort(rng.choice(rows, size=k, replace=False)))
    return np.concatenate(out)
