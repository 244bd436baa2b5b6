"""Ingest as a Ray job: the same ingest functions, with their per-file / per-row-band work and their
shard writes run as Ray tasks.

``with ray_ingest(address): ingest_images(...)`` (what ``sarjepa ingest ... --ray-address`` does)
swaps two things for the length of the block, and nothing else:

* ``core.ordered_map`` — decode + crop + quality checks of image files, and the tiling of scene row
  bands — runs its items in Ray tasks (``ITEMS_PER_TASK`` a task, at most ``window`` tasks in flight)
  and still yields the results in input order;
* ``commit_chips`` writes with :class:`ParallelShardWriter`: the driver cuts shards exactly where
  ``ShardWriter`` cuts them (same rows, same order, same byte budget), and each shard's Parquet
  encoding, compression, sha256 and upload run in a Ray task. The manifest is written last, by the
  driver, once every shard task has returned, exactly as the single-process path writes it.

So for the same input both paths give the same chips, the same shards and the same ``dataset_id``.
An ingest that dies half-way leaves only an uncommitted ``data-<version>/`` folder beside the last
good manifest; the next ingest into the same destination commits its own version and removes every
other one, so nothing is read twice.

Array stacks are sliced from memory maps on the driver (cheap); only their shard writing is
distributed. The chips pass through the driver on their way to the shard tasks: decoding is spread
over the cluster, the driver moves bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa

from sarjepa_dist import storage
from sarjepa_dist.config import RayConfig
from sarjepa_dist.data import shards
from sarjepa_dist.data.ingest import core

T = TypeVar("T")
R = TypeVar("R")

ITEMS_PER_TASK = 16  # files or row bands per Ray task: amortises the task overhead (~ms)


def _map_items(fn: Callable[[T], R], items: list[T], storage_cfg: tuple[str | None, str | None]) -> list[R]:
    storage.configure(*storage_cfg)
    return [fn(item) for item in items]


def _storage_cfg() -> tuple[str | None, str | None]:
    settings = storage.s3_settings()
    return settings.endpoint_url, settings.region


def _write_shard(root: str, rel: str, rows: dict[str, list], row_group_rows: int,
                 storage_cfg: tuple[str | None, str | None]) -> shards.ShardInfo:
    storage.configure(*storage_cfg)
    table = pa.Table.from_pydict(rows, schema=shards.CHIP_SCHEMA)
    payload = shards.encode_shard(table, row_group_rows)
    storage.write_bytes(storage.join(root, rel), payload)
    return shards.ShardInfo(rel, table.num_rows, hashlib.sha256(payload).hexdigest(), len(payload))


class RayBackend:
    """Where ``core.ordered_map`` and ``core.commit_chips`` send their work inside ``ray_ingest``."""

    def __init__(self, window: int, items_per_task: int = ITEMS_PER_TASK):
        import ray

        self.ray = ray
        self.window = window
        self.items_per_task = items_per_task
        self._map = ray.remote(num_cpus=1)(_map_items)
        self._write = ray.remote(num_cpus=1)(_write_shard)

    def ordered_map(self, fn: Callable[[T], R], items: list[T], items_per_task: int | None = None) -> Iterator[R]:
        """``map(fn, items)`` in Ray tasks of ``items_per_task`` items, in order, ``window`` tasks in flight."""
        ray = self.ray
        fn_ref = ray.put(fn)
        step = items_per_task or self.items_per_task
        chunks = (items[i:i + step] for i in range(0, len(items), step))
        pending: list[Any] = []
        for chunk in chunks:
            pending.append(self._map.remote(fn_ref, chunk, _storage_cfg()))
            while len(pending) >= self.window:
                yield from ray.get(pending.pop(0))
        for ref in pending:
            yield from ray.get(ref)

    def writer(self, *args: Any, **kwargs: Any) -> "ParallelShardWriter":
        return ParallelShardWriter(self, *args, **kwargs)


class ParallelShardWriter(shards.ShardWriter):
    """``ShardWriter`` whose shards are encoded and written by Ray tasks (same cuts, same bytes)."""

    def __init__(self, backend: RayBackend, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._backend = backend
        self._pending: list[Any] = []  # shard-write task refs, in shard order

    def _flush(self) -> None:
        if not self._rows["chip_id"]:
            return
        rel = f"{self.version_dir}/shard-{len(self._shards) + len(self._pending):05d}.parquet"
        self._pending.append(self._backend._write.remote(self.root, rel, self._rows, self.row_group_rows,
                                                         _storage_cfg()))
        self._rows = {f.name: [] for f in shards.CHIP_SCHEMA}
        self._pending_bytes = 0
        while len(self._pending) > self._backend.window:  # bound the chips held in the object store
            self._collect(1)

    def _collect(self, n: int | None = None) -> None:
        take = self._pending if n is None else self._pending[:n]
        self._shards.extend(self._backend.ray.get(take))
        self._pending = self._pending[len(take):]

    def commit(self) -> shards.Manifest:
        self._flush()
        self._collect()  # every shard is written before the manifest names it
        return super().commit()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._backend.ray.wait(self._pending, num_returns=len(self._pending))
        super().abort()


@contextlib.contextmanager
def ray_ingest(address: str | None, window: int = 8) -> Iterator[RayBackend]:
    """Run the ingests called inside this block on the Ray cluster at ``address`` ('local': a new
    one on this machine; None: ``RAY_ADDRESS``)."""
    from sarjepa_dist.cluster import ray_init

    ray_init(RayConfig(address=address))
    backend = RayBackend(window)
    with core.use_backend(backend):
        yield backend
