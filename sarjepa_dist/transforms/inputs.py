"""The model's inputs from an amplitude batch: one function for both transform placements.

``prepare_inputs`` runs in Ray Data CPU workers (``transform_placement: data``) or in the train
step (``device``). It has no randomness and treats every chip independently (no batch
statistics), so a chip gets the same numbers whichever batch it lands in; augmentation happens
before it, from per-chip generators.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sarjepa_dist.config import DataConfig, GradientConfig
from sarjepa_dist.transforms._common import autocast_off
from sarjepa_dist.transforms.conditioning import condition, robust_standardize
from sarjepa_dist.transforms.gradient import fuse_scales, gradient_by_ratio, gradient_domain

__all__ = ["INPUT_KEYS", "GRADIENT_SPREAD_FLOOR", "check_input_keys", "prepare_inputs", "standardize_gradient"]

INPUT_KEYS = ("x", "gx", "gfeat")
# Floor of the robust spread of ∇x, in nepers (gradient-by-ratio and Sobel maps are log-ratios):
# a flat chip keeps its small gradients small instead of being stretched to unit contrast.
GRADIENT_SPREAD_FLOOR = 1e-2


def check_input_keys(need: Sequence[str]) -> tuple[str, ...]:
    """``need`` as a tuple, or ``ValueError`` unless it is a non-empty subset of :data:`INPUT_KEYS`."""
    need_t = tuple(need)
    if not need_t or any(k not in INPUT_KEYS for k in need_t):
        raise ValueError(f"need = {need_t!r}: choose a non-empty subset of {INPUT_KEYS}")
    return need_t


def standardize_gradient(g: torch.Tensor, domain: str, amplitude: torch.Tensor) -> torch.Tensor:
    """Scale a ``∇x`` map like the context input: per chip-channel median 0, σ-equivalent spread 1.

    With ``context_domain: raw`` the EMA target encoder (weights averaged from the context
    encoder, which trains on :func:`condition` output) embeds ``∇x``; giving both inputs the same
    robust location and scale keeps that weight sharing from also facing a change of units
    (raw fused gradient-by-ratio maps have medians of ~0.06 nepers on pure speckle and ~0.2 on
    MSTAR chips, with target ridges of 1–2). The standardisation is
    per chip, deterministic and gain-invariant (the maps themselves are). ``identity`` maps the
    amplitude like ``condition(·, "amplitude")``.
    """
    if domain == "identity":
        return condition(amplitude, "amplitude")
    return robust_standardize(g, GRADIENT_SPREAD_FLOOR).to(torch.float32)


@torch.no_grad()
def prepare_inputs(amplitude: torch.Tensor, data_cfg: DataConfig, gradient_cfg: GradientConfig,
                   need: Sequence[str] = ("x", "gx")) -> dict[str, torch.Tensor]:
    """Context input, target input and/or gradient features from an amplitude batch.

    ``amplitude`` ``(B, C, H, W)`` (``C == data_cfg.channels``) is clipped at 0 first (negative
    amplitudes are not physical; interpolation ringing or decoding errors can produce them). Keys,
    all float32 on ``amplitude``'s device:

    - ``x``: ``condition(a, data_cfg.conditioning)`` — the context-encoder input (raw domain);
    - ``gx``: ``∇x = gradient_domain(a, gradient_cfg.domain, radii, eps, fuse)``, robustly
      standardised per chip-channel (:func:`standardize_gradient`) — the target-encoder input,
      ``(B, C, H, W)``, same layout as ``x``;
    - ``gfeat``: the per-scale gradient-by-ratio maps ``(B, C·S, H, W)`` (channel ``c·S + s``),
      raw, in nepers — the regression target of the ``gradient-features`` mode (any per-patch
      normalisation belongs to the loss).

    Deterministic and per chip: the same chip gives the same values whatever else is in the
    batch, and the same values in a Ray Data worker as in the train step on the same device and
    dtype. float64 input is computed in float64 and returned as float32.

    Args:
        amplitude: ``(B, C, H, W)`` amplitude tensor (or array; integers are converted to
            float32).
        data_cfg: uses ``conditioning`` and ``channels``.
        gradient_cfg: uses ``domain``, ``radii``, ``eps`` and ``fuse``.
        need: a non-empty subset of ``("x", "gx", "gfeat")``; only these are computed.
    """
    need_t = check_input_keys(need)
    if not isinstance(amplitude, torch.Tensor):
        amplitude = torch.as_tensor(amplitude)  # e.g. a numpy batch from Ray Data
    if amplitude.dim() != 4:
        raise ValueError(f"amplitude must be a (B, C, H, W) batch, got shape {tuple(amplitude.shape)}")
    if amplitude.shape[1] != data_cfg.channels:
        raise ValueError(f"amplitude has {amplitude.shape[1]} channels but data.channels = "
                         f"{data_cfg.channels}")
    a = amplitude if amplitude.dtype in (torch.float32, torch.float64) else amplitude.to(torch.float32)
    with autocast_off(a.device):
        return _prepare(a.clamp_min(0), data_cfg, gradient_cfg, need_t)


def _prepare(a: torch.Tensor, data_cfg: DataConfig, gradient_cfg: GradientConfig,
             need_t: tuple[str, ...]) -> dict[str, torch.Tensor]:
    radii, eps = tuple(gradient_cfg.radii), float(gradient_cfg.eps)
    out: dict[str, torch.Tensor] = {}
    if "x" in need_t:
        out["x"] = condition(a, data_cfg.conditioning)
    # gx (gradient-by-ratio) and gfeat share one set of per-scale maps.
    maps = None
    if "gfeat" in need_t or ("gx" in need_t and gradient_cfg.domain == "gradient-by-ratio"):
        maps = gradient_by_ratio(a, radii, eps)
    if "gx" in need_t:
        if gradient_cfg.domain == "gradient-by-ratio":
            assert maps is not None
            g = fuse_scales(maps, gradient_cfg.fuse)
        else:
            g = gradient_domain(a, gradient_cfg.domain, radii, eps, gradient_cfg.fuse)
        out["gx"] = standardize_gradient(g, gradient_cfg.domain, a)
    if "gfeat" in need_t:
        assert maps is not None
        out["gfeat"] = maps.flatten(1, 2).to(torch.float32)
    return {k: out[k] for k in need_t}
