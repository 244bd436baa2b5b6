"""What a Ray Train rank consumes: its shard of each epoch's dataset, and that shard's batches.

The data layer (``data/pipeline.py``) builds one dataset per epoch; this module hands it out to the
ranks and turns rows into tensors. Both the training loop and the pipeline tests use these
functions, so the tests exercise the loop's own code path.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import ray.data
import ray.train
import torch
import torch.distributed as dist

from sarjepa_dist.config import DataConfig, GradientConfig
from sarjepa_dist.data.badrows import BadDataError, BadRowTracker
from sarjepa_dist.data.pipeline import build_dataset, local_shuffle_seed, split_for_consumers
from sarjepa_dist.data.shuffle import shuffled_batches, table_pieces

__all__ = ["BAD_CHECK_EVERY", "BAD_CHECK_MIN_SEEN", "EpochStream", "epoch_shard", "epoch_stream",
           "iter_train_batches"]

BAD_CHECK_EVERY = 50  # batches between bad-fraction checks in iter_train_batches
BAD_CHECK_MIN_SEEN = 1000  # rows seen before a mid-epoch check may stop the run


def epoch_shard(data_cfg: DataConfig, gradient_cfg: GradientConfig, *, epoch: int, rank: int, world: int,
                need: Sequence[str], run_name: str | None, locality_hints: Sequence[str] | None = None,
                group: Any = None) -> "ray.data.DataIterator":
    """This rank's stream of ``epoch``; every rank calls it with the same arguments (a collective).

    Rank 0 builds the epoch's dataset (the epoch seeds the file order and every chip's
    augmentation, so a dataset is never reused across epochs), splits it with ``equal=True`` (every
    rank gets the same number of rows) and broadcasts the split iterators over the process
    ``group``. ``run_name`` keeps one bad-row tally across epochs (create the tracker on the driver
    so that it outlives any one worker). ``locality_hints``: the ranks' node ids, in rank order.
    """
    splits: list[Any] = [None]
    if rank == 0:
        ds = build_dataset(data_cfg, gradient_cfg, need=need, training=True, epoch=epoch, run_name=run_name)
        splits = [[ds.iterator()] if world == 1 else
                  split_for_consumers(ds, world, equal=True, locality_hints=locality_hints)]
    if world > 1:
        dist.broadcast_object_list(splits, src=0, group=group)
    return splits[0][rank]


def _train_rank() -> int:
    try:
        return int(ray.train.get_context().get_world_rank())
    except Exception:  # not inside a Ray Train worker
        return 0


def _to_torch(batch: dict[str, np.ndarray], device: torch.device | str) -> dict[str, Any]:
    device = torch.device(device)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k == "chip_id":
            out[k] = [str(s) for s in v]
            continue
        arr = np.asarray(v)
        if not arr.flags.writeable:  # zero-copy views of the object store are read-only
            arr = arr.copy()
        t = torch.from_numpy(arr)
        if device.type != "cpu":
            t = t.pin_memory().to(device, non_blocking=True)
        out[k] = t
    return out


def iter_train_batches(dataset_shard: "ray.data.DataIterator", data_cfg: DataConfig, *, epoch: int,
                       device: torch.device | str = "cpu", rank: int | None = None, drop_last: bool = True,
                       shuffle: bool = True, tracker: BadRowTracker | None = None,
                       prefetch_batches: int = 2) -> Iterator[dict[str, Any]]:
    """This rank's batches for one epoch: tensors on ``device`` plus ``chip_id`` (list of str).

    Batches hold exactly ``data_cfg.batch_size`` rows: the last partial batch is dropped
    (``drop_last=True``) so that, with ``split_for_consumers(..., equal=True)``, every rank takes
    the same number of steps. ``shuffle`` passes the rows through a local buffer of
    ``data_cfg.shuffle_buffer`` rows (``data.shuffle.ShuffleBuffer``) seeded by (seed, epoch,
    rank); ``rank`` defaults to the Ray Train world rank (0 outside Train).
    For evaluation pass ``drop_last=False, shuffle=False`` over an ``equal=False`` split.

    With ``tracker``, bad rows met so far are turned into ``BadRowWarning``s and the bad fraction
    is checked every ``BAD_CHECK_EVERY`` batches (once ``BAD_CHECK_MIN_SEEN`` rows were seen) and
    at the end of the epoch; ``BadDataError`` stops the run when it exceeds
    ``data_cfg.max_bad_fraction``.
    """
    rank = _train_rank() if rank is None else rank
    if shuffle and data_cfg.shuffle_buffer > 0:
        # Whole blocks as Arrow tables, shuffled here (``data/shuffle.py``: one copy a row, where
        # Ray's local shuffle buffer makes two); ``prefetch_batches`` counts blocks here.
        blocks = dataset_shard.iter_batches(batch_size=None, batch_format="pyarrow",
                                            prefetch_batches=prefetch_batches)
        batches: Iterable[dict[str, np.ndarray]] = shuffled_batches(
            table_pieces(blocks), batch_size=data_cfg.batch_size, buffer_rows=data_cfg.shuffle_buffer,
            seed=local_shuffle_seed(data_cfg.seed, epoch, rank), drop_last=drop_last)
    else:
        batches = dataset_shard.iter_batches(batch_size=data_cfg.batch_size, batch_format="numpy",
                                             drop_last=drop_last, prefetch_batches=prefetch_batches)
    for i, batch in enumerate(batches):
        yield _to_torch(batch, device)
        if tracker is not None and (i + 1) % BAD_CHECK_EVERY == 0:
            tracker.warn_new(tracker.check(data_cfg.max_bad_fraction, min_seen=BAD_CHECK_MIN_SEEN))
    if tracker is not None:
        try:
            snap = tracker.check(data_cfg.max_bad_fraction)
        except BadDataError:
            tracker.warn_new()
            raise
        tracker.warn_new(snap)


_END = object()


class EpochStream:
    """An epoch's batches whose first one is fetched on a background thread from construction on.

    Made while the previous epoch still trains, it overlaps the pipeline's start (Ray Data
    launching its read tasks, the local shuffle buffer filling) with those last steps; Ray Data's
    own ``prefetch_batches`` keeps the stream going after the first batch. Iterate it once, on one
    thread; ``close()`` stops a stream that will not be consumed. An error on the thread is
    raised where the first batch is asked for.
    """

    def __init__(self, make_batches: Callable[[], Iterable[dict[str, Any]]], name: str = "sarjepa-epoch-start"):
        self._make = make_batches
        self._batches: Iterator[dict[str, Any]] | None = None
        self._first: Any = _END
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch_first, name=name, daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._batches = iter(self._make())
            self._first = next(self._batches, _END)
        except BaseException as exc:  # re-raised on the consumer's thread
            self._error = exc

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is _END:
            return
        first, self._first = self._first, _END
        yield first
        assert self._batches is not None
        yield from self._batches

    def close(self) -> None:
        self._thread.join()
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


def epoch_stream(shard: "ray.data.DataIterator", data_cfg: DataConfig, *, epoch: int, device: torch.device | str,
                 rank: int) -> EpochStream:
    """A rank's training batches of ``epoch`` from its ``shard``, the first one already on its way."""
    return EpochStream(lambda: iter_train_batches(shard, data_cfg, epoch=epoch, device=device, rank=rank))
