"""The Ray Data graph that streams chips from shards into Ray Train workers.

    shard files (local or s3://, through ``storage``)   -- file order shuffled per (seed, epoch)
      → read + decode + validate, one task per group of files (bad rows counted per reason and skipped; an
        unreadable shard quarantined with its reason and its unread rows counted; see ``badrows``)
      → crop / augment (training) or centre-resize (evaluation), per chip
      → condition → ∇x                                         (only when transform_placement == "data")
      → rows → per-rank batches (seeded local shuffle buffer, equal counts on every rank)

Nothing is copied to local disk: the read tasks open the Parquet files through the pyarrow
filesystem that ``storage.resolve`` returns (one task per group of consecutive shard files,
about ``READ_TASK_ROWS`` rows, one file when shards are that big; row group by row group, in
blocks of ``READ_BLOCK_ROWS``) and stream blocks through the graph with bounded memory
(benchmarks/bench_pipeline.py: worker RSS flat from a 1x to a 10x archive). The reader is the
project's, not ``ray.data.read_parquet``, so that a shard that fails mid-stream is quarantined and
counted instead of failing the run with Ray's error, and so that every block has a tally key that
is the same in every execution (exact counts under task retries and resumes; see ``badrows``).
A store that does not answer is not a bad shard: that read fails with ``storage.StorageError``
after the S3 client's retries (``storage.S3_RETRY_ATTEMPTS``).

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
- the file order is a permutation seeded by (seed, epoch): the epoch, not Ray's execution
  counter, picks the order;
- the consumer's shuffle buffer (``data/shuffle.py``) is seeded by (seed, epoch, rank).

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

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sarjepa_dist import storage
from sarjepa_dist.config import ConfigError, DataConfig, GradientConfig
from sarjepa_dist.data import shards
from sarjepa_dist.data.badrows import BadDataError, BadRowTracker, BadRowWarning, TaskTallies

# ray and torch are imported where they are used: the processes that only unpickle a dataset
# holding this module's functions (Ray Data's coordinators, the driver) never import torch.
if TYPE_CHECKING:
    import ray.data
    import torch

__all__ = [
    "BadDataError", "BadRowTracker", "BadRowWarning", "NEED_KEYS", "build_dataset", "chip_seed",
    "dataset_tracker", "file_shuffle_seed", "ingest_options", "shards_per_read_task", "split_for_consumers",
    "transform_chip",
]

logger = logging.getLogger(__name__)

NEED_KEYS = ("x", "gx", "gfeat")
READ_COLUMNS = ["chip_id", "chip", "chip_shape", "chip_dtype", "label"]
UDF_BATCH_ROWS = 128  # rows per _process_batch call: big enough to amortise the per-call cost
MAX_LOGGED_BAD_ROWS = 5  # per read block, in the Ray Data worker log
MAX_REPORTED_EXAMPLES = 10  # per read block, sent to the tracker (counts are always complete)
READ_BLOCK_ROWS = 1024  # rows per block the shard reader yields (one tally key each)
# Shard files per read task: enough files for about this many rows, so that small shards do not
# pay Ray's per-task cost once each (benchmarks/bench_input_path.py), but never so many that the
# cluster's CPUs get fewer than READ_TASKS_PER_CPU tasks each.
READ_TASK_ROWS = 1024
READ_TASKS_PER_CPU = 4


# --------------------------------------------------------------------------- seeds


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (``hash()`` of str is not)."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def chip_seed(seed: int, epoch: int, chip_id: str) -> int:
    """The augmentation seed of one chip in one epoch: independent of batching and scheduling."""
    return stable_seed("augment", seed, epoch, chip_id)


def file_shuffle_seed(seed: int, epoch: int) -> int:
    """Seed of this epoch's shard-file order (numpy wants < 2**32)."""
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
    import torch

    from sarjepa_dist.transforms import augment_batch, center_resize

    x = torch.from_numpy(np.array(chip, dtype=np.float32, copy=True))[None]
    if training:
        aug = data_cfg.augment
        gen = torch.Generator().manual_seed(chip_seed(data_cfg.seed, epoch, chip_id))
        out = augment_batch(x, data_cfg.img_size, tuple(aug.crop_scale), aug.flips, aug.rot90, gen,
                           vertical_flips=aug.vertical_flips)
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
    from sarjepa_dist.transforms import prepare_inputs

    c, h, w = spec.expected_shape
    chip = np.ones((c, h, w), dtype=np.float32)
    amp = transform_chip(chip, spec.data_cfg, training=spec.training, epoch=spec.epoch, chip_id="dry-run")
    prepare_inputs(amp[None], spec.data_cfg, spec.gradient_cfg, need=spec.need)


def _empty_like_outputs(spec: _Spec) -> dict[str, np.ndarray]:
    """Zero-row outputs with the right trailing shapes (a batch whose rows were all bad)."""
    import torch

    from sarjepa_dist.transforms import prepare_inputs

    c, s = spec.expected_shape[0], spec.data_cfg.img_size
    dummy = torch.ones((1, c, s, s), dtype=torch.float32)
    if spec.data_cfg.transform_placement == "device":
        return {"amplitude": dummy[:0].numpy()}
    feats = prepare_inputs(dummy, spec.data_cfg, spec.gradient_cfg, need=spec.need)
    return {k: feats[k][:0].numpy() for k in spec.need}


def _binary_views(column: pa.ChunkedArray) -> list[Any]:
    """The values of a binary column as read-only memoryviews into Arrow's buffers (None for a
    null), without copying each value into a Python ``bytes`` as ``to_pylist`` does (64 KiB a
    128² float32 chip). Other column types (a damaged shard) come back as ``to_pylist`` values."""
    out: list[Any] = []
    for chunk in column.chunks:
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            out.extend(chunk.to_pylist())
            continue
        n = len(chunk)
        if n == 0:
            continue
        _, offsets_buf, data_buf = chunk.buffers()
        off_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buf, dtype=off_type)[chunk.offset:chunk.offset + n + 1].tolist()
        data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
        valid = chunk.is_valid().to_pylist() if chunk.null_count else None
        out.extend(data[offsets[i]:offsets[i + 1]] if valid is None or valid[i] else None for i in range(n))
    return out


def _uniform_chips(column: pa.ChunkedArray, n: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """All ``n`` values of a binary column as one (n, prod(shape)) array viewing Arrow's buffer,
    when they are non-null and exactly ``shape`` x ``dtype`` long and back to back; else None."""
    if column.num_chunks != 1 or n == 0:
        return None
    chunk = column.chunk(0)
    if chunk.null_count or not pa.types.is_binary(chunk.type):
        return None
    size = math.prod(shape) * dtype.itemsize
    _, offsets_buf, data_buf = chunk.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[chunk.offset:chunk.offset + n + 1]
    if data_buf is None or size == 0 or not np.array_equal(np.diff(offsets), np.full(n, size, dtype=np.int32)):
        return None
    start = int(offsets[0])
    if start % dtype.itemsize:  # numpy views need no alignment, but keep reads aligned
        return None
    return np.frombuffer(data_buf, dtype=dtype, count=n * math.prod(shape), offset=start).reshape(n, -1)


def _suspect_rows(table: pa.Table, shapes: list[Any], dtypes: list[Any],
                  expected_shape: tuple[int, ...]) -> np.ndarray | None:
    """Rows that might fail ``shards.decode_checked``, found with whole-block numpy reductions:
    a chip passes ``check_chip`` exactly when its min and max are finite, min >= 0 (signed and
    float kinds) and max > 0, since min and max propagate NaN. None when the block's rows are not
    all the expected shape and one supported dtype back to back (then every row is checked alone)."""
    if len(expected_shape) != 3 or not dtypes or any(d != dtypes[0] for d in dtypes):
        return None
    want = list(expected_shape)
    if any(s != want for s in shapes):
        return None
    try:
        dtype = np.dtype(dtypes[0]).newbyteorder("<")
    except TypeError:
        return None
    if dtype.kind not in "fiu":
        return None
    x = _uniform_chips(table.column("chip"), table.num_rows, expected_shape, dtype)
    if x is None:
        return None
    lo, hi = x.min(axis=1), x.max(axis=1)
    ok = hi > 0
    if dtype.kind in "fi":
        ok &= lo >= 0
    if dtype.kind == "f":
        ok &= np.isfinite(lo) & np.isfinite(hi)
    return ~ok


def _validate_rows(table: pa.Table, spec: _Spec) -> tuple[pa.Table, dict[str, int], list[dict[str, Any]]]:
    """The rows of ``table`` that decode and pass ``shards.check_chip``; the rest counted by reason.

    Usually one pair of numpy reductions over the block picks the few rows to look at; those (or,
    in a block of mixed shapes or dtypes, all rows) go through ``shards.decode_checked`` one by
    one, which gives each bad row its reason and detail."""
    shapes = table.column("chip_shape").to_pylist()
    dtypes = table.column("chip_dtype").to_pylist()
    suspect = _suspect_rows(table, shapes, dtypes, spec.expected_shape)
    rows = range(table.num_rows) if suspect is None else np.flatnonzero(suspect).tolist()
    keep = np.ones(table.num_rows, dtype=bool)
    bad: dict[str, int] = {}
    examples: list[dict[str, Any]] = []
    if not rows:
        return table, bad, examples
    ids = table.column("chip_id").to_pylist()
    datas = _binary_views(table.column("chip"))
    paths = table.column("path").to_pylist() if "path" in table.column_names else [None] * table.num_rows
    for i in rows:
        try:
            shards.decode_checked(datas[i], shapes[i], dtypes[i], spec.expected_shape)
        except shards.BadChip as err:
            keep[i] = False
            bad[err.reason] = bad.get(err.reason, 0) + 1
            shard = f"{spec.shard_prefix}{paths[i]}" if paths[i] else "<unknown shard>"
            examples.append({"chip_id": ids[i], "shard": shard, "reason": err.reason, "detail": err.detail})
            if len(examples) <= MAX_LOGGED_BAD_ROWS:
                logger.warning("skipped bad row %r in %s: %s (%s)", ids[i], shard, err.reason, err.detail)
    return (table if keep.all() else table.filter(pa.array(keep))), bad, examples


def _read_shards(items: dict[str, np.ndarray], *, spec: _Spec, tracker: BadRowTracker | None) -> Iterator[pa.Table]:
    """Ray Data UDF over shard items (``path``, ``rows``): each shard's good rows, in blocks of
    ``READ_BLOCK_ROWS``. Every block's tally goes to ``tracker`` under the key (epoch, shard,
    block index), which a retried task or a resumed run meets again unchanged. The task sends its
    tallies in one call when its reading ends (``TaskTallies``: no waits on the actor meanwhile)."""
    # Built here from the task's own environment (endpoint, retry switches), not pickled in.
    filesystem, _ = storage.resolve(spec.shard_prefix or "/")
    tallies = TaskTallies(tracker) if tracker is not None else None
    try:
        for path, rows in zip(items["path"], items["rows"]):
            yield from _read_one_shard(str(path), int(rows), spec=spec, filesystem=filesystem, tracker=tallies)
    finally:
        if tallies is not None:
            tallies.flush()


def _read_one_shard(path: str, rows: int, *, spec: _Spec, filesystem: pafs.FileSystem,
                    tracker: TaskTallies | None) -> Iterator[pa.Table]:
    uri = f"{spec.shard_prefix}{path}"
    delivered = 0
    try:
        with filesystem.open_input_file(path) as f:
            for index, record_batch in enumerate(
                    pq.ParquetFile(f).iter_batches(batch_size=READ_BLOCK_ROWS, columns=READ_COLUMNS,
                                                   use_threads=False)):  # one task, one CPU
                table = pa.Table.from_batches([record_batch])
                table = table.append_column("path", pa.array([path] * table.num_rows, pa.string()))
                good, bad, examples = _validate_rows(table, spec)
                delivered += table.num_rows
                if tracker is not None:
                    tracker.report(table.num_rows, bad, examples[:MAX_REPORTED_EXAMPLES],
                                   key=f"{spec.epoch}:{path}:{index}", epoch=spec.epoch)
                yield good
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ValueError... for a corrupt file
        detail = _unreadable_detail(filesystem, uri, path, exc)
        lost = max(0, rows - delivered)
        logger.warning("quarantined shard %s: %s (%d of its %d rows unread)", uri, detail, lost, rows)
        if tracker is not None:
            quarantined = {"shard": uri, "reason": "unreadable", "detail": detail, "rows": lost, "epoch": spec.epoch}
            example = {"chip_id": None, "shard": uri, "reason": "unreadable", "detail": detail}
            tracker.report(lost, {"unreadable": lost} if lost else {}, [example],
                           key=f"{spec.epoch}:{path}:unreadable", epoch=spec.epoch, quarantined=quarantined)


def _unreadable_detail(filesystem: pafs.FileSystem, uri: str, path: str, exc: Exception) -> str:
    """Why a shard could not be read, once the store itself is known to answer; a store that does
    not answer is a storage failure (``StorageError``), never a reason to drop the shard."""
    try:
        kind = filesystem.get_file_info(path).type
    except OSError as down:
        raise storage.StorageError(f"{storage.redact(uri)}: cannot read shard, storage does not answer "
                                   f"({storage.redact(str(down))})") from exc
    if kind == pafs.FileType.NotFound:
        return "the manifest lists it but the file is missing"
    text = storage.redact(str(exc)).splitlines()[0] if str(exc) else ""
    return f"not a readable Parquet shard ({type(exc).__name__}: {text[:300]})"


def pool_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised, writable array whose memory comes from Arrow's memory pool (mimalloc in
    pyarrow's wheels), not from the C heap.

    Why: a Ray Data task's outputs stay alive until Ray has built and stored the block they go
    into (up to ``target_max_block_size``, 128 MiB), and are then freed together. glibc hands such
    a freed heap top back to the kernel, so the next block's outputs fault every 4 KiB page in
    afresh: 16 faults a 64 KiB chip, which made ``torch.stack`` into the batch 85-114 µs a chip in
    the pipeline's workers against 13-19 µs in a plain loop (README, "Measured": the input path).
    Arrow's pool keeps freed pages mapped for the next block. ``transform_placement: data`` copies
    its features into such arrays too: one more copy of each output, yet its workers spent 15% less
    CPU a chip (medians 1,468 against 1,738 µs at 128², 56 against 107 faults a chip)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    return np.frombuffer(pa.allocate_buffer(nbytes), dtype=dtype).reshape(shape)


def _process_batch(batch: pa.Table, *, spec: _Spec) -> dict[str, np.ndarray]:
    """decode → crop/augment → (condition → ∇x), for one Ray Data batch of validated shard rows."""
    import torch

    from sarjepa_dist.transforms import prepare_inputs

    ids = batch.column("chip_id").to_pylist()
    datas = _binary_views(batch.column("chip"))
    shapes = batch.column("chip_shape").to_pylist()
    dtypes = batch.column("chip_dtype").to_pylist()
    labels = pc.fill_null(batch.column("label"), -1).to_numpy().astype(np.int64)
    out: dict[str, np.ndarray] = {"chip_id": np.array(ids, dtype=object), "label": labels}
    if not ids:
        out["label"] = np.zeros((0,), dtype=np.int64)
        out.update(_empty_like_outputs(spec))
        return out
    chips = [transform_chip(shards.decode_chip(datas[i], shapes[i], dtypes[i]), spec.data_cfg,
                            training=spec.training, epoch=spec.epoch, chip_id=ids[i])
             for i in range(len(ids))]
    if spec.data_cfg.transform_placement == "device":
        out["amplitude"] = pool_array((len(chips), *chips[0].shape), np.float32)
        torch.stack(chips, out=torch.from_numpy(out["amplitude"]))
    else:
        amplitude = torch.stack(chips)
        with torch.no_grad():
            feats = prepare_inputs(amplitude, spec.data_cfg, spec.gradient_cfg, need=spec.need)
        for k in spec.need:
            out[k] = pool_array(tuple(feats[k].shape), np.float32)
            torch.from_numpy(out[k]).copy_(feats[k])
    return out


def _process_in_pieces(block: pa.Table, *, spec: _Spec) -> Iterator[dict[str, np.ndarray]]:
    """``_process_batch`` over one read block, ``UDF_BATCH_ROWS`` rows at a time (bounded memory
    per call); an empty block still gives one empty, correctly shaped output."""
    for start in range(0, max(block.num_rows, 1), UDF_BATCH_ROWS):
        yield _process_batch(block.slice(start, UDF_BATCH_ROWS), spec=spec)


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
    items = [{"path": storage.resolve(uri)[1], "rows": info.rows}
             for uri, info in zip(shards.shard_uris(data_cfg.path, manifest), manifest.shards)]
    if training:  # the epoch, not Ray's execution counter, picks the file order
        order = np.random.default_rng(file_shuffle_seed(data_cfg.seed, epoch)).permutation(len(items))
        items = [items[i] for i in order]
    spec = _Spec(data_cfg=data_cfg, gradient_cfg=gradient_cfg, need=need, training=training, epoch=epoch,
                 expected_shape=expected, shard_prefix="s3://" if isinstance(fs, pafs.S3FileSystem) else "")
    _dry_run(spec)
    tracker = tracker or BadRowTracker(run_name)

    # Read tasks run in parallel over groups of consecutive shard files (in this epoch's file
    # order), and each file's blocks (so each tally key) are the same in every execution whatever
    # the grouping. A group holds enough files for about READ_TASK_ROWS rows (one file when shards
    # are that big), but the cluster's CPUs get at least READ_TASKS_PER_CPU tasks each. Ray fuses
    # the two map_batches into one task that takes at least the second one's batch_size input
    # rows; a batch_size there would put up to that many shard files into one task (an archive of
    # <= 128 shards read serially by one task), so that stage takes whole read blocks and cuts
    # them itself.
    per_task = shards_per_read_task([it["rows"] for it in items], _cluster_cpus())
    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // per_task)))
    ds = ds.map_batches(_read_shards, batch_format="numpy", batch_size=None,
                        fn_kwargs={"spec": spec, "tracker": tracker})
    ds = ds.map_batches(_process_in_pieces, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"spec": spec})
    if data_cfg.preserve_order:
        ds.context.execution_options = ingest_options(data_cfg)
    ds._sarjepa_bad_rows = tracker  # type: ignore[attr-defined]  # see dataset_tracker
    return ds


def shards_per_read_task(rows: Sequence[int], cpus: float) -> int:
    """Shard files per read task: about ``READ_TASK_ROWS`` rows, at least ``READ_TASKS_PER_CPU``
    tasks per CPU of the cluster (``cpus``), at least one file."""
    if not rows:
        return 1
    mean_rows = max(1.0, sum(rows) / len(rows))
    by_rows = int(READ_TASK_ROWS // mean_rows)
    by_parallelism = len(rows) // max(1, int(READ_TASKS_PER_CPU * max(1.0, cpus)))
    return max(1, min(by_rows, by_parallelism))


def _import_pipeline() -> int:
    from sarjepa_dist.transforms import prepare_inputs  # noqa: F401  (torch with it)

    return os.getpid()


def read_workers_to_warm(cluster_cpus: float, reserved_cpus: float, most: int = 8) -> int:
    """One per whole CPU left beside ``reserved_cpus``, at least 1, at most ``most``."""
    return min(most, max(1, int(cluster_cpus - reserved_cpus)))


def warm_read_workers(reserved_cpus: float, env_vars: dict[str, str] | None = None, most: int = 8) -> list[Any]:
    """Start a Ray task worker per CPU the trainer leaves free (the cluster's CPUs less
    ``reserved_cpus``; at least 1, at most ``most``), each importing the transforms (torch with
    them: seconds on a small machine) now, while Ray Train's controller and workers start, so that
    the first epoch's read tasks find warm workers. Ray reuses a worker only for tasks of the same
    runtime environment: ``env_vars`` are those the tasks will run with. Fire and forget (the refs
    are returned for tests); ``num_cpus=0``, so they never delay the trainer."""
    import ray

    count = read_workers_to_warm(_cluster_cpus(), reserved_cpus, most)
    task = ray.remote(num_cpus=0, max_retries=0, runtime_env={"env_vars": dict(env_vars or {})})(_import_pipeline)
    return [task.remote() for _ in range(count)]


def _cluster_cpus() -> float:
    import ray

    try:
        return float(ray.cluster_resources().get("CPU", 1.0)) if ray.is_initialized() else 1.0
    except Exception:  # a cluster that does not answer here fails later with its own error
        return 1.0


def ingest_options(data_cfg: DataConfig) -> "ray.data.ExecutionOptions":
    """Ray Data execution options for streaming a training epoch: the current context's, with
    ``preserve_order`` from ``data.preserve_order`` (Ray Train applies them to the trainer's dataset
    through its ``DataConfig``; ``build_dataset`` to every later epoch's)."""
    import copy

    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = options.preserve_order or data_cfg.preserve_order
    return options


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
