"""Features of every shard row: Ray Data batch inference over the shards, or the same in-process.

Every source runs through the same pass: shards → ``map_batches`` on an actor pool (one GPU per
actor when the cluster has GPUs) → one ``(chip_ids, features, ok)`` :class:`FeatureTable` per
dataset. Who reads the shards depends on the pool (:func:`actor_plan`):

- several actors or GPU actors: ``ray.data.read_parquet`` tasks read on the CPUs the actors leave
  free and :class:`ChipFeatureUDF` computes, so reading overlaps inference across the cluster;
- one CPU actor: :class:`ShardFeatureUDF` reads each shard itself (the next one in a thread while
  it computes). That actor is compute-bound, and Ray Data's list/read tasks would each start a
  worker process (Python, Ray Data, pandas) competing with it for the few cores of a small node.

:func:`extract_local` computes the same numbers without Ray (small datasets, tests, debugging).
"""

from __future__ import annotations

import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from sarjepa_dist import storage
from sarjepa_dist.data import shards
from sarjepa_dist.fewshot.compute import FeatureError, FeatureRecipe, build_model, features_of_chips
from sarjepa_dist.fewshot.sources import FeatureSource

log = logging.getLogger(__name__)

_ROW_COLUMNS = ["chip_id", "chip", "chip_shape", "chip_dtype"]


@dataclass
class FeatureTable:
    """Features of every row of one dataset, in chip-id order of the extraction."""

    chip_ids: np.ndarray  # (N,) str
    features: np.ndarray  # (N, D) float32
    ok: np.ndarray  # (N,) bool: False where the chip could not be decoded

    def take(self, chip_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Features and ok flags of ``chip_ids`` (in that order); missing ids are an error."""
        index = {c: i for i, c in enumerate(self.chip_ids.tolist())}
        try:
            rows = np.array([index[c] for c in chip_ids], dtype=np.int64)
        except KeyError as exc:
            raise FeatureError(f"no feature row for chip {exc.args[0]!r}") from exc
        return self.features[rows], self.ok[rows]


def decode_rows(chips: Sequence[bytes], shapes: Sequence[Any], dtypes: Sequence[str]
                ) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode shard rows; bad ones become ``None`` with the ``BadChip`` reason."""
    arrays: list[np.ndarray | None] = []
    reasons: list[str | None] = []
    for data, shape, dtype in zip(chips, shapes, dtypes):
        try:
            arrays.append(shards.decode_checked(data, shape, dtype))
            reasons.append(None)
        except shards.BadChip as exc:
            arrays.append(None)
            reasons.append(exc.reason)
    return arrays, reasons


class _SourceModels:
    """Every source of the pass (output column ``f<i>`` is source ``i``), built once per actor, so
    the shards are read and decoded once however many encoders are compared; models go to the
    actor's GPU when it has one. Rows that fail to decode come back with ``ok = False`` and zero
    features."""

    def __init__(self, recipes: list[dict[str, Any]], states: list[Any]):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.recipes = [FeatureRecipe(**r) for r in recipes]
        self.models = []
        for recipe, state in zip(self.recipes, states):
            if isinstance(state, ray.ObjectRef):
                state = ray.get(state)
            model = build_model(recipe, state)
            self.models.append(model.to(self.device) if model is not None else None)

    def features(self, chip_ids: Sequence[str], paths: Sequence[str], chips: Sequence[bytes],
                 shapes: Sequence[Any], dtypes: Sequence[str]) -> dict[str, np.ndarray]:
        arrays, _ = decode_rows(chips, shapes, dtypes)
        out: dict[str, np.ndarray] = {"chip_id": np.asarray(chip_ids).astype(str),
                                      "path": np.asarray(paths).astype(str),
                                      "ok": np.array([a is not None for a in arrays], dtype=bool)}
        for j, (recipe, model) in enumerate(zip(self.recipes, self.models)):
            out[f"f{j}"] = features_of_chips(arrays, recipe, model, self.device)
        return out


class ChipFeatureUDF(_SourceModels):
    """Ray Data ``map_batches`` callable: shard rows (from ``read_parquet``) →
    ``{chip_id, path, ok, f0, f1, ...}``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.features(batch["chip_id"], batch["path"], batch["chip"], batch["chip_shape"], batch["chip_dtype"])


class ShardFeatureUDF(_SourceModels):
    """Ray Data ``map_batches`` callable over shard paths (column ``item``): reads each shard in the
    actor, the next one in a background thread while this one is computed, and yields
    ``{chip_id, path, ok, f0, f1, ...}`` per ``batch_size`` rows, the batches of :func:`extract_local`."""

    def __init__(self, recipes: list[dict[str, Any]], states: list[Any], filesystem: Any, batch_size: int):
        super().__init__(recipes, states)
        self.filesystem = filesystem
        self.batch_size = int(batch_size)

    def _read(self, path: str) -> dict[str, list]:
        return pq.read_table(path, filesystem=self.filesystem, columns=_ROW_COLUMNS).to_pydict()

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        paths = [str(p) for p in batch["item"]]
        with ThreadPoolExecutor(max_workers=1) as reader:
            pending = reader.submit(self._read, paths[0]) if paths else None
            for i, path in enumerate(paths):
                rows = pending.result()
                pending = reader.submit(self._read, paths[i + 1]) if i + 1 < len(paths) else None
                for start in range(0, len(rows["chip_id"]), self.batch_size):
                    sl = slice(start, start + self.batch_size)
                    ids = rows["chip_id"][sl]
                    yield self.features(ids, [path] * len(ids), rows["chip"][sl], rows["chip_shape"][sl],
                                        rows["chip_dtype"][sl])


def actor_plan(resources: Mapping[str, float], gpu: bool | None = None) -> dict[str, Any]:
    """Actor-pool size, per-actor resources and who reads the shards: one actor per GPU when there
    are GPUs, else CPU actors that leave at least one CPU free for the Parquet read tasks (or Ray
    Data stalls); a single CPU actor reads its shards itself (``reads = "actor"``, module docstring)."""
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    if gpu is None:
        gpu = gpus > 0
    if gpu and gpus > 0:
        return {"size": gpus, "num_gpus": 1, "num_cpus": 1, "reads": "tasks"}
    actors = max(1, min(4, cpus // 8))
    per_actor = max(1, min(8, (cpus - 1) // actors)) if cpus > 1 else 1
    return {"size": actors, "num_gpus": 0, "num_cpus": per_actor, "reads": "actor" if actors == 1 else "tasks"}


def _shard_paths(datasets: Mapping[str, str]) -> tuple[Any, list[str], dict[str, str]]:
    """The filesystem and paths of every shard of ``datasets``, and each path's dataset id."""
    fs = None
    paths: list[str] = []
    owners: dict[str, str] = {}
    for dataset_id, root in datasets.items():
        for uri in shards.shard_uris(root):
            f, path = storage.resolve(uri)
            fs = fs or f
            paths.append(path)
            owners[path] = dataset_id
    return fs, paths, owners


def _stack_features(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """One (N, D) float32 matrix; a batch with no good chip (0 wide) becomes zero rows."""
    dim = max(b.shape[1] for b in blocks)
    return np.concatenate([b if b.shape[1] == dim else np.zeros((len(b), dim), np.float32)
                           for b in blocks]).astype(np.float32)


def _feature_dataset(sources: Sequence[FeatureSource], fs: Any, paths: list[str], plan: Mapping[str, Any],
                     batch_size: int) -> Any:
    """The lazy Ray Data pass: shard paths → features, read as ``plan["reads"]`` says."""
    recipes = [s.recipe.to_dict() for s in sources]
    states = [ray.put(s.state) if s.state is not None else None for s in sources]
    resources = {"compute": ray.data.ActorPoolStrategy(size=plan["size"]), "num_gpus": plan["num_gpus"] or None,
                 "num_cpus": plan["num_cpus"], "batch_format": "numpy"}
    if plan["reads"] == "actor":
        return ray.data.from_items(paths, override_num_blocks=1).map_batches(
            ShardFeatureUDF, batch_size=None, **resources,
            fn_constructor_kwargs={"recipes": recipes, "states": states, "filesystem": fs, "batch_size": batch_size})
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=_ROW_COLUMNS, include_paths=True, partitioning=None)
    return ds.map_batches(ChipFeatureUDF, batch_size=int(batch_size), **resources,
                          fn_constructor_kwargs={"recipes": recipes, "states": states})


def extract_features(sources: Sequence[FeatureSource], datasets: Mapping[str, str], *, batch_size: int = 64,
                     gpu: bool | None = None, connect: Callable[[], None] | None = None,
                     reads: str | None = None) -> dict[str, dict[str, FeatureTable]]:
    """Ray Data batch inference of every source over every dataset (``dataset_id → root``) in one
    pass: the shards are read once and each actor runs all sources. Returns
    ``{source.name: {dataset_id: FeatureTable}}``. ``connect()`` is called first (e.g. to start or
    join the Ray cluster); without it a Ray connection must already exist. ``reads`` (``actor`` |
    ``tasks``) overrides who reads the shards (:func:`actor_plan`); the features are the same.
    """
    if connect is not None:
        connect()
    sources = list(sources)
    fs, paths, owners = _shard_paths(datasets)
    total, free = ray.cluster_resources(), ray.available_resources()
    # size the pool by the CPUs free now (a sweep trial shares the cluster with training workers)
    cpus = free.get("CPU", 0) if free.get("CPU", 0) >= 2 else total.get("CPU", 1)
    plan = actor_plan({"CPU": cpus, "GPU": total.get("GPU", 0)}, gpu)
    if reads is not None:
        if reads not in ("actor", "tasks"):
            raise FeatureError(f"reads = {reads!r}: choose 'actor' or 'tasks'")
        plan["reads"] = reads
    t0 = time.time()
    ds = _feature_dataset(sources, fs, paths, plan, batch_size)
    parts = _rows_by_dataset(ds, owners, datasets, columns=["chip_id", "ok", *[f"f{j}" for j in range(len(sources))]])
    log.info("extracted features of %s in %.1fs with %d actor(s) (%s, shards read by %s)", [s.name for s in sources],
             time.time() - t0, plan["size"], "GPU" if plan["num_gpus"] else "CPU",
             "the actor" if plan["reads"] == "actor" else "read tasks")
    out: dict[str, dict[str, FeatureTable]] = {s.name: {} for s in sources}
    for dataset_id, bits in parts.items():
        if not bits:
            raise FeatureError(f"Ray Data returned no rows for dataset {datasets[dataset_id]}")
        ids = np.concatenate([b["chip_id"] for b in bits]).astype(str)
        ok = np.concatenate([b["ok"] for b in bits]).astype(bool)
        for j, src in enumerate(sources):
            out[src.name][dataset_id] = FeatureTable(ids, _stack_features([b[f"f{j}"] for b in bits]), ok)
    return out


def _rows_by_dataset(ds: Any, owners: Mapping[str, str], datasets: Mapping[str, str], columns: Sequence[str]
                     ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Consume ``ds``, sorting each batch's ``columns`` by the dataset its rows were read from."""
    parts: dict[str, list[dict[str, np.ndarray]]] = {k: [] for k in datasets}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        batch_paths, row_path = np.unique(np.asarray(batch["path"]).astype(str), return_inverse=True)
        row_owners = np.array([_owner(p, owners) for p in batch_paths.tolist()])[row_path.reshape(-1)]
        for dataset_id in datasets:
            sel = row_owners == dataset_id
            if sel.any():
                parts[dataset_id].append({k: np.asarray(batch[k])[sel] for k in columns})
    return parts


def _owner(path: str, path_to_ds: Mapping[str, str]) -> str:
    if path in path_to_ds:
        return path_to_ds[path]
    for p, d in path_to_ds.items():  # Ray may report the path with or without a scheme/leading slash
        if path.endswith(p.lstrip("/")) or p.endswith(path.lstrip("/")):
            return d
    raise FeatureError(f"Ray Data returned a row from {path!r}, which is not a shard of any requested dataset")


def extract_local(source: FeatureSource, root: str, *, batch_size: int = 64,
                  device: str | torch.device = "cpu") -> FeatureTable:
    """The same numbers without Ray (small datasets, tests, debugging)."""
    model = build_model(source.recipe, source.state)
    if model is not None:
        model = model.to(device)
    ids, feats, oks = [], [], []
    for uri in shards.shard_uris(root):
        t = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=_ROW_COLUMNS).to_pydict()
        for start in range(0, len(t["chip_id"]), batch_size):
            sl = slice(start, start + batch_size)
            arrays, _ = decode_rows(t["chip"][sl], t["chip_shape"][sl], t["chip_dtype"][sl])
            ids.extend(t["chip_id"][sl])
            feats.append(features_of_chips(arrays, source.recipe, model, device))
            oks.append(np.array([a is not None for a in arrays]))
    return FeatureTable(np.array(ids, dtype=str), _stack_features(feats), np.concatenate(oks))
