"""Checkpoint directories, encoder exports and the one loader every consumer uses.

Checkpoint directory (all written to a hidden temporary sibling, then renamed into place, so a
crash mid-save never leaves a half-written checkpoint under the real name):

    model.safetensors  full SarJEPA state dict (encoder, target_encoder, predictor)
    optimizer.pt       torch.save(optimizer.state_dict()); loads with weights_only=True
    state.json         caller's loop state (step, epoch, data position, schedules)
    rng.pt             torch / CUDA / numpy / python RNG states, as tensors only (weights_only=True)
    config.json        the full Config as a dict
    <extra files>      the caller's (the training loop adds its metrics history and bad-row tally)
    meta.json          caller's meta (run name, step, dataset_id, ...) plus checkpoint_id, format
                       and ``files``: the sha256 of every other file, recorded as it was written

Integrity: nothing is unpickled beyond tensors (safetensors; ``torch.load(weights_only=True)``, and
a file that needs more is refused with ``CheckpointIntegrityError``), and every loader checks the
files against ``meta.json``'s sha256 first, so a checkpoint changed or truncated after it was
written is refused, naming the file. Exports record ``weights_sha256`` in ``encoder.json`` and are
checked the same way.

Export directory: ``encoder.safetensors`` (the EMA encoder's timm ``VisionTransformer`` state
dict, so ``VisionTransformer(**timm_kwargs)`` loads it with no project code) and ``encoder.json``
(timm kwargs, input conditioning, gradient operator, domains, lineage).

Paths are local here; the storage layer copies from/to S3 around these calls when needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sarjepa_dist.config import Config, ModelConfig, config_from_dict, to_plain
from sarjepa_dist.errors import SarjepaError
from sarjepa_dist.model.encoder import MaskedViT, build_encoder, encoder_timm_kwargs

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
STATE_FILE = "state.json"
RNG_FILE = "rng.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
EXPORT_WEIGHTS = "encoder.safetensors"
EXPORT_INFO = "encoder.json"
FORMAT_VERSION = 1


class CheckpointIntegrityError(SarjepaError, ValueError):
    """A checkpoint or export file differs from the sha256 recorded when it was written, or holds
    pickled objects that are not tensors; the message names the file."""


# --------------------------------------------------------------------------- small helpers


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(folder: str | os.PathLike, recorded: dict[str, str] | None, where: str) -> None:
    """Refuse (``CheckpointIntegrityError``) when a file of ``folder`` differs from its recorded
    sha256. Files absent here are skipped: remote loaders fetch only the files they read, and a
    loader that needs a missing file says so itself. ``recorded`` None: a checkpoint written
    before hashes were recorded."""
    for name, expected in (recorded or {}).items():
        path = Path(folder) / name
        if path.is_file() and file_sha256(path) != expected:
            raise CheckpointIntegrityError(
                f"{path}: its sha256 differs from the one {where} recorded when it was written; the file "
                f"was changed or truncated since. Refusing to load it: use another checkpoint or re-export")


def _load_tensors_only(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)``; a pickle that asks for more is refused, naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointIntegrityError(
            f"{path}: refused: it holds pickled objects that are not tensors, and loading it could run "
            f"code ({str(exc).splitlines()[0]}); sarjepa writes tensors only, so this file did not "
            f"come from a sarjepa checkpoint as written") from exc


def new_checkpoint_id() -> str:
    return uuid.uuid4().hex[:12]


def tensors_for_safetensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-disjoint copies: safetensors refuses tensors that share memory
    (tied weights, views), so every tensor whose storage was already seen is cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state_dict.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def capture_rng_state() -> dict[str, torch.Tensor]:
    """Every RNG this process draws from, as tensors (so ``torch.load(weights_only=True)`` works)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    assert np_name == "MT19937"
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(np_gauss, dtype=torch.float64),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_meta": torch.tensor([py_version], dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if py_gauss is None else py_gauss, dtype=torch.float64),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(v) for v in state["numpy_meta"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy_gauss"])))
    gauss = float(state["python_gauss"])
    random.setstate((int(state["python_meta"][0]), tuple(int(v) for v in state["python_internal"]),
                     None if np.isnan(gauss) else gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` to ``final``; an existing ``final`` is swapped out, then deleted."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint_dir(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        state: dict[str, Any], config_dict: dict[str, Any], meta: dict[str, Any],
                        extra_files: dict[str, str | bytes] | None = None) -> dict[str, Any]:
    """Write a checkpoint directory atomically; returns the meta written (with ``checkpoint_id``).

    ``model`` must be the unwrapped SarJEPA (not DDP/compiled), so keys carry no wrapper prefix.
    ``extra_files``: more files (name → text or bytes) for the folder, hashed like the rest.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    meta = {**meta, "checkpoint_id": meta.get("checkpoint_id") or new_checkpoint_id(),
            "format_version": FORMAT_VERSION, "saved_at": time.time()}
    meta.setdefault("dataset_id", None)
    try:
        save_file(tensors_for_safetensors(model.state_dict()), str(tmp / MODEL_FILE),
                  metadata={"checkpoint_id": meta["checkpoint_id"]})
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIM_FILE)
        torch.save(capture_rng_state(), tmp / RNG_FILE)
        _write_json(tmp / STATE_FILE, state)
        _write_json(tmp / CONFIG_FILE, config_dict)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        meta["files"] = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json(tmp / META_FILE, meta)  # last: its presence marks a complete directory
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def load_checkpoint_dir(directory: str | os.PathLike, model: nn.Module,
                        optimizer: torch.optim.Optimizer | None = None, *, restore_rng: bool = False,
                        map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights (strict) and, if given, optimizer state; returns (state, meta).

    Tensors are read with safetensors / ``torch.load(weights_only=True)``: no pickled code runs.
    Every file is checked against the sha256 in ``meta.json`` first (``CheckpointIntegrityError``).
    """
    d = Path(directory)
    if not (d / META_FILE).exists() or not (d / MODEL_FILE).exists():
        raise FileNotFoundError(f"{d} is not a checkpoint directory (needs {MODEL_FILE} and {META_FILE})")
    meta = _read_json(d / META_FILE)
    verify_files(d, meta.get("files"), str(d / META_FILE))
    model.load_state_dict(load_file(str(d / MODEL_FILE), device="cpu"), strict=True)
    if optimizer is not None:
        if not (d / OPTIM_FILE).exists():
            raise FileNotFoundError(f"{d} holds no {OPTIM_FILE}; load without an optimizer or pick another checkpoint")
        optimizer.load_state_dict(_load_tensors_only(d / OPTIM_FILE, map_location))
    if restore_rng and (d / RNG_FILE).exists():
        restore_rng_state(_load_tensors_only(d / RNG_FILE, "cpu"))
    return _read_json(d / STATE_FILE), meta


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MODEL_FILE).exists() and (p / CONFIG_FILE).exists()


# --------------------------------------------------------------------------- encoder export


def _encoder_weights(model_file: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The evaluation encoder's timm state dict from a SarJEPA safetensors file, and which it was:
    the EMA target encoder when present, else (``gradient-features``) the context encoder."""
    with safe_open(str(model_file), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        for prefix, which in (("target_encoder.vit.", "ema-target"), ("encoder.vit.", "context")):
            chosen = [k for k in keys if k.startswith(prefix)]
            if chosen:
                return {k[len(prefix):]: f.get_tensor(k) for k in chosen}, which
    raise ValueError(f"{model_file} holds no encoder weights (no 'target_encoder.vit.' or 'encoder.vit.' keys)")


def _encoder_info(cfg: Config, timm_kwargs: dict[str, Any], weights: str, meta: dict[str, Any],
                  state: dict[str, Any], checkpoint_dir: str | None) -> dict[str, Any]:
    return {
        "format": "sarjepa-encoder",
        "format_version": FORMAT_VERSION,
        "timm_kwargs": timm_kwargs,
        "img_size": cfg.data.img_size,
        "in_chans": cfg.data.channels,
        "patch_size": cfg.model.patch_size,
        "embed_dim": int(timm_kwargs["embed_dim"]),
        "pooling": "mean",
        "weights": weights,
        "conditioning": cfg.data.conditioning,
        "gradient": to_plain(cfg.gradient),
        "context_domain": cfg.model.context_domain,
        "target_mode": cfg.model.target_mode,
        "lineage": {
            "checkpoint_id": meta.get("checkpoint_id"),
            "dataset_id": meta.get("dataset_id"),
            "run_name": meta.get("run_name", cfg.train.name),
            "step": meta.get("step", state.get("step")),
            "checkpoint": checkpoint_dir,
            "config": cfg.to_dict(),
        },
    }


def saved_config_section(checkpoint_dir: str | os.PathLike, section: str) -> dict[str, Any] | None:
    """One section of the config a checkpoint was written with, as saved: keys the checkpoint lacks
    stay absent (``config_from_dict`` would fill them with today's defaults). None: no config saved."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.exists():
        return None
    return dict(_read_json(path).get(section) or {})


def _checkpoint_parts(checkpoint_dir: Path) -> tuple[Config, dict[str, Any], dict[str, Any]]:
    """Config, meta and state of a checkpoint whose files passed the sha256 check."""
    meta = _read_json(checkpoint_dir / META_FILE) if (checkpoint_dir / META_FILE).exists() else {}
    verify_files(checkpoint_dir, meta.get("files"), str(checkpoint_dir / META_FILE))
    cfg = config_from_dict(_read_json(checkpoint_dir / CONFIG_FILE))
    state = _read_json(checkpoint_dir / STATE_FILE) if (checkpoint_dir / STATE_FILE).exists() else {}
    return cfg, meta, state


def export_encoder(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``encoder.safetensors`` + ``encoder.json`` for a checkpoint's evaluation encoder.

    The weights are checked to load strictly into ``VisionTransformer(**timm_kwargs)`` before
    anything is written; ``encoder.json`` is written last (its presence marks a complete export).
    """
    ckpt = Path(checkpoint_dir)
    if not is_checkpoint_dir(ckpt):
        raise FileNotFoundError(f"{ckpt} is not a checkpoint directory (needs {MODEL_FILE} and {CONFIG_FILE})")
    cfg, meta, state = _checkpoint_parts(ckpt)
    timm_kwargs = encoder_timm_kwargs(cfg.model, cfg.data.img_size, cfg.data.channels)
    weights, which = _encoder_weights(ckpt / MODEL_FILE)
    VisionTransformer(**timm_kwargs).load_state_dict(weights, strict=True)  # fail before writing
    info = _encoder_info(cfg, timm_kwargs, which, meta, state, str(ckpt))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp_w, tmp_j = out / f".{EXPORT_WEIGHTS}.{tag}", out / f".{EXPORT_INFO}.{tag}"
    try:
        save_file(tensors_for_safetensors(weights), str(tmp_w), metadata={"format": "sarjepa-encoder"})
        info["weights_sha256"] = file_sha256(tmp_w)
        _write_json(tmp_j, info)
        os.replace(tmp_w, out / EXPORT_WEIGHTS)
        os.replace(tmp_j, out / EXPORT_INFO)
    finally:
        for t in (tmp_w, tmp_j):
            t.unlink(missing_ok=True)
    return out


def _export_paths(spec: Path) -> tuple[Path, Path]:
    """(weights, sidecar json) for an export dir or a ``.safetensors`` path."""
    if spec.is_dir():
        return spec / EXPORT_WEIGHTS, spec / EXPORT_INFO
    for sidecar in (spec.with_suffix(".json"), spec.parent / EXPORT_INFO):
        if sidecar.exists():
            return spec, sidecar
    raise FileNotFoundError(f"{spec}: no {spec.with_suffix('.json').name} or {EXPORT_INFO} beside it; "
                            f"an exported encoder needs its sidecar json")


def _verify_export(weights: Path, info: dict[str, Any], sidecar: Path) -> None:
    if "weights_sha256" in info:
        verify_files(weights.parent, {weights.name: info["weights_sha256"]}, str(sidecar))


def load_timm_from_export(path: str | os.PathLike) -> VisionTransformer:
    """A plain timm ``VisionTransformer`` (eval mode) from an export dir or its ``.safetensors``."""
    weights, sidecar = _export_paths(Path(path))
    info = _read_json(sidecar)
    _verify_export(weights, info, sidecar)
    vit = VisionTransformer(**info["timm_kwargs"])
    vit.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    return vit.eval()


def load_encoder(spec: str | os.PathLike, *, model_cfg: ModelConfig | None = None, img_size: int | None = None,
                 in_chans: int | None = None, seed: int = 0) -> tuple[MaskedViT, dict[str, Any]]:
    """The encoder named by ``spec`` (in eval mode, on the CPU) and what is known about it.

    ``spec``: a checkpoint directory (its EMA target encoder; config.json rebuilds it), an export
    directory or ``.safetensors`` file (with its json beside it), or ``random-init`` /
    ``random-init:<encoder>`` (e.g. ``random-init:vit_small``), which needs ``model_cfg`` (or the
    default one), ``img_size`` and ``in_chans``, and is seeded by ``seed`` without touching the
    global RNG. ``info`` has the keys of ``encoder.json`` plus ``source`` and ``spec``.
    """
    text = str(spec)
    if text.startswith("random-init"):
        name = text.split(":", 1)[1] if ":" in text else None
        cfg = model_cfg or ModelConfig()
        if name:
            cfg = dataclasses.replace(cfg, encoder=name)
        if img_size is None or in_chans is None:
            raise ValueError(f"load_encoder({text!r}) needs img_size and in_chans")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = build_encoder(cfg, img_size, in_chans)
        info = {"source": "random-init", "spec": text, "timm_kwargs": enc.timm_kwargs, "img_size": img_size,
                "in_chans": in_chans, "patch_size": cfg.patch_size, "embed_dim": enc.embed_dim,
                "pooling": "mean", "weights": "random", "seed": seed, "conditioning": None, "gradient": None,
                "context_domain": cfg.context_domain, "target_mode": None, "lineage": {}}
        return enc.eval(), info

    path = Path(text)
    if is_checkpoint_dir(path):
        cfg, meta, state = _checkpoint_parts(path)
        timm_kwargs = encoder_timm_kwargs(cfg.model, cfg.data.img_size, cfg.data.channels)
        weights, which = _encoder_weights(path / MODEL_FILE)
        info = {"source": "checkpoint", "spec": text,
                **_encoder_info(cfg, timm_kwargs, which, meta, state, text)}
    elif path.exists():
        weights_file, sidecar = _export_paths(path)
        info = {"source": "export", "spec": text, **_read_json(sidecar)}
        _verify_export(weights_file, info, sidecar)
        timm_kwargs = info["timm_kwargs"]
        weights = load_file(str(weights_file), device="cpu")
    else:
        raise FileNotFoundError(f"encoder spec {text!r}: not a checkpoint dir, export dir, .safetensors file "
                                f"or 'random-init[:<encoder>]'")
    enc = MaskedViT(timm_kwargs)
    enc.vit.load_state_dict(weights, strict=True)
    return enc.eval(), info
