"""Gradient-domain operators: the target-encoder input ∇x (METHOD.md §2).

Multiplicative speckle makes pixel differences unstable; ratios of local means are not. The
gradient by ratio (SAR-JEPA's operator) compares the means of opposite half-windows, in the log
domain, at several window radii.

Cost. A direct convolution spends ``4·(2r+1)²`` multiply-adds per pixel and scale (about 9,700
per pixel for r = 5, 9, 13, 17). Here every half-window sum is read off one 2-D integral image
(cumulative sums along rows, then columns), so each scale costs a fixed handful of
whole-array slice differences, whatever its radius:

- the chip is reflect-padded once by the largest radius ``R``; reflect padding by ``r ≤ R`` is the
  centre of that (a reflected index does not depend on the pad width), so one integral image
  serves every scale;
- the integral image is accumulated in float64: its entries grow to ``(H+2R)·(W+2R)·mean``, so
  in float32 a 66-pixel box sum read off it carries a relative error of ~1e-4 (more in dark
  regions: measured up to 7e-5 in the log-ratio on 128² speckle and over 1e-4 on a speckle scene
  with a shadow, against 2e-7 with float64, i.e. float32 output rounding);
- the bottom half-window of a pixel is the top half-window of the pixel ``r`` rows below (and
  right = left shifted by ``r`` columns), so one slice difference gives both halves of a pair.

On CPU the batch is processed in chunks whose float64 integral image stays cache-resident
(~2 MiB); every chip is computed independently, so chunking does not change any value.
See ``benchmarks/bench_gradient.py`` for speed and accuracy against a direct convolution.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from sarjepa_dist.config import GRADIENT_DOMAINS, GRADIENT_FUSES
from sarjepa_dist.transforms._common import autocast_off, check_batch

__all__ = [
    "check_radii",
    "fuse_scales",
    "gradient_by_ratio",
    "gradient_domain",
    "sobel",
]

# Working-set budget for one CPU chunk (float64 integral image): about one L2 cache.
_CPU_CHUNK_BYTES = 2 * 1024 * 1024
# On accelerators the whole batch goes at once unless its integral image exceeds this.
_DEVICE_CHUNK_BYTES = 512 * 1024 * 1024


def _check_amplitude(x: torch.Tensor) -> None:
    check_batch(x)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point (float32 or float64), got {x.dtype}; "
                        f"convert it first, e.g. x.float()")


def check_radii(radii: Sequence[int], height: int, width: int) -> tuple[int, ...]:
    """Validate window radii for an ``height x width`` chip; return them as a tuple of ints.

    Reflect padding by ``r`` reads ``r`` pixels beyond each border from inside the chip, so it
    needs ``r < H`` and ``r < W``: the smallest chip a radius ``r`` allows is ``(r+1) x (r+1)``.
    """
    radii_t = tuple(int(r) for r in radii)
    if not radii_t:
        raise ValueError("radii is empty; give at least one window radius, e.g. (5, 9, 13, 17)")
    for r, given in zip(radii_t, radii):
        if r != given or r < 1:
            raise ValueError(f"radius {given!r} is not a positive integer")
    for r in radii_t:
        if r >= height or r >= width:
            raise ValueError(
                f"radius {r} is too large for a {height}x{width} chip: reflect padding needs the "
                f"radius below both sides, so radius {r} needs chips of at least {r + 1}x{r + 1} "
                f"pixels (or use a smaller radius)")
    return radii_t


def _chunk_planes(n_planes: int, bytes_per_plane: int, device: torch.device) -> int:
    budget = _CPU_CHUNK_BYTES if device.type == "cpu" else _DEVICE_CHUNK_BYTES
    return max(1, min(n_planes, budget // max(1, bytes_per_plane)))


class _Workspace:
    """Buffers for one chunk, allocated once per call and reused by every chunk and scale.

    Fresh large CPU allocations are fresh pages from the OS; touching them costs page faults
    comparable to the arithmetic itself, so temporaries are written with ``out=`` into these.
    """

    def __init__(self, n: int, h: int, w: int, big: int, dtype: torch.dtype, device: torch.device):
        k = 2 * big + 1
        f64 = dict(dtype=torch.float64, device=device)
        # Integral image with a leading zero row and column: the box sum over rows [a0, a1) and
        # columns [b0, b1) of the padded chip is I[a1,b1] - I[a0,b1] - I[a1,b0] + I[a0,b0].
        self.integral = torch.empty((n, h + k, w + k), **f64)
        self.integral[:, 0, :] = 0
        self.integral[:, 1:, 0] = 0
        self.cols = torch.empty((n, h + k, w), **f64)
        self.rows = torch.empty((n, h, w + k), **f64)
        self.tops = torch.empty((n, h + big, w), dtype=dtype, device=device)
        self.lefts = torch.empty((n, h, w + big), dtype=dtype, device=device)
        self.g_v = torch.empty((n, h, w), dtype=dtype, device=device)
        self.g_h = torch.empty((n, h, w), dtype=dtype, device=device)


def _gbr_chunk(planes: torch.Tensor, radii: tuple[int, ...], eps: float, out: torch.Tensor,
               ws: _Workspace) -> None:
    """Gradient by ratio of ``planes`` (n, H, W) into ``out`` (n, S, H, W), in ``out.dtype``."""
    n, h, w = planes.shape
    big = max(radii)
    integral = ws.integral[:n]
    inner = integral[:, 1:, 1:]
    inner.copy_(F.pad(planes.unsqueeze(1), (big, big, big, big), mode="reflect").squeeze(1))
    inner.add_(eps)
    inner.cumsum_(-1)
    inner.cumsum_(-2)

    g_v, g_h = ws.g_v[:n], ws.g_h[:n]
    for s, r in enumerate(radii):
        o = big - r  # this scale's reflect-by-r padding starts o pixels into the shared padding
        k = 2 * r + 1
        # Vertical pair. cols[a, j] = sum of padded rows [o, o+a) over the window's columns
        # j..j+2r (float64: still cumulative). tops[i] = sum of window rows i..i+r; the bottom
        # half-window of pixel i (rows i+r..i+2r) is tops[i+r].
        cols = ws.cols[:n, :h + k]
        torch.sub(integral[:, o:o + h + k, o + k:o + k + w], integral[:, o:o + h + k, o:o + w], out=cols)
        tops = ws.tops[:n, :h + r]
        torch.sub(cols[:, r + 1:r + 1 + h + r], cols[:, :h + r], out=tops)
        # Horizontal pair, the same with rows and columns swapped: right(j) = lefts[j+r].
        rows = ws.rows[:n, :, :w + k]
        torch.sub(integral[:, o + k:o + k + h, o:o + w + k], integral[:, o:o + h, o:o + w + k], out=rows)
        lefts = ws.lefts[:n, :, :w + r]
        torch.sub(rows[:, :, r + 1:r + 1 + w + r], rows[:, :, :w + r], out=lefts)
        # Equal pixel counts in both halves: a ratio of sums is a ratio of means.
        torch.div(tops[:, :h], tops[:, r:r + h], out=g_v).log_()
        torch.div(lefts[:, :, :w], lefts[:, :, r:r + w], out=g_h).log_()
        g_h.mul_(g_h).addcmul_(g_v, g_v)
        torch.sqrt(g_h, out=out[:, s])


@torch.no_grad()
def gradient_by_ratio(x: torch.Tensor, radii: Sequence[int] = (5, 9, 13, 17),
                      eps: float = 1e-2) -> torch.Tensor:
    """Multi-scale gradient-by-ratio magnitudes of an amplitude batch (METHOD.md §2).

    For each radius ``r`` and each pixel: reflect-pad the chip by ``r``, add ``eps``, and take the
    four half-windows of the ``(2r+1) x (2r+1)`` window centred on the pixel — top (rows 0..r),
    bottom (rows r..2r), left (columns 0..r), right (columns r..2r); opposite halves share the
    centre line and hold equal pixel counts. Then ``G_H = log(mean_left / mean_right)``,
    ``G_V = log(mean_top / mean_bottom)`` and the result is ``sqrt(G_H² + G_V²)``.

    Properties: a constant gain on the chip changes nothing (up to ``eps``, whose relative weight
    is ``eps / local mean``); a constant chip gives zero (to rounding); a vertical step ``a | b`` gives a
    ridge one column either side of the step, with value
    ``|log((r·a + b) / ((r+1)·b))|`` on the first ``b`` column and ``|log((r+1)·a / (a + r·b))|``
    on the last ``a`` column (ignoring ``eps``; the shared centre line keeps both below
    ``|log(a/b)|``, which the larger one approaches as ``r`` grows).

    Args:
        x: amplitude batch ``(B, C, H, W)``, ``>= 0`` (negative values make the logs undefined;
            clip first). Any floating dtype, any device; float32 and float64 are computed
            natively, other float types via float32. Not differentiable.
        radii: window radii; each needs ``r < H`` and ``r < W`` (``ValueError`` otherwise).
        eps: added to every pixel before the sums (SAR-JEPA: 1e-2), so empty (zero) regions do
            not divide by zero; must be ``>= 0``.

    Returns:
        ``(B, C, len(radii), H, W)`` magnitudes in nepers, ``x.dtype``, on ``x.device``; scales in
        the order of ``radii``; channels are independent.
    """
    _check_amplitude(x)
    b, c, h, w = x.shape
    radii_t = check_radii(radii, h, w)
    if not eps >= 0:
        raise ValueError(f"eps = {eps!r} must be >= 0")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = b * c
    planes = x.reshape(n, h, w).to(compute)
    out = torch.empty((n, len(radii_t), h, w), dtype=compute, device=x.device)
    big = max(radii_t)
    chunk = _chunk_planes(n, (h + 2 * big + 1) * (w + 2 * big + 1) * 8, x.device)
    with autocast_off(x.device):
        ws = _Workspace(chunk, h, w, big, compute, x.device)
        for start in range(0, n, chunk):
            _gbr_chunk(planes[start:start + chunk], radii_t, float(eps), out[start:start + chunk], ws)
    return out.reshape(b, c, len(radii_t), h, w).to(x.dtype)


@torch.no_grad()
def sobel(x: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """Sobel gradient magnitude of the log-amplitude ``log(x + eps)``, per channel.

    The ablation alternative to the gradient by ratio: a 3x3 difference operator, so it sees
    single-pixel speckle where the ratio operator averages over windows. Kernels are scaled by
    1/8, so a log-amplitude ramp of slope ``k`` nepers per pixel gives ``k``. Taking the log first
    makes a constant gain irrelevant (up to ``eps``). Borders are reflect-padded by one pixel, so
    chips need ``H, W >= 2``.

    Args:
        x: amplitude batch ``(B, C, H, W)``, ``>= 0``, floating point.
        eps: added before the log.

    Returns:
        ``(B, C, H, W)`` in ``x.dtype``.
    """
    _check_amplitude(x)
    b, c, h, w = x.shape
    if h < 2 or w < 2:
        raise ValueError(f"sobel needs chips of at least 2x2 pixels (reflect padding by 1), got {h}x{w}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    with autocast_off(x.device):
        logs = torch.log(x.reshape(b * c, 1, h, w).to(compute) + eps)
        p = F.pad(logs, (1, 1, 1, 1), mode="reflect").squeeze(1)
        # Separable and elementwise rather than conv2d: exact on GPUs too, where float32
        # convolutions may run in TF32 (10-bit mantissa).
        d_col = p[:, :, 2:] - p[:, :, :-2]  # central difference along columns, rows h+2
        d_row = p[:, 2:, :] - p[:, :-2, :]  # along rows, columns w+2
        g_col = (d_col[:, :-2] + 2 * d_col[:, 1:-1] + d_col[:, 2:]) / 8
        g_row = (d_row[:, :, :-2] + 2 * d_row[:, :, 1:-1] + d_row[:, :, 2:]) / 8
        mag = torch.hypot(g_col, g_row)
    return mag.reshape(b, c, h, w).to(x.dtype)


def fuse_scales(maps: torch.Tensor, fuse: str = "mean") -> torch.Tensor:
    """Fuse per-scale maps ``(B, C, S, H, W)`` to one map per channel ``(B, C, H, W)``.

    ``mean`` adds the scales in order, elementwise, rather than through a reduction kernel, whose
    summation order may depend on the tensor's shape on some devices: a chip's fused map must not
    depend on its batch.
    """
    if fuse == "mean":
        total = maps[:, :, 0].clone()
        for s in range(1, maps.shape[2]):
            total += maps[:, :, s]
        return total / maps.shape[2]
    if fuse == "max":
        return maps.amax(dim=2)
    raise ValueError(f"fuse = {fuse!r} is not allowed; choose one of {list(GRADIENT_FUSES)}")


@torch.no_grad()
def gradient_domain(x: torch.Tensor, domain: str = "gradient-by-ratio",
                    radii: Sequence[int] = (5, 9, 13, 17), eps: float = 1e-2,
                    fuse: str = "mean") -> torch.Tensor:
    """The target-encoder input ``∇x``: one map per input channel, so ``∇x`` has ``x``'s layout.

    The EMA target encoder shares its weights' shapes with the context encoder, so ``∇x`` must
    have exactly as many channels as ``x`` (METHOD.md §1): the scales are fused per channel.

    Args:
        x: amplitude batch ``(B, C, H, W)``, ``>= 0``.
        domain: ``gradient-by-ratio`` (default, METHOD.md §2, scales fused by ``fuse``),
            ``sobel`` (Sobel magnitude of ``log(x + eps)``; ``radii`` and ``fuse`` unused) or
            ``identity`` (a copy of ``x``: the target encoder sees the amplitude itself).
        radii, eps: see :func:`gradient_by_ratio`.
        fuse: ``mean`` or ``max`` over scales.

    Returns:
        ``(B, C, H, W)`` in ``x.dtype``, on ``x.device``.
    """
    if domain == "gradient-by-ratio":
        maps = gradient_by_ratio(x, radii, eps)
        with autocast_off(x.device):
            return fuse_scales(maps, fuse)
    if domain == "sobel":
        return sobel(x, eps)
    if domain == "identity":
        _check_amplitude(x)
        return x.clone()
    raise ValueError(f"domain = {domain!r} is not allowed; choose one of {list(GRADIENT_DOMAINS)}")

