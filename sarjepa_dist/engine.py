"""One training step of the method, in plain torch (no Ray): the runners call this in their loop.

    lr, wd = schedules.apply(optimizer, step)      # step-indexed, so resume is exact
    out = model(inputs, masks)                     # under bf16 autocast on CUDA
    out["loss"].backward()
    clip; optimizer.step(); zero_grad
    model.ema_update(schedules.ema(step))          # on the unwrapped model, after the step

No ``.item()`` inside the step: the metrics come back as tensors and are synchronised only when
the caller logs them (``StepMetrics.to_dict``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from sarjepa_dist.config import Config, DataConfig, GradientConfig
from sarjepa_dist.masks import MaskBatch, MultiBlockMaskSampler
from sarjepa_dist.model.jepa import SarJEPA
from sarjepa_dist.optim import Schedules
from sarjepa_dist.transforms import check_input_keys, prepare_inputs


@dataclass
class StepMetrics:
    """What one step reports; ``loss`` and ``grad_norm`` stay on the device until ``to_dict``.
    ``outputs``: the step's own ``target`` and ``pred`` embeddings of its first chips (detached,
    pre-update weights), when the caller asked for them with ``keep_outputs``."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    wd: float
    tau: float
    outputs: dict[str, torch.Tensor] | None = None

    def to_dict(self) -> dict[str, float]:
        return {"loss": float(self.loss), "grad_norm": float(self.grad_norm),
                "lr": self.lr, "wd": self.wd, "tau": self.tau}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and/or torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _grad_norm(params: list[torch.Tensor], grad_clip: float) -> torch.Tensor:
    """Clip to ``grad_clip`` (0: no clipping) and return the pre-clip global L2 norm."""
    if grad_clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, grad_clip)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def train_step(model: SarJEPA, optimizer: torch.optim.Optimizer, schedules: Schedules,
               inputs: dict[str, torch.Tensor], masks: MaskBatch, step: int, *, grad_clip: float,
               autocast_dtype: torch.dtype | None = None, ddp_model: nn.Module | None = None,
               keep_outputs: int = 0) -> StepMetrics:
    """One optimiser step at ``step`` (0-based). ``model`` is the unwrapped SarJEPA (for EMA);
    ``ddp_model`` (a DDP and/or compiled wrapper of it), when given, runs the forward so that
    gradients are all-reduced. Inputs and masks must already be on the model's device.
    ``keep_outputs`` > 0 returns the forward's ``target`` and ``pred`` of that many chips, so that a
    report's collapse figures need no forward of their own."""
    lr, wd = schedules.apply(optimizer, step)
    tau = schedules.ema(step)
    net = ddp_model if ddp_model is not None else model
    device_type = next(iter(inputs.values())).device.type
    amp = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with amp:
        out = net(inputs, masks)
    loss = out["loss"]
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = _grad_norm(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.ema_update(tau)
    kept = {k: out[k][:keep_outputs].detach() for k in ("target", "pred")} if keep_outputs > 0 else None
    return StepMetrics(loss=loss.detach(), grad_norm=grad_norm.detach(), lr=lr, wd=wd, tau=tau, outputs=kept)


def make_inputs_on_device(batch: dict[str, Any], data_cfg: DataConfig, gradient_cfg: GradientConfig,
                          need: Iterable[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The model inputs (keys ``need`` ⊆ {x, gx, gfeat}) on ``device``.

    ``transform_placement: device``: the batch carries the conditioned-but-untransformed
    ``amplitude`` chips; ``prepare_inputs`` (the same function the data workers would run) is called
    here, on the device, so ∇x costs GPU time instead of CPU-worker time.
    ``transform_placement: data``: the workers already computed the keys; they are only moved.
    ``device=None`` leaves tensors where they are.
    """
    need = check_input_keys(need)

    def move(t: Any) -> torch.Tensor:
        t = torch.as_tensor(t)
        return t if device is None else t.to(device, non_blocking=True)

    if data_cfg.transform_placement == "device":
        if "amplitude" not in batch:
            raise KeyError("transform_placement = 'device' needs an 'amplitude' batch column; "
                           f"got columns {sorted(batch)}")
        return prepare_inputs(move(batch["amplitude"]), data_cfg, gradient_cfg, need)
    missing = [k for k in need if k not in batch]
    if missing:
        raise KeyError(f"transform_placement = 'data' but the batch lacks {missing}; got columns {sorted(batch)}")
    return {k: move(batch[k]) for k in need}


def build_method(cfg: Config) -> tuple[SarJEPA, MultiBlockMaskSampler]:
    """The model and the mask sampler a config describes (seed the RNG first for a repeatable init)."""
    model = SarJEPA(cfg.model, cfg.data.img_size, cfg.data.channels, num_grad_scales=len(cfg.gradient.radii))
    sampler = MultiBlockMaskSampler(model.encoder.grid_size, cfg.mask)
    return model, sampler
