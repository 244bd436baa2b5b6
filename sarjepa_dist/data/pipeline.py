"""The Ray Data graph that streams chips from shards into Ray Train workers.

    read (Parquet shards, local or s3://, through ``storage``)  -- file order shuffled per (seed, epoch)
      → decode + validate (bad rows counted per reason and skipped; see ``badrows``)
      → crop / augment (training) or centre-resize (evaluation), per chip
      → condition → ∇x                                         (only when transform_placement == "data")
      → rows → per-rank batches (seeded local shuffle buffer, equal counts on every rank)

Nothing is copied to local disk: Ray Data reads the Parquet files through the pyarrow filesystem
that ``storage.resolve`` returns (shard files spread over parallel read tasks; see
``USE_V1_PARQUET_READER`` for which Ray reader) and streams blocks through the graph with bounded
memory (benchmarks/bench_pipeline.py: worker RSS flat from a 1x to a 10x archive).

Where ∇x is computed (``DataConfig.transform_placement``):

- ``data``: ``prepare_inputs`` runs in the Ray Data CPU workers; rows carry ``x`` / ``gx`` /
  ``gfeat`` (whatever ``need`` asks for). Frees the accelerator, costs CPU and bytes per row
  (``gfeat`` is C·S maps per chip).
- ``device``: rows carry the augmented ``amplitude``; the train step calls ``engine.make_inputs_on_device`` (i.e.
  ``prepare_inputs``) on the device. Cheapest on bytes and CPU; the right default with a GPU.

Both call the same ``transforms.prepare_inputs`` on the same augmented amplitude, so both give
the same numbers (tested).

Determinism. Ray Data's execution order (which task finishes first, how blocks are bundled into
``map_batches`` calls, which consumer gets which block) varies from run to run, so nothing here
may depend on it:

- augmentation draws from a torch.Generator per chip, seeded by a stable hash of
  (seed, epoch, chip_id): a chip gets the same crop/flip/rotation whatever batch it lands in, and a
  different one each epoch;
- the file order is a permutation seeded by (seed, epoch) (Ray's ``FileShuffleConfig`` with
  ``reseed_after_execution=False``: the epoch, not Ray's execution counter, picks the order);
- the local shuffle buffer is seeded by (seed, epoch, rank).

So a run with a given seed sees the same set of chips per epoch with the same augmented values
per chip; the exact order of chips within a rank is only reproducible as far as Ray's scheduling
is (it is not, in general).

``epoch`` is baked into a dataset when it is built (augmentation and file order depend on it).
Build one dataset per epoch (``build_dataset(..., epoch=e)``; inside Ray Train,
``train.batches.epoch_shard`` does it on rank 0 and hands each rank its split). Re-iterating the same
dataset repeats the same augmentations, which is right for evaluation but not for pretraining.

Equal batches on every rank (Ray issue 66085: a rank with one batch more than the others waits in
an all-reduce forever). Training splits with ``streaming_split(n, equal=True)`` — which is what Ray
Train's default ``DataConfig`` does for ``datasets={"train": ds}`` — so every rank receives the
same number of rows (up to n − 1 rows of the epoch are dropped to make that so), and
``train.batches.iter_train_batches`` drops the last partial batch per rank (``drop_last=True``, up to
batch_size − 1 rows per rank). In total fewer than ``world_size × batch_size`` good chips are left
out of an epoch; which chips they are changes from epoch to epoch with the file order and
scheduling. Evaluation uses ``equal=False`` and ``drop_last=False``: every good chip exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch

from sarjepa_dist import storage
from sarjepa_dist.config import ConfigError, DataConfig, GradientConfig
from sarjepa_dist.data import shards
from sarjepa_dist.data.badrows import BadDataError, BadRowTracker, BadRowWarning
from sarjepa_dist.transforms import augment_batch, center_resize, prepare_inputs

if TYPE_CHECKING:  # ray is imported lazily so that importing this module stays cheap
    import ray.data

__all__ = [
    "BadDataError", "BadRowTracker", "BadRowWarning", "NEED_KEYS", "build_dataset", "chip_seed",
    "dataset_tracker", "file_shuffle_seed", "split_for_consumers", "transform_chip",
]

logger = logging.getLogger(__name__)

NEED_KEYS = ("x", "gx", "gfeat")
READ_COLUMNS = ["chip_id", "chip", "chip_shape", "chip_dtype", "label"]
UDF_BATCH_ROWS = 128  # rows per map_batches call: big enough to amortise the per-call cost
MAX_LOGGED_BAD_ROWS = 5  # per map_batches call, in the Ray Data worker log
MAX_REPORTED_EXAMPLES = 10  # per map_batches call, sent to the tracker (counts are always complete)
# Ray 2.60 routes read_parquet through "datasource V2" by default; its listing step starts a pool
# of footer-reader actors on every execution, i.e. once per epoch here (a new dataset per epoch),
# which measured 4-25 s per epoch on a loaded 2-core machine against 0.3 s for the V1 reader
# (footers read once, at build time, by the driver). Both honour FileShuffleConfig. Set False to
# follow Ray's default.
USE_V1_PARQUET_READER = True


# --------------------------------------------------------------------------- seeds


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (``hash()`` of str is not)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def chip_seed(seed: int, epoch: int, chip_id: str) -> int:
    """The augmentation seed of one chip in one epoch: independent of batching and scheduling."""
    return stable_seed("augment", seed, epoch, chip_id)


def file_shuffle_seed(seed: int, epoch: int) -> int:
    """Seed of this epoch's shard-file order (Ray's ``FileShuffleConfig``; numpy wants < 2**32)."""
    return stable_seed("file-order", seed, epoch) % (2**32)


def local_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    return stable_seed("local-shuffle", seed, epoch, rank) % (2**32)


# --------------------------------------------------------------------------- per-chip transform


def transform_chip(chip: np.ndarray, data_cfg: DataConfig, *, training: bool, epoch: int,
                   chip_id: str) -> torch.Tensor:
    """One decoded chip (C x H x W, any dtype) → the amplitude the model path sees (C x S x S float32).

    Training: random-resized crop / flips / rot90 from the chip's own generator (``chip_seed``).
    Evaluation: centre crop-and-resize, no randomness. This is the reference the pipeline must
    match; call it to see what a chip looked like in a given epoch.
    """
    x = torch.from_numpy(np.array(chip, dtype=np.float32, copy=True))[None]
    if training:
        aug = data_cfg.augment
        gen = torch.Generator().manual_seed(chip_seed(data_cfg.seed, epoch, chip_id))
        out = augment_batch(x, data_cfg.img_size, tuple(aug.crop_scale), aug.flips, aug.rot90, gen)
    else:
        out = center_resize(x, data_cfg.img_size)
    return out[0].to(torch.float32).contiguous()


# --------------------------------------------------------------------------- the map_batches UDF


@dataclass(frozen=True)
class _Spec:
    """Everything a Ray Data task needs; pickled once into the task's arguments."""

    data_cfg: DataConfig
    gradient_cfg: GradientConfig
    need: tuple[str, ...]
    training: bool
    epoch: int
    expected_shape: tuple[int, ...]
    shard_prefix: str  # "s3://" when the read paths are bucket/key, "" for local paths


def _dry_run(spec: _Spec) -> None:
    """Push one synthetic chip through the transforms on the driver, so that a configuration the
    transforms reject (e.g. gradient radii too large for img_size) fails here, with its message,
    instead of inside a Ray Data worker (data placement) or the first train step (device)."""
    c, h, w = spec.expected_shape
    chip = np.ones((c, h, w), dtype=np.float32)
    amp = transform_chip(chip, spec.data_cfg, training=spec.training, epoch=spec.epoch, chip_id="dry-run")
    prepare_inputs(amp[None], spec.data_cfg, spec.gradient_cfg, need=spec.need)


def _empty_like_outputs(spec: _Spec) -> dict[str, np.ndarray]:
    """Zero-row outputs with the right trailing shapes (a batch whose rows were all bad)."""
    c, s = spec.expected_shape[0], spec.data_cfg.img_size
    dummy = torch.ones((1, c, s, s), dtype=torch.float32)
    if spec.data_cfg.transform_placement == "device":
        return {"amplitude": dummy[:0].numpy()}
    feats = prepare_inputs(dummy, spec.data_cfg, spec.gradient_cfg, need=spec.need)
    return {k: feats[k][:0].numpy() for k in spec.need}


def _process_batch(batch: pa.Table, *, spec: _Spec, tracker: BadRowTracker | None) -> dict[str, np.ndarray]:
    """decode → validate → crop/augment → (condition → ∇x), for one Ray Data batch of shard rows."""
    n = batch.num_rows
    ids = batch.column("chip_id").to_pylist()
    datas = batch.column("chip").to_pylist()
    shapes = batch.column("chip_shape").to_pylist()
    dtypes = batch.column("chip_dtype").to_pylist()
    labels = pc.fill_null(batch.column("label"), -1).to_numpy().astype(np.int64)
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * n

    keep: list[int] = []
    amps: list[torch.Tensor] = []
    bad: dict[str, int] = {}
    examples: list[dict[str, Any]] = []
    for i in range(n):
        try:
            arr = shards.decode_checked(datas[i], shapes[i], dtypes[i], spec.expected_shape)
        except shards.BadChip as err:
            bad[err.reason] = bad.get(err.reason, 0) + 1
            shard = f"{spec.shard_prefix}{paths[i]}" if paths[i] else "<unknown shard>"
            ex = {"chip_id": ids[i], "shard": shard, "reason": err.reason, "detail": err.detail}
            examples.append(ex)
            if len(examples) <= MAX_LOGGED_BAD_ROWS:
                logger.warning("skipped bad row %r in %s: %s (%s)", ids[i], shard, err.reason, err.detail)
            continue
        keep.append(i)
        amps.append(transform_chip(arr, spec.data_cfg, training=spec.training, epoch=spec.epoch,
                                   chip_id=ids[i]))
    if tracker is not None:
        tracker.report(n, bad, examples[:MAX_REPORTED_EXAMPLES])

    out: dict[str, np.ndarray] = {
        "chip_id": np.array([ids[i] for i in keep], dtype=object),
        "label": labels[keep] if keep else np.zeros((0,), dtype=np.int64),
    }
    if not keep:
        out.update(_empty_like_outputs(spec))
        return out
    amplitude = torch.stack(amps)
    if spec.data_cfg.transform_placement == "device":
        out["amplitude"] = amplitude.numpy()
    else:
        with torch.no_grad():
            feats = prepare_inputs(amplitude, spec.data_cfg, spec.gradient_cfg, need=spec.need)
        for k in spec.need:
            out[k] = feats[k].to(torch.float32).contiguous().numpy()
    return out


# --------------------------------------------------------------------------- building


def _check_need(need: Sequence[str]) -> tuple[str, ...]:
    from sarjepa_dist.transforms import check_input_keys

    return check_input_keys(need)


def build_dataset(data_cfg: DataConfig, gradient_cfg: GradientConfig, *, need: Sequence[str] = ("x", "gx"),
                  training: bool = True, epoch: int = 0, run_name: str | None = None,
                  tracker: BadRowTracker | None = None,
                  manifest: shards.Manifest | None = None) -> "ray.data.Dataset":
    """The lazy Ray Data graph over the shard dataset at ``data_cfg.path`` for one epoch.

    Rows: ``chip_id`` (str), ``label`` (int64, -1 unlabelled) and either ``amplitude``
    (C x S x S float32, augmented; ``transform_placement == "device"``) or the ``need`` keys of
    ``prepare_inputs`` (``"data"``; with ``"device"`` the train step picks what it needs, see
    ``engine.make_inputs_on_device``). ``training=False``: no augmentation (centre-resize only), no file shuffle.
    ``epoch`` keys the augmentation and the file order: build one dataset per epoch.

    Bad rows are counted in the ``BadRowTracker`` of ``run_name`` (created when missing; a fresh
    anonymous one without a name), reachable as ``dataset_tracker(ds)`` or, from train workers,
    ``BadRowTracker.attach(run_name)``. Pass ``tracker`` to reuse a handle you already hold, and
    ``manifest`` when you already read the dataset's manifest (else it is read here).
    The transforms are tried on one synthetic chip here, so a bad configuration fails now.
    """
    import ray.data  # here, not at the top: importing the data layer must not import Ray
    from ray.data import FileShuffleConfig

    need = _check_need(need)
    if manifest is None:
        manifest = shards.read_manifest(data_cfg.path)
    expected = tuple(int(s) for s in manifest.chip_shape)
    if len(expected) != 3:
        raise shards.ShardError(f"{data_cfg.path}: manifest chip_shape {list(expected)} is not C x H x W")
    if expected[0] != data_cfg.channels:
        raise ConfigError(f"data.channels = {data_cfg.channels} but the dataset at {data_cfg.path!r} has "
                          f"{expected[0]}-channel chips; set data.channels={expected[0]}")
    fs, _ = storage.resolve(data_cfg.path)
    paths = [storage.resolve(uri)[1] for uri in shards.shard_uris(data_cfg.path, manifest)]
    spec = _Spec(data_cfg=data_cfg, gradient_cfg=gradient_cfg, need=need, training=training, epoch=epoch,
                 expected_shape=expected, shard_prefix="s3://" if isinstance(fs, pafs.S3FileSystem) else "")
    _dry_run(spec)
    tracker = tracker or BadRowTracker(run_name)

    shuffle = FileShuffleConfig(seed=file_shuffle_seed(data_cfg.seed, epoch), reseed_after_execution=False) \
        if training else None
    with _parquet_reader(v1=USE_V1_PARQUET_READER):
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, shuffle=shuffle)
    ds = ds.select_columns([*READ_COLUMNS, "path"])  # projection is pushed down into the reader
    ds = ds.map_batches(_process_batch, batch_format="pyarrow", batch_size=UDF_BATCH_ROWS,
                        fn_kwargs={"spec": spec, "tracker": tracker})
    ds._sarjepa_bad_rows = tracker  # type: ignore[attr-defined]  # see dataset_tracker
    return ds


@contextlib.contextmanager
def _parquet_reader(v1: bool) -> Iterator[None]:
    """Pick Ray's Parquet reader for one ``read_parquet`` call (a no-op where Ray has no V1)."""
    import ray.data  # here, not at the top: importing the data layer must not import Ray

    ctx = ray.data.DataContext.get_current()
    if not v1 or not hasattr(ctx, "use_datasource_v2"):
        yield
        return
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


def dataset_tracker(ds: "ray.data.Dataset") -> BadRowTracker:
    """The ``BadRowTracker`` that a dataset from ``build_dataset`` reports to."""
    tracker = getattr(ds, "_sarjepa_bad_rows", None)
    if tracker is None:
        raise ValueError("this dataset was not made by build_dataset (or lost its tracker); "
                         "use BadRowTracker(run_name)")
    return tracker


def split_for_consumers(ds: "ray.data.Dataset", n: int, equal: bool = True,
                        locality_hints: Sequence[str] | None = None) -> list["ray.data.DataIterator"]:
    """``n`` disjoint streaming iterators over one execution of ``ds`` (one per train rank).

    ``equal=True`` for training (every rank gets the same number of rows; see the module docstring
    for what is dropped); ``equal=False`` for evaluation (every row exactly once). All ``n``
    iterators must be consumed concurrently: the split starts each epoch when every consumer asks.
    ``locality_hints``: the consumers' Ray node ids, so blocks produced on a node go to its rank.
    """
    if n < 1:
        raise ValueError(f"n = {n}: need at least one consumer")
    hints = list(locality_hints) if locality_hints is not None else None
    if hints is not None and len(hints) != n:
        raise ValueError(f"locality_hints has {len(hints)} node ids for {n} consumers")
    return ds.streaming_split(n, equal=equal, locality_hints=hints)
