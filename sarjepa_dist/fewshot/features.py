"""Frozen features for few-shot evaluation: what to compute (recipes), how (per batch, pure torch),
where (Ray Data batch inference over the shards) and the on-disk cache.

Feature sources:

- an encoder (checkpoint dir, export dir/.safetensors, local or ``s3://``; or ``random-init`` with
  ``cfg.model``'s architecture, seeded by ``cfg.fewshot.seed``): the EMA encoder (what
  ``model.io.load_encoder`` returns), fed the *context* domain by default (conditioned x when the
  encoder was trained with ``context_domain: raw``, ∇x when ``gradient``) or the *target* domain
  (``fewshot.feature_domain: target``: ∇x, or x for ``ema-pixel``), mean-pooled over patch tokens;
- ``raw-pixels``: log-amplitude pixels after the same centre crop/resize, flattened;
- ``gradient-maps``: the per-scale gradient-by-ratio maps, average-pooled to an 8×8 grid, flattened.

Every source runs through the same path: shards → ``ray.data.read_parquet`` → ``map_batches`` with
:class:`ChipFeatureUDF` on an actor pool (one GPU per actor when the cluster has GPUs) → one
``(chip_ids, features, ok)`` table per dataset, cached as
``<out>/features/<source-key>__<dataset_id[:12]>__<domain>.npz``. The source key ends in a hash of
everything that determines the numbers (weights, preprocessing, pooling, code version), and the
file records that fingerprint and the full dataset id, so a changed checkpoint, dataset or domain
can never be served a stale file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from sarjepa_dist import storage
from sarjepa_dist.config import Config, DataConfig, GradientConfig, to_plain
from sarjepa_dist.data import shards
from sarjepa_dist.errors import SarjepaError

log = logging.getLogger(__name__)

FEATURE_VERSION = 1  # bump when the numbers a recipe produces change (invalidates every cache)
BASELINES = ("raw-pixels", "gradient-maps")
GRADIENT_MAP_GRID = 8
# files an encoder spec may need, fetched from S3 into a temporary folder (optimizer.pt is not)
_ENCODER_FILES = ("model.safetensors", "config.json", "meta.json", "state.json", "encoder.safetensors",
                  "encoder.json")


class FeatureError(SarjepaError, RuntimeError):
    """Features cannot be computed as configured; the message names the encoder and the cause."""


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything a worker needs, besides weights, to turn amplitude chips into feature vectors."""

    kind: str  # encoder | raw-pixels | gradient-maps
    img_size: int
    channels: int
    conditioning: str  # amplitude | log | db
    gradient: dict[str, Any]  # GradientConfig fields
    input: str  # x | gx | gfeat: which prepare_inputs output feeds the encoder / baseline
    pooling: str  # mean | flatten | avgpool
    pool_grid: int | None = None
    timm_kwargs: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


@dataclass
class FeatureSource:
    """One column of the comparison: a named encoder or baseline, its recipe, weights and lineage."""

    name: str  # display name, unique within a report
    spec: str  # what the config said (redacted)
    recipe: FeatureRecipe
    domain: str  # context | target | log-pixels | gradient-maps
    domain_description: str  # e.g. "context domain: conditioned x (log)"
    fingerprint: str  # sha256 over weights + recipe + FEATURE_VERSION
    state: dict[str, np.ndarray] | None = None  # MaskedViT state dict (None for baselines)
    info: dict[str, Any] = field(default_factory=dict)  # model.io info (lineage etc.), JSON-safe
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-")[:48] or "encoder"
        return f"{slug}-{self.fingerprint[:12]}"

    @property
    def is_baseline(self) -> bool:
        return self.recipe.kind in BASELINES

    def cache_name(self, dataset_id: str) -> str:
        return f"{self.key}__{dataset_id[:12]}__{self.domain}.npz"


def _hash_state(state: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        a = np.ascontiguousarray(state[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fingerprint(recipe: FeatureRecipe, weights_hash: str | None) -> str:
    blob = json.dumps({"v": FEATURE_VERSION, "recipe": recipe.to_dict(), "weights": weights_hash},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _state_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
            for k, v in model.state_dict().items()}


def baseline_source(name: str, cfg: Config) -> FeatureSource:
    """``raw-pixels`` or ``gradient-maps`` at ``cfg.data.img_size`` with ``cfg.gradient``."""
    grad = to_plain(cfg.gradient)
    if name == "raw-pixels":
        recipe = FeatureRecipe(kind=name, img_size=cfg.data.img_size, channels=cfg.data.channels,
                               conditioning="log", gradient=grad, input="x", pooling="flatten")
        desc = f"log-amplitude pixels, centre crop/resize to {cfg.data.img_size}, flattened"
        domain = "log-pixels"
    elif name == "gradient-maps":
        recipe = FeatureRecipe(kind=name, img_size=cfg.data.img_size, channels=cfg.data.channels,
                               conditioning=cfg.data.conditioning, gradient=grad, input="gfeat",
                               pooling="avgpool", pool_grid=GRADIENT_MAP_GRID)
        desc = (f"{cfg.gradient.domain} maps at radii {list(cfg.gradient.radii)}, one per scale, "
                f"average-pooled to {GRADIENT_MAP_GRID}×{GRADIENT_MAP_GRID}, flattened")
        domain = "gradient-maps"
    else:
        raise FeatureError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
    return FeatureSource(name=name, spec=name, recipe=recipe, domain=domain, domain_description=desc,
                         fingerprint=_fingerprint(recipe, None), info={"source": "baseline", "lineage": {}})


def _fetch_encoder_spec(spec: str, dest: str) -> str:
    """Copy an ``s3://`` checkpoint/export (only the files a loader reads) into ``dest``; return the
    local path to hand to ``load_encoder``."""
    if spec.endswith(".safetensors"):
        parent = spec.rsplit("/", 1)[0]
        base = spec.rsplit("/", 1)[1]
        wanted = [spec, spec[: -len(".safetensors")] + ".json", storage.join(parent, "encoder.json")]
        local = os.path.join(dest, base)
        for uri in wanted:
            if storage.exists(uri):
                with open(os.path.join(dest, uri.rsplit("/", 1)[1]), "wb") as f:
                    f.write(storage.read_bytes(uri))
        return local
    found = False
    for name in _ENCODER_FILES:
        uri = storage.join(spec, name)
        if storage.exists(uri):
            found = True
            with open(os.path.join(dest, name), "wb") as f:
                f.write(storage.read_bytes(uri))
    if not found:
        raise FeatureError(f"encoder {storage.redact(spec)}: no checkpoint (model.safetensors) or export "
                           f"(encoder.safetensors) files there")
    return dest


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def encoder_source(spec: str, cfg: Config, name: str | None = None) -> FeatureSource:
    """Load the encoder named by ``spec`` (via ``model.io.load_encoder``) and describe its features."""
    from sarjepa_dist.model.io import load_encoder

    fs_cfg = cfg.fewshot
    if spec.startswith("random-init"):
        model, info = load_encoder(spec, model_cfg=cfg.model, img_size=cfg.data.img_size,
                                   in_chans=cfg.data.channels, seed=fs_cfg.seed)
    elif storage.is_s3(spec):
        with tempfile.TemporaryDirectory(prefix="sarjepa-enc-") as tmp:
            model, info = load_encoder(_fetch_encoder_spec(spec, tmp))
        lineage = dict(info.get("lineage") or {})
        if info.get("source") == "checkpoint":  # not the temporary copy it was loaded from
            lineage["checkpoint"] = storage.redact(spec)
        info = {**info, "spec": spec, "lineage": lineage}
    else:
        local = spec[len("file://"):] if spec.startswith("file://") else spec
        if not os.path.exists(local):
            raise FeatureError(f"encoder {spec!r}: no such file or folder (give a checkpoint dir, an export "
                               f"dir or .safetensors, 'random-init', 'raw-pixels' or 'gradient-maps')")
        model, info = load_encoder(local)
    # what the encoder was trained on: its own record, else (random init) this config
    conditioning = info.get("conditioning") or cfg.data.conditioning
    gradient = info.get("gradient") or to_plain(cfg.gradient)
    context_domain = info.get("context_domain") or cfg.model.context_domain
    target_mode = info.get("target_mode") or cfg.model.target_mode
    img_size = int(info.get("img_size") or model.img_size)
    channels = int(info.get("in_chans") or model.in_chans)
    notes: list[str] = []
    if fs_cfg.feature_domain == "context":
        inp = "x" if context_domain == "raw" else "gx"
        desc = (f"context domain ({context_domain}): "
                + (f"conditioned x ({conditioning})" if inp == "x" else f"∇x ({gradient.get('domain')})"))
    else:
        inp = "x" if target_mode == "ema-pixel" else "gx"
        desc = (f"target domain ({target_mode}): "
                + (f"conditioned x ({conditioning})" if inp == "x" else f"∇x ({gradient.get('domain')})"))
    pooling = "mean"
    if fs_cfg.pooling == "cls":
        has_cls = getattr(getattr(model, "vit", model), "cls_token", None) is not None
        if not has_cls:
            notes.append("pooling 'cls' requested but the encoder has no class token: mean-pooled patch tokens")
        else:  # pragma: no cover - MaskedViT never has one today
            pooling = "cls"
    weights = info.get("weights", "unknown")
    desc += f"; {pooling}-pooled tokens of the {'EMA target' if weights == 'ema-target' else weights} encoder"
    recipe = FeatureRecipe(kind="encoder", img_size=img_size, channels=channels, conditioning=conditioning,
                           gradient=dict(gradient), input=inp, pooling=pooling,
                           timm_kwargs=_json_safe(model.timm_kwargs))
    state = _state_numpy(model)
    fp = _fingerprint(recipe, _hash_state(state))
    lineage = dict(info.get("lineage") or {})
    if name is None:
        name = _default_name(spec, info)
    info = _json_safe({**info, "spec": storage.redact(spec), "lineage": lineage, "conditioning": conditioning,
                       "gradient": gradient, "context_domain": context_domain, "target_mode": target_mode})
    return FeatureSource(name=name, spec=storage.redact(spec), recipe=recipe, domain=fs_cfg.feature_domain,
                         domain_description=desc, fingerprint=fp, state=state, info=info, notes=notes)


def _default_name(spec: str, info: Mapping[str, Any]) -> str:
    if spec.startswith("random-init"):
        return spec
    lin = info.get("lineage") or {}
    run, step = lin.get("run_name"), lin.get("step")
    kind = info.get("source", "encoder")
    if run:
        return f"{run}@{step}" if step is not None else str(run)
    base = spec.rstrip("/").rsplit("/", 1)[-1]
    return f"{kind}:{base}"


def resolve_sources(cfg: Config) -> list[FeatureSource]:
    """One ``FeatureSource`` per entry of ``cfg.fewshot.encoders``, with unique names."""
    out: list[FeatureSource] = []
    seen: dict[str, int] = {}
    for spec in cfg.fewshot.encoders:
        src = baseline_source(spec, cfg) if spec in BASELINES else encoder_source(spec, cfg)
        if src.name in seen:
            seen[src.name] += 1
            src.name = f"{src.name}#{seen[src.name]}"
        else:
            seen[src.name] = 1
        out.append(src)
    return out


# --------------------------------------------------------------------------- per-batch compute (pure torch)


def build_model(recipe: FeatureRecipe, state: Mapping[str, np.ndarray] | None) -> torch.nn.Module | None:
    if recipe.kind != "encoder":
        return None
    from sarjepa_dist.model.encoder import MaskedViT

    model = MaskedViT(dict(recipe.timm_kwargs or {}))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in (state or {}).items()}, strict=True)
    return model.eval()


def compute_features(amplitude: np.ndarray | torch.Tensor, recipe: FeatureRecipe,
                     model: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """(B, C, H, W) amplitude chips → (B, D) float32 features, exactly as the Ray workers do it."""
    from sarjepa_dist.transforms import center_resize, prepare_inputs

    amp = torch.as_tensor(np.asarray(amplitude, dtype=np.float32)) if not torch.is_tensor(amplitude) \
        else amplitude.float()
    if amp.ndim != 4:
        raise FeatureError(f"chips must be (B, C, H, W); got shape {tuple(amp.shape)}")
    if amp.shape[1] != recipe.channels:
        raise FeatureError(f"chips have {amp.shape[1]} channel(s) but the {recipe.kind} expects "
                           f"{recipe.channels}; evaluate on data of the encoder's channel layout")
    amp = amp.to(device)
    amp = center_resize(amp, recipe.img_size)
    data_cfg = DataConfig(img_size=recipe.img_size, channels=recipe.channels, conditioning=recipe.conditioning)
    grad_kwargs = dict(recipe.gradient)
    if "radii" in grad_kwargs:
        grad_kwargs["radii"] = tuple(grad_kwargs["radii"])
    grad_cfg = GradientConfig(**grad_kwargs)
    with torch.no_grad():
        inputs = prepare_inputs(amp, data_cfg, grad_cfg, need=(recipe.input,))
        z = inputs[recipe.input].float()
        if recipe.kind == "encoder":
            if model is None:
                raise FeatureError("an encoder recipe needs its model")
            tokens = model(z)
            feats = tokens[:, 0] if recipe.pooling == "cls" else tokens.mean(dim=1)
        elif recipe.pooling == "flatten":
            feats = z.flatten(1)
        elif recipe.pooling == "avgpool":
            g = int(recipe.pool_grid or GRADIENT_MAP_GRID)
            feats = torch.nn.functional.adaptive_avg_pool2d(z, (g, g)).flatten(1)
        else:
            raise FeatureError(f"unknown pooling {recipe.pooling!r}")
    return feats.float().cpu().numpy()


def decode_rows(chips: Sequence[bytes], shapes: Sequence[Any], dtypes: Sequence[str]
                ) -> tuple[list[np.ndarray | None], list[str | None]]:
    """Decode shard rows; bad ones become ``None`` with the ``BadChip`` reason."""
    arrays: list[np.ndarray | None] = []
    reasons: list[str | None] = []
    for data, shape, dtype in zip(chips, shapes, dtypes):
        try:
            arr = shards.decode_chip(data, [int(s) for s in shape], str(dtype))
            shards.check_chip(arr)
            arrays.append(arr)
            reasons.append(None)
        except shards.BadChip as exc:
            arrays.append(None)
            reasons.append(exc.reason)
    return arrays, reasons


class ChipFeatureUDF:
    """Ray Data ``map_batches`` callable: shard rows → ``{chip_id, path, ok, f0, f1, ...}``.

    One actor holds every source of the pass (column ``f<i>`` is source ``i``), so the shards are
    read and decoded once however many encoders are compared; models go to the actor's GPU when
    it has one. Rows that fail to decode come back with ``ok = False`` and zero features; chips
    of different shapes in one batch (two datasets) are processed shape by shape.
    """

    def __init__(self, recipes: list[dict[str, Any]], states: list[Any]):
        import ray

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.recipes = [FeatureRecipe(**r) for r in recipes]
        self.models = []
        for recipe, state in zip(self.recipes, states):
            if isinstance(state, ray.ObjectRef):
                state = ray.get(state)
            model = build_model(recipe, state)
            self.models.append(model.to(self.device) if model is not None else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays, _ = decode_rows(batch["chip"], batch["chip_shape"], batch["chip_dtype"])
        n = len(arrays)
        ok = np.array([a is not None for a in arrays], dtype=bool)
        groups: dict[tuple[tuple[int, ...], str], list[int]] = {}
        for i, a in enumerate(arrays):
            if a is not None:
                groups.setdefault((a.shape, a.dtype.str), []).append(i)
        out: dict[str, np.ndarray] = {"chip_id": np.asarray(batch["chip_id"]).astype(str),
                                      "path": np.asarray(batch["path"]).astype(str), "ok": ok}
        for j, (recipe, model) in enumerate(zip(self.recipes, self.models)):
            feats: np.ndarray | None = None
            for idx in groups.values():
                f = compute_features(np.stack([arrays[i] for i in idx]).astype(np.float32), recipe, model,
                                     self.device)
                if feats is None:
                    feats = np.zeros((n, f.shape[1]), dtype=np.float32)
                feats[idx] = f
            out[f"f{j}"] = feats if feats is not None else np.zeros((n, 0), dtype=np.float32)
        return out


# --------------------------------------------------------------------------- Ray Data extraction


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


def actor_plan(resources: Mapping[str, float], gpu: bool | None = None) -> dict[str, Any]:
    """Actor-pool size and per-actor resources: one actor per GPU when there are GPUs, else CPU
    actors that leave at least one CPU free for the Parquet read tasks (or Ray Data stalls)."""
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    if gpu is None:
        gpu = gpus > 0
    if gpu and gpus > 0:
        return {"size": gpus, "num_gpus": 1, "num_cpus": 1}
    actors = max(1, min(4, cpus // 8))
    per_actor = max(1, min(8, (cpus - 1) // actors)) if cpus > 1 else 1
    return {"size": actors, "num_gpus": 0, "num_cpus": per_actor}


def _parquet_source(uris: Sequence[str]) -> tuple[Any, list[str]]:
    fs = None
    paths = []
    for uri in uris:
        f, p = storage.resolve(uri)
        fs = fs or f
        paths.append(p)
    return fs, paths


def extract_features(sources: Sequence[FeatureSource], datasets: Mapping[str, str], *, batch_size: int = 64,
                     gpu: bool | None = None, connect: Callable[[], None] | None = None
                     ) -> dict[str, dict[str, FeatureTable]]:
    """Ray Data batch inference of every source over every dataset (``dataset_id → root``) in one
    pass: the shards are read once and each actor runs all sources. Returns
    ``{source.name: {dataset_id: FeatureTable}}``. ``connect()`` is called first (e.g. to start or
    join the Ray cluster); without it a Ray connection must already exist.
    """
    import ray

    if connect is not None:
        connect()
    sources = list(sources)
    path_to_ds: dict[str, str] = {}
    uris: list[str] = []
    for dataset_id, root in datasets.items():
        for uri in shards.shard_uris(root):
            uris.append(uri)
            path_to_ds[storage.resolve(uri)[1]] = dataset_id
    fs, paths = _parquet_source(uris)
    total, free = ray.cluster_resources(), ray.available_resources()
    # size the pool by the CPUs free now (a sweep trial shares the cluster with training workers)
    cpus = free.get("CPU", 0) if free.get("CPU", 0) >= 2 else total.get("CPU", 1)
    plan = actor_plan({"CPU": cpus, "GPU": total.get("GPU", 0)}, gpu)
    state_refs = [ray.put(s.state) if s.state is not None else None for s in sources]
    t0 = time.time()
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["chip_id", "chip", "chip_shape", "chip_dtype"],
                               include_paths=True, partitioning=None)
    ds = ds.map_batches(
        ChipFeatureUDF,
        fn_constructor_kwargs={"recipes": [s.recipe.to_dict() for s in sources], "states": state_refs},
        batch_size=int(batch_size),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan["size"]),
        num_gpus=plan["num_gpus"] or None,
        num_cpus=plan["num_cpus"],
    )
    columns = ["chip_id", "ok", *[f"f{j}" for j in range(len(sources))]]
    parts: dict[str, list[dict[str, np.ndarray]]] = {k: [] for k in datasets}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        owners = np.array([_owner(p, path_to_ds) for p in batch["path"].tolist()])
        for dataset_id in datasets:
            sel = owners == dataset_id
            if sel.any():
                parts[dataset_id].append({k: np.asarray(batch[k])[sel] for k in columns})
    log.info("extracted features of %s in %.1fs with %d actor(s) (%s)", [s.name for s in sources],
             time.time() - t0, plan["size"], "GPU" if plan["num_gpus"] else "CPU")
    out: dict[str, dict[str, FeatureTable]] = {s.name: {} for s in sources}
    for dataset_id, bits in parts.items():
        if not bits:
            raise FeatureError(f"Ray Data returned no rows for dataset {datasets[dataset_id]}")
        ids = np.concatenate([b["chip_id"] for b in bits]).astype(str)
        ok = np.concatenate([b["ok"] for b in bits]).astype(bool)
        for j, src in enumerate(sources):
            col = f"f{j}"
            dim = max(b[col].shape[1] for b in bits)  # all-bad batches carry 0-wide features
            feats = np.concatenate([b[col] if b[col].shape[1] == dim else np.zeros((len(b[col]), dim), np.float32)
                                    for b in bits]).astype(np.float32)
            out[src.name][dataset_id] = FeatureTable(chip_ids=ids, features=feats, ok=ok)
    return out


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
        payload = storage.read_bytes(uri)
        t = pq.read_table(io.BytesIO(payload), columns=["chip_id", "chip", "chip_shape", "chip_dtype"]).to_pydict()
        for start in range(0, len(t["chip_id"]), batch_size):
            sl = slice(start, start + batch_size)
            arrays, _ = decode_rows(t["chip"][sl], t["chip_shape"][sl], t["chip_dtype"][sl])
            good = [i for i, a in enumerate(arrays) if a is not None]
            f = np.zeros((len(arrays), 0), np.float32)
            if good:
                fg = compute_features(np.stack([arrays[i] for i in good]).astype(np.float32), source.recipe,
                                      model, device)
                f = np.zeros((len(arrays), fg.shape[1]), np.float32)
                f[good] = fg
            ids.extend(t["chip_id"][sl])
            feats.append(f)
            oks.append(np.array([a is not None for a in arrays]))
    dim = max(f.shape[1] for f in feats)
    feats = [f if f.shape[1] == dim else np.zeros((len(f), dim), np.float32) for f in feats]
    return FeatureTable(np.array(ids, dtype=str), np.concatenate(feats), np.concatenate(oks))


# --------------------------------------------------------------------------- cache


def cache_uri(out: str, source: FeatureSource, dataset_id: str) -> str:
    return storage.join(out, "features", source.cache_name(dataset_id))


def save_cache(uri: str, table: FeatureTable, source: FeatureSource, dataset_id: str) -> None:
    meta = {"fingerprint": source.fingerprint, "dataset_id": dataset_id, "source": source.name,
            "domain": source.domain, "recipe": source.recipe.to_dict(), "feature_version": FEATURE_VERSION}
    buf = io.BytesIO()
    np.savez(buf, chip_ids=table.chip_ids.astype(str), features=table.features, ok=table.ok,
             meta=np.array(json.dumps(meta)))
    storage.write_bytes(uri, buf.getvalue())


def load_cache(uri: str, source: FeatureSource, dataset_id: str) -> FeatureTable | None:
    """The cached table when it exists and was made by this exact source on this dataset."""
    if not storage.exists(uri):
        return None
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("fingerprint") != source.fingerprint or meta.get("dataset_id") != dataset_id:
                log.warning("feature cache %s was made by another encoder/dataset; recomputing", uri)
                return None
            return FeatureTable(z["chip_ids"].astype(str), z["features"].astype(np.float32), z["ok"].astype(bool))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("feature cache %s is unreadable (%s); recomputing", uri, exc)
        return None


def features_for(sources: Sequence[FeatureSource], datasets: Mapping[str, str], out: str | None, *,
                 batch_size: int = 64, ensure_ray: Callable[[], None] | None = None
                 ) -> tuple[dict[str, dict[str, FeatureTable]], dict[str, dict[str, Any]]]:
    """Features of every source on every dataset (``dataset_id → root``): from the cache under
    ``out`` when present, else in one Ray Data pass over whatever is missing (``ensure_ray`` is
    handed to ``extract_features`` as ``connect``), then cached.

    Returns ``{source.name: {dataset_id: table}}`` and a per-source record (cached / extracted
    dataset ids, seconds, cache files).
    """
    tables: dict[str, dict[str, FeatureTable]] = {s.name: {} for s in sources}
    files: dict[str, dict[str, str]] = {s.name: {} for s in sources}
    for src in sources:
        for dataset_id in datasets:
            if out is None:
                continue
            uri = cache_uri(out, src, dataset_id)
            files[src.name][dataset_id] = uri
            hit = load_cache(uri, src, dataset_id)
            if hit is not None:
                tables[src.name][dataset_id] = hit
    todo = [s for s in sources if any(d not in tables[s.name] for d in datasets)]
    missing = {s.name: sorted(d for d in datasets if d not in tables[s.name]) for s in sources}
    seconds = 0.0
    if todo:
        need = {d: r for d, r in datasets.items() if any(d in missing[s.name] for s in todo)}
        t0 = time.time()
        fresh = extract_features(todo, need, batch_size=batch_size, connect=ensure_ray)
        seconds = time.time() - t0
        for src in todo:
            for dataset_id in missing[src.name]:
                table = fresh[src.name][dataset_id]
                tables[src.name][dataset_id] = table
                if out is not None:
                    save_cache(files[src.name][dataset_id], table, src, dataset_id)
    records = {s.name: {"cached": sorted(d for d in datasets if d not in missing[s.name]),
                        "extracted": missing[s.name],
                        "extract_seconds": round(seconds, 2) if missing[s.name] else 0.0,
                        "cache_files": {d: storage.redact(u) for d, u in files[s.name].items()}}
               for s in sources}
    return tables, records
