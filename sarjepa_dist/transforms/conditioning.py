"""Input conditioning of the context-encoder input: amplitude | log | dB, robustly scaled per chip.

SAR amplitudes span decades (bright dihedrals 30–40 dB above clutter, shadows near the noise
floor) and their absolute level depends on the sensor, calibration and product (8-bit JPEG
rescaled per chip, float magnitudes, ...). A network should see neither the gain nor a few
hot pixels, so every chip and channel is centred on its median and (``amplitude``, ``log``)
scaled by a spread measured between percentiles, which a handful of outliers cannot move.

Every mode is invariant to a constant gain on a chip-channel up to rounding (the log offset and
the spread floors scale with the chip's own level), and maps a constant or all-zero chip to
zeros instead of dividing by zero.
"""

from __future__ import annotations

import math

import torch

from sarjepa_dist.config import CONDITIONINGS
from sarjepa_dist.transforms._common import autocast_off, check_batch

__all__ = [
    "DB_UNIT",
    "condition",
    "robust_quantiles",
    "robust_standardize",
    "robust_stats",
]

# The 1 % and 99 % quantiles of a normal distribution lie 2·2.3263 standard deviations apart:
# dividing the 1–99 % span by this makes the scale a standard deviation for Gaussian data.
_SPAN_TO_SIGMA = 2.0 * 2.3263478740408408
# log(a + δ) uses δ = _LOG_DELTA_REL · (median amplitude of the chip-channel, or its mean when
# at least half the pixels are 0) + _TINY: zeros land 60 dB below the typical level instead of
# at -inf, and δ scales with any gain. (A mean-based δ is not robust: a few hot pixels at 1e5 x
# the clutter would raise δ to the clutter level and flatten every dark pixel.)
_LOG_DELTA_REL = 1e-3
_TINY = 1e-12
# Spread floors: in nepers for log-domain values; relative to the level for amplitudes.
_LOG_SPREAD_FLOOR = 1e-3
_AMP_SPREAD_FLOOR_REL = 1e-3
# Quantiles are taken on a strided subsample of at most about this many pixels.
_QUANTILE_SAMPLES = 4096
# dB mode: one output unit is 10 dB.
DB_UNIT = 10.0
_DB_PER_NEPER = 20.0 / math.log(10.0)


def _check(x: torch.Tensor) -> torch.Tensor:
    check_batch(x)
    if x.dtype == torch.float64:
        return x
    return x.to(torch.float32)


def _subsample(v: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, C, N)``: every ``s``-th row and column, ``s`` the smallest stride
    leaving at most ``_QUANTILE_SAMPLES`` pixels (``s = 2`` for 128², ``s = 1`` up to 64²)."""
    h, w = v.shape[-2:]
    s = max(1, math.ceil(math.sqrt(h * w / _QUANTILE_SAMPLES)))
    return v[..., ::s, ::s].flatten(2)


def robust_quantiles(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per chip-and-channel 1 %, 50 % and 99 % quantiles of ``v`` ``(B, C, H, W)``.

    ``torch.quantile`` with ``nearest`` interpolation, so every quantile is one of the pixel
    values and the quantiles of ``f(v)`` are ``f`` of the quantiles of ``v`` for any increasing
    ``f`` (one sort serves the amplitude, log and dB domains), over a deterministic strided
    subsample (every ``s``-th row and column, at most ~4096 pixels): the quantiles of a
    4096-pixel grid are as good a scale as the whole chip's, at a quarter of the sorting cost for
    128² chips. Returns three ``(B, C, 1, 1)`` tensors in ``v.dtype``.
    """
    b, c = v.shape[:2]
    if v.numel() == 0:
        z = v.new_zeros((b, c, 1, 1))
        return z, z, z
    q = torch.tensor([0.01, 0.5, 0.99], dtype=v.dtype, device=v.device)
    qs = torch.quantile(_subsample(v), q, dim=-1, interpolation="nearest")[..., None, None]
    return qs[0], qs[1], qs[2]


def robust_stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chip-and-channel ``(median, spread)`` of ``v``, each ``(B, C, 1, 1)``.

    ``spread = (q99 − q01) / 4.6527`` (see :func:`robust_quantiles`): a standard deviation for
    Gaussian data, which up to ~1 % of arbitrary outliers at either end barely move.
    """
    q01, med, q99 = robust_quantiles(v)
    return med, (q99 - q01) / _SPAN_TO_SIGMA


def robust_standardize(v: torch.Tensor, floor: float | torch.Tensor) -> torch.Tensor:
    """``(v − median) / max(spread, floor)`` per chip and channel (see :func:`robust_stats`).

    ``floor`` (a number or a ``(B, C, 1, 1)`` tensor) keeps near-constant chips from being blown
    up to unit contrast and constant ones from dividing by zero (they map to 0).
    """
    med, spread = robust_stats(v)
    if isinstance(floor, torch.Tensor):
        scale = torch.maximum(spread, floor.to(spread.dtype))
    else:
        scale = spread.clamp_min(float(floor))
    return (v - med) / scale


@torch.no_grad()
def condition(x: torch.Tensor, mode: str = "log") -> torch.Tensor:
    """Condition an amplitude batch for the context encoder, robustly scaled per chip-channel.

    Per chip and channel, with ``a = max(x, 0)``, its quantiles ``q01, med, q99`` (nearest-rank,
    over a strided ≤4096-pixel subsample: :func:`robust_quantiles`), the level
    ``L = med`` (or ``mean(a)`` when ``med == 0``, i.e. at least half the pixels are 0),
    ``δ = 1e-3 · L + 1e-12`` and ``k = 4.6527`` (the 1–99 % span of a unit normal):

    - ``amplitude``: ``(a − med) / max((q99 − q01) / k, 1e-3 · L + 1e-12)``;
    - ``log``: ``v = log(a + δ)``, ``(v − med(v)) / max((q99(v) − q01(v)) / k, 1e-3)``: a robust
      z-score of the log-amplitude, contrast renormalised per chip (about unit standard
      deviation for any chip);
    - ``db``: ``v = 20·log10(a + δ)``, ``(v − med(v)) / 10``: dB above the chip's median, in units
      of 10 dB. Contrast stays in physical units, comparable across chips (single-look speckle
      has a standard deviation of about 0.56; a scatterer 30 dB above the clutter reads ~3).
      Spread-normalising dB would make it identical to ``log``, since the two differ by a scale.

    ``q(v)`` are ``log(q(a) + δ)`` (nearest-rank quantiles commute with increasing maps),
    so one quantile pass serves every mode. All three modes are invariant to a constant gain per
    chip-channel, insensitive to up to ~1 % of hot or dead pixels, finite for any finite input
    (all-zero and constant chips give 0), and deterministic: no randomness, no batch statistics,
    so a chip gives the same bits in any batch on the same device and dtype.

    Args:
        x: amplitude ``(B, C, H, W)``; negative values are clipped to 0. Integer inputs are
            converted to float32; float64 is computed in float64.
        mode: ``amplitude`` | ``log`` | ``db``.

    Returns:
        ``(B, C, H, W)`` float32.
    """
    if mode not in CONDITIONINGS:
        raise ValueError(f"mode = {mode!r} is not allowed; choose one of {list(CONDITIONINGS)}")
    a = _check(x).clamp_min(0)
    with autocast_off(a.device):
        return _condition(a, mode)


def _condition(a: torch.Tensor, mode: str) -> torch.Tensor:
    q01, med, q99 = robust_quantiles(a)
    level = torch.where(med > 0, med, a.mean(dim=(-2, -1), keepdim=True))
    if mode == "amplitude":
        floor = level * _AMP_SPREAD_FLOOR_REL + _TINY
        out = (a - med) / torch.maximum((q99 - q01) / _SPAN_TO_SIGMA, floor)
    else:
        delta = level * _LOG_DELTA_REL + _TINY
        v = torch.log(a + delta)
        med_v = torch.log(med + delta)
        if mode == "log":
            spread = (torch.log(q99 + delta) - torch.log(q01 + delta)) / _SPAN_TO_SIGMA
            out = (v - med_v) / spread.clamp_min(_LOG_SPREAD_FLOOR)
        else:
            out = (v - med_v) * (_DB_PER_NEPER / DB_UNIT)
    return out.to(torch.float32)
