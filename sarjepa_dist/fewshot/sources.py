"""Feature sources: what each column of a few-shot comparison computes its features from.

- an encoder (checkpoint dir, export dir/.safetensors, local or ``s3://``; or ``random-init`` with
  ``cfg.model``'s architecture, seeded by ``cfg.fewshot.seed``): the EMA encoder (what
  ``model.io.load_encoder`` returns), fed the *context* domain by default (conditioned x when the
  encoder was trained with ``context_domain: raw``, ∇x when ``gradient``) or the *target* domain
  (``fewshot.feature_domain: target``: ∇x, or x for ``ema-pixel``), mean-pooled over patch tokens;
- ``raw-pixels``: log-amplitude pixels after the same centre crop/resize, flattened;
- ``gradient-maps``: the per-scale gradient-by-ratio maps, average-pooled to an 8×8 grid, flattened.

Each source carries a fingerprint: a hash of everything that determines its numbers (weights,
recipe, ``FEATURE_VERSION``), which names and guards its feature cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import dataclasses
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from sarjepa_dist import storage
from sarjepa_dist.config import Config, to_plain
from sarjepa_dist.fewshot.compute import GRADIENT_MAP_GRID, FeatureError, FeatureRecipe
from sarjepa_dist.model.io import (CONFIG_FILE, EXPORT_INFO, EXPORT_WEIGHTS, META_FILE, MODEL_FILE, STATE_FILE,
                                   load_encoder)
from sarjepa_dist.model.jepa import CONTEXT_INPUT

FEATURE_VERSION = 1  # bump when the numbers a recipe produces change (invalidates every cache)
BASELINES = ("raw-pixels", "gradient-maps")
CROPS_DESCRIPTION = "averaged over the chip and 5 crops of 15/16 of its side (centre, corners)"
# files an encoder spec may need, fetched from S3 into a temporary folder (optimizer.pt is not)
_ENCODER_FILES = (MODEL_FILE, CONFIG_FILE, META_FILE, STATE_FILE, EXPORT_WEIGHTS, EXPORT_INFO)


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

    @property
    def is_reference(self) -> bool:
        """What a pretrained encoder must beat: a hand-made baseline, or an untrained network."""
        return self.is_baseline or self.spec.startswith("random-init")

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
    if cfg.fewshot.tta == "hflip+crops":
        recipe = dataclasses.replace(recipe, tta=cfg.fewshot.tta)
        desc += f"; {CROPS_DESCRIPTION}"
    return FeatureSource(name=name, spec=name, recipe=recipe, domain=domain, domain_description=desc,
                         fingerprint=_fingerprint(recipe, None), info={"source": "baseline", "lineage": {}})


def _fetch_encoder_spec(spec: str, dest: str) -> str:
    """Copy an ``s3://`` checkpoint/export (only the files a loader reads) into ``dest``; return the
    local path to hand to ``load_encoder``."""
    if spec.endswith(".safetensors"):
        folder, name = spec.rsplit("/", 1)
        storage.download_named(folder, [name, name[: -len(".safetensors")] + ".json", EXPORT_INFO], dest)
        return os.path.join(dest, name)
    if not storage.download_named(spec, _ENCODER_FILES, dest):
        raise FeatureError(f"encoder {storage.redact(spec)}: no checkpoint (model.safetensors) or export "
                           f"(encoder.safetensors) files there")
    return dest


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _load(spec: str, cfg: Config) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The EMA encoder named by ``spec`` and its ``model.io`` info; remote specs are read via a
    temporary local copy, their lineage naming the remote checkpoint."""
    if spec.startswith("random-init"):
        return load_encoder(spec, model_cfg=cfg.model, img_size=cfg.data.img_size, in_chans=cfg.data.channels,
                            seed=cfg.fewshot.seed)
    if storage.is_s3(spec):
        with tempfile.TemporaryDirectory(prefix="sarjepa-enc-") as tmp:
            model, info = load_encoder(_fetch_encoder_spec(spec, tmp))
        lineage = dict(info.get("lineage") or {})
        if info.get("source") == "checkpoint":  # not the temporary copy it was loaded from
            lineage["checkpoint"] = storage.redact(spec)
        return model, {**info, "spec": spec, "lineage": lineage}
    local = spec[len("file://"):] if spec.startswith("file://") else spec
    if not os.path.exists(local):
        raise FeatureError(f"encoder {spec!r}: no such file or folder (give a checkpoint dir, an export "
                           f"dir or .safetensors, 'random-init', 'raw-pixels' or 'gradient-maps')")
    return load_encoder(local)


def _encoder_input(feature_domain: str, context_domain: str, target_mode: str, conditioning: str,
                   gradient: Mapping[str, Any]) -> tuple[str, str]:
    """Which ``prepare_inputs`` output feeds the encoder in ``feature_domain``, and its description."""
    if feature_domain == "context":
        inp = CONTEXT_INPUT[context_domain]
        domain = f"context domain ({context_domain})"
    else:
        inp = "x" if target_mode == "ema-pixel" else "gx"
        domain = f"target domain ({target_mode})"
    fed = f"conditioned x ({conditioning})" if inp == "x" else f"∇x ({gradient.get('domain')})"
    return inp, f"{domain}: {fed}"


def encoder_source(spec: str, cfg: Config, name: str | None = None) -> FeatureSource:
    """Load the encoder named by ``spec`` (via ``model.io.load_encoder``) and describe its features."""
    few = cfg.fewshot
    model, info = _load(spec, cfg)
    # what the encoder was trained on: its own record, else (random init) this config
    conditioning = info.get("conditioning") or cfg.data.conditioning
    gradient = info.get("gradient") or to_plain(cfg.gradient)
    context_domain = info.get("context_domain") or cfg.model.context_domain
    target_mode = info.get("target_mode") or cfg.model.target_mode
    inp, desc = _encoder_input(few.feature_domain, context_domain, target_mode, conditioning, gradient)
    weights = info.get("weights", "unknown")
    desc += f"; {few.pooling}-pooled tokens of the {'EMA target' if weights == 'ema-target' else weights} encoder"
    if few.tta != "none":
        desc += ", averaged with its azimuth mirror's"
    if few.tta == "hflip+crops":
        desc += f"; {CROPS_DESCRIPTION}"
    recipe = FeatureRecipe(kind="encoder", img_size=int(info.get("img_size") or model.img_size),
                           channels=int(info.get("in_chans") or model.in_chans), conditioning=conditioning,
                           gradient=dict(gradient), input=inp, pooling=few.pooling,
                           timm_kwargs=_json_safe(model.timm_kwargs), tta=few.tta)
    state = _state_numpy(model)
    info = _json_safe({**info, "spec": storage.redact(spec), "lineage": dict(info.get("lineage") or {}),
                       "conditioning": conditioning, "gradient": gradient, "context_domain": context_domain,
                       "target_mode": target_mode})
    return FeatureSource(name=name if name is not None else _default_name(spec, info), spec=storage.redact(spec),
                         recipe=recipe, domain=few.feature_domain, domain_description=desc,
                         fingerprint=_fingerprint(recipe, _hash_state(state)), state=state, info=info)


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
