"""Geometric augmentations for SAR chips, and the evaluation crop.

Only geometry: a SAR chip's intensities are physical (radar cross-section and speckle
statistics), so colour jitter, contrast changes and added noise would teach invariances the data
never needs and corrupt the statistics the gradient-by-ratio operator relies on. Square crops keep
the pixel aspect ratio (range and cross-range spacing are equal on MSTAR-like products); flips and
90° rotations change the apparent aspect angle of the target, which the encoder should not key on.

Resizing is bilinear with antialiasing: its weights are non-negative, so amplitudes stay
``>= 0`` and speckle is averaged rather than aliased when shrinking.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sarjepa_dist.transforms._common import check_batch

__all__ = ["TTA_CROP_FRACTION", "augment_batch", "center_resize", "crop_views"]

# Side of the test-time crops (``crop_views``) as a fraction of the chip: 120 of 128 px, a 4-px
# shift each way, inside the training crops' range (side 0.77-1.0 of the chip at crop_scale 0.6-1).
TTA_CROP_FRACTION = 15 / 16


def _check(x: torch.Tensor) -> torch.Tensor:
    check_batch(x)
    return x if x.is_floating_point() else x.to(torch.float32)


def _check_size(name: str, size: int) -> int:
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"{name} = {size!r} must be a positive integer")
    return int(size)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square ``x`` (..., S, S) → (..., size, size); returns ``x`` unchanged when ``S == size``."""
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def center_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation view: centre-crop ``(B, C, H, W)`` to the largest square, resize to ``size``.

    The crop keeps ``min(H, W)`` pixels, offset ``(H − m) // 2`` / ``(W − m) // 2``; the resize is
    bilinear with antialiasing. Returns ``x`` itself (no copy) when it is already
    ``size x size``. Integer inputs come back as float32.
    """
    x = _check(x)
    size = _check_size("size", size)
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    return _resize(x[..., top:top + m, left:left + m], size)


def crop_views(x: torch.Tensor, size: int, fraction: float = TTA_CROP_FRACTION) -> list[torch.Tensor]:
    """Test-time views of ``(B, C, H, W)`` chips, each centre-resized to ``size``: the chip as
    ``center_resize`` sees it, then a centre crop and the four corner crops of side
    ``round(m·fraction)`` of its ``m x m`` centre square (six views, the first one the usual view).

    Averaging features over small shifts of the chip makes them less sensitive to where the target
    sits (MSTAR's targets are centred to a few pixels).
    """
    x = _check(x)
    size = _check_size("size", size)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction = {fraction!r} must lie in (0, 1]")
    h, w = x.shape[-2:]
    m = min(h, w)
    top, left = (h - m) // 2, (w - m) // 2
    square = x[..., top:top + m, left:left + m]
    c = max(1, min(m, round(m * fraction)))
    mid, end = (m - c) // 2, m - c
    offsets = [(mid, mid), (0, 0), (0, end), (end, 0), (end, end)]
    return [_resize(square, size)] + [_resize(square[..., i:i + c, j:j + c], size) for i, j in offsets]


def augment_batch(x: torch.Tensor, out_size: int, crop_scale: tuple[float, float] = (0.6, 1.0),
                  flips: bool = True, rot90: bool = True,
                  generator: torch.Generator | None = None, *, vertical_flips: bool = True) -> torch.Tensor:
    """Per-sample random-resized square crop, flips and 90° rotations of a ``(B, C, H, W)`` batch.

    For each sample, in this order:

    1. crop: a square of side ``round(m·√s)`` (clamped to ``[1, m]``), ``m = min(H, W)``, with the
       area fraction ``s`` of the ``m x m`` square uniform in ``crop_scale``, at a uniformly random
       position; ``crop_scale = (1, 1)`` takes the whole ``m x m`` square (the whole chip when
       square), i.e. no crop;
    2. resize to ``out_size x out_size`` (bilinear, antialiased; skipped when the side already
       equals ``out_size``);
    3. ``flips``: horizontal flip and (if ``vertical_flips``) vertical flip, each with probability 1/2;
    4. ``rot90``: rotation by ``k·90°``, ``k`` uniform in {0, 1, 2, 3}.

    All channels of a sample get the same geometry. Every sample draws the same six uniforms from
    ``generator`` (or the global RNG) whatever the flags, so the result is a function of the
    generator's state alone, and turning ``flips`` off does not change the crops.

    Args:
        x: ``(B, C, H, W)``; floating point (integers are converted to float32).
        out_size: output side in pixels.
        crop_scale: ``(low, high)`` area fractions, ``0 < low <= high <= 1``.
        flips, rot90: enable the random flips / rotations.
        vertical_flips: with ``flips``, flip vertically too. A SAR chip's rows run along range:
            a vertical flip (or a 90° rotation) moves the radar, and the target's shadow, to a side
            no real chip has; a horizontal flip mirrors the aspect angle, which real chips do cover.
        generator: a ``torch.Generator`` for reproducible draws; its device is used for the draws.

    Returns:
        ``(B, C, out_size, out_size)``, ``x``'s dtype (float32 for integer input) and device.
    """
    x = _check(x)
    out_size = _check_size("out_size", out_size)
    lo, hi = (float(v) for v in crop_scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"crop_scale = {tuple(crop_scale)!r} must satisfy 0 < low <= high <= 1")
    b, c, h, w = x.shape
    m = min(h, w)
    device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand((b, 6), generator=generator, dtype=torch.float64, device=device).tolist()
    out = x.new_empty((b, c, out_size, out_size))
    for i, (u_area, u_top, u_left, u_h, u_v, u_rot) in enumerate(draws):
        area = lo + (hi - lo) * u_area
        side = min(m, max(1, round(m * math.sqrt(area))))
        top = min(h - side, int(u_top * (h - side + 1)))
        left = min(w - side, int(u_left * (w - side + 1)))
        view = _resize(x[i:i + 1, :, top:top + side, left:left + side], out_size)
        dims = [d for d, flip in ((-1, u_h < 0.5), (-2, vertical_flips and u_v < 0.5)) if flips and flip]
        if dims:
            view = torch.flip(view, dims)
        k = min(3, int(u_rot * 4)) if rot90 else 0
        if k:
            view = torch.rot90(view, k, dims=(-2, -1))
        out[i:i + 1] = view
    return out
