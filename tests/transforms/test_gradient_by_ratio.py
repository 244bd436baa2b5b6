"""gradient_by_ratio, sobel and gradient_domain against the METHOD.md §2 formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sarjepa_dist.transforms import (
    gradient_by_ratio,
    gradient_domain,
    sobel,
)

RADII = (5, 9, 13, 17)
EPS = 1e-2


# --------------------------------------------------------------------------- references and data


def reference_gbr(x: torch.Tensor, radii=RADII, eps: float = EPS) -> torch.Tensor:
    """The formula done directly, in float64: four half-window box convolutions per scale."""
    b, c, h, w = x.shape
    planes = x.to(torch.float64).reshape(b * c, 1, h, w)
    scales = []
    for r in radii:
        k = 2 * r + 1
        kernels = torch.zeros((4, 1, k, k), dtype=torch.float64)
        kernels[0, 0, :r + 1, :] = 1  # top: rows 0..r
        kernels[1, 0, r:, :] = 1  # bottom: rows r..2r
        kernels[2, 0, :, :r + 1] = 1  # left: columns 0..r
        kernels[3, 0, :, r:] = 1  # right: columns r..2r
        sums = F.conv2d(F.pad(planes, (r, r, r, r), mode="reflect") + eps, kernels)
        g_v = torch.log(sums[:, 0] / sums[:, 1])
        g_h = torch.log(sums[:, 2] / sums[:, 3])
        scales.append(torch.sqrt(g_h ** 2 + g_v ** 2))
    return torch.stack(scales, dim=1).reshape(b, c, len(radii), h, w)


def loop_gbr(chip: np.ndarray, r: int, eps: float) -> np.ndarray:
    """One chip, one radius, explicit loops over pixels: checks the reference's conventions."""
    h, w = chip.shape
    p = np.pad(chip.astype(np.float64), r, mode="reflect") + eps
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            win = p[i:i + 2 * r + 1, j:j + 2 * r + 1]
            top, bottom = win[:r + 1].mean(), win[r:].mean()
            left, right = win[:, :r + 1].mean(), win[:, r:].mean()
            out[i, j] = math.hypot(math.log(left / right), math.log(top / bottom))
    return out


def speckle(shape, gain: float = 100.0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Single-look speckle: exponential intensity, amplitude = sqrt(Exp(1)) * gain."""
    g = torch.Generator().manual_seed(seed)
    intensity = torch.empty(shape, dtype=torch.float64).exponential_(generator=g)
    return (intensity.sqrt() * gain).to(dtype)


def scene(shape, gain: float = 100.0, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Speckle with a bright target (x30) and a dark shadow (x0.02): 60 dB of dynamic range."""
    x = speckle(shape, gain, seed, torch.float64)
    h, w = shape[-2:]
    x[..., h // 3:h // 2, w // 4:w // 2] *= 30.0
    x[..., h // 2:2 * h // 3, w // 4:w // 2] *= 0.02
    return x.to(dtype)


# --------------------------------------------------------------------------- the formula


def test_reference_matches_explicit_loops():
    chip = speckle((1, 1, 12, 15), gain=3.0, seed=1, dtype=torch.float64)
    for r in (1, 3, 5):
        ref = reference_gbr(chip, (r,))[0, 0, 0].numpy()
        np.testing.assert_allclose(ref, loop_gbr(chip[0, 0].numpy(), r, EPS), rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [speckle, scene])
@pytest.mark.parametrize("gain", [1.0, 100.0])
def test_float32_matches_float64_reference_on_128px(make, gain):
    x = make((2, 1, 128, 128), gain=gain, seed=2)
    ours = gradient_by_ratio(x, RADII, EPS)
    ref = reference_gbr(x, RADII, EPS)
    assert ours.shape == (2, 1, 4, 128, 128)
    assert ours.dtype == torch.float32
    err = (ours.double() - ref).abs().max().item()
    assert err <= 1e-4, f"max abs error {err:.3g} vs float64 reference"


@pytest.mark.parametrize("size,radii", [
    ((18, 18), RADII),  # the smallest chip radius 17 allows
    ((18, 31), RADII),
    ((33, 20), (3, 8, 19)),
    ((2, 2), (1,)),
    ((64, 64), (2, 7)),
    ((40, 57), (17, 5)),  # any radius order; output follows it
])
def test_float64_matches_reference_at_many_sizes(size, radii):
    x = scene((2, 1) + size, gain=10.0, seed=3, dtype=torch.float64)
    ours = gradient_by_ratio(x, radii, EPS)
    assert ours.shape == (2, 1, len(radii)) + size
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, reference_gbr(x, radii, EPS), rtol=0, atol=1e-10)


@pytest.mark.parametrize("size,radius", [((17, 17), 17), ((17, 40), 17), ((40, 17), 17), ((1, 5), 1)])
def test_radius_too_large_for_chip_is_a_clear_error(size, radius):
    x = torch.ones((1, 1) + size)
    message = rf"radius {radius}.*{size[0]}x{size[1]}.*at least {radius + 1}x{radius + 1}"
    with pytest.raises(ValueError, match=message):
        gradient_by_ratio(x, (5, radius) if radius > 5 else (radius,))
    # one pixel more on the short side is enough
    grown = torch.ones((1, 1) + tuple(max(s, radius + 1) for s in size))
    assert gradient_by_ratio(grown, (radius,)).shape[-2:] == grown.shape[-2:]


@pytest.mark.parametrize("bad", [(), (0,), (-3,), (2.5,)])
def test_bad_radii_rejected(bad):
    with pytest.raises(ValueError):
        gradient_by_ratio(torch.ones(1, 1, 32, 32), bad)


def test_rejects_non_batch_and_integer_input():
    with pytest.raises(ValueError, match="B, C, H, W"):
        gradient_by_ratio(torch.ones(1, 32, 32))
    with pytest.raises(TypeError, match="floating"):
        gradient_by_ratio(torch.ones(1, 1, 32, 32, dtype=torch.uint8))


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("gain", [0.3, 3.0])
def test_gain_invariance(gain):
    x = speckle((2, 1, 64, 64), gain=100.0, seed=4, dtype=torch.float64)
    x[..., 20:30, 20:40] *= 10.0  # a bright target, so there are ridges to preserve
    base = gradient_by_ratio(x)
    scaled = gradient_by_ratio(x * gain)
    # log((gA + eps) / (gB + eps)) = log(A / B) + f(gA) - f(gB) with f(t) = log(1 + eps / t), and
    # |f(gA) - f(A)| <= eps / (min(g, 1) * A): each log term moves by at most
    # 2 eps / (min(g, 1) * m), m the smallest half-window mean, and the magnitude by twice that.
    planes = x.reshape(-1, 1, 64, 64)
    m_min = min(F.avg_pool2d(F.pad(planes, (r, r, r, r), mode="reflect"), shape, stride=1).min().item()
                for r in RADII for shape in ((r + 1, 2 * r + 1), (2 * r + 1, r + 1)))
    bound = 4 * EPS / (min(gain, 1.0) * m_min)
    diff = (scaled - base).abs().max().item()
    assert diff <= bound, f"gain {gain}: max change {diff:.3g} > bound {bound:.3g}"
    assert bound < 0.02  # the test means something: ridges here are ~1-3 nepers
    # Without eps the invariance is exact up to rounding.
    exact = (gradient_by_ratio(x * gain, eps=0.0) - gradient_by_ratio(x, eps=0.0)).abs().max().item()
    assert exact <= 1e-9


@pytest.mark.parametrize("value", [0.0, 0.37, 250.0])
def test_constant_chip_gives_zero(value):
    x = torch.full((2, 3, 40, 36), value)
    out = gradient_by_ratio(x)
    assert out.abs().max().item() <= 1e-6


@pytest.mark.parametrize("a,b", [(100.0, 10.0), (5.0, 80.0)])
def test_vertical_step_edge_ridge(a, b):
    h, w, edge = 48, 64, 32  # columns < 32 hold a, columns >= 32 hold b
    x = torch.full((1, 1, h, w), b, dtype=torch.float64)
    x[..., :edge] = a
    out = gradient_by_ratio(x, RADII, EPS)[0, 0]
    ae, be = a + EPS, b + EPS
    for s, r in enumerate(RADII):
        # last `a` column: left half all a, right half one a column + r b columns
        last_a = abs(math.log(ae / ((a + r * b) / (r + 1) + EPS)))
        # first `b` column: left half r a columns + one b column, right half all b
        first_b = abs(math.log(((r * a + b) / (r + 1) + EPS) / be))
        torch.testing.assert_close(out[s, :, edge - 1], torch.full((h,), last_a, dtype=torch.float64))
        torch.testing.assert_close(out[s, :, edge], torch.full((h,), first_b, dtype=torch.float64))
        # the ridge never exceeds |log(a/b)|, and its peak (darker side) approaches it as r grows
        assert max(last_a, first_b) < abs(math.log(ae / be))
        assert max(last_a, first_b) >= abs(math.log(ae / be)) - math.log((r + 1) / r) - 1e-9
        # nothing more than r columns from the edge (the window does not reach it)
        assert out[s, :, :edge - r].abs().max().item() <= 1e-9
        assert out[s, :, edge + r + 1:].abs().max().item() <= 1e-9
        # only the horizontal ratio responds: the profile is the same on every row
        assert (out[s] - out[s, :1]).abs().max().item() <= 1e-9


def test_channels_are_independent():
    speck = speckle((3, 1, 50, 50), seed=5)
    step = torch.ones((3, 1, 50, 50)) * 7.0
    step[..., 25:] = 70.0
    both = gradient_by_ratio(torch.cat([speck, step], dim=1))
    assert both.shape == (3, 2, 4, 50, 50)
    assert torch.equal(both[:, 0:1], gradient_by_ratio(speck))
    assert torch.equal(both[:, 1:2], gradient_by_ratio(step))
    swapped = gradient_by_ratio(torch.cat([step, speck], dim=1))
    assert torch.equal(swapped.flip(1), both)


def test_batch_composition_does_not_change_a_chip():
    """More chips than one CPU chunk: each chip equals its own single-chip result, bit for bit."""
    x = scene((21, 1, 96, 96), seed=6)
    full = gradient_by_ratio(x)
    for i in (0, 7, 20):
        assert torch.equal(full[i:i + 1], gradient_by_ratio(x[i:i + 1]))
    assert torch.equal(full[3:17], gradient_by_ratio(x[3:17]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_preserved(dtype):
    x = speckle((2, 1, 32, 32), seed=7).to(dtype)
    out = gradient_by_ratio(x, (3, 7))
    assert out.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2e-2}[dtype]
    assert (out.double() - reference_gbr(x, (3, 7))).abs().max().item() <= tol


def test_non_contiguous_input():
    x = speckle((2, 1, 64, 80), seed=8)
    view = x.transpose(-1, -2)
    torch.testing.assert_close(gradient_by_ratio(view, (4,)),
                               gradient_by_ratio(view.contiguous(), (4,)), rtol=0, atol=0)


def test_empty_batch():
    assert gradient_by_ratio(torch.ones(0, 2, 32, 32)).shape == (0, 2, 4, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = scene((3, 2, 128, 128), seed=9)
    cpu = gradient_by_ratio(x)
    gpu = gradient_by_ratio(x.cuda())
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-5
    assert (gpu.cpu().double() - reference_gbr(x)).abs().max().item() <= 1e-4
    g = gradient_domain(x.cuda(), "sobel")
    torch.testing.assert_close(g.cpu(), sobel(x), rtol=1e-5, atol=1e-5)
    # a train step's autocast region must not change the numbers (cumsum/log would drop precision)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        under = gradient_by_ratio(x.cuda())
    assert torch.equal(under, gpu)
    gpu64 = gradient_by_ratio(x.cuda().double())
    assert gpu64.dtype == torch.float64
    assert (gpu64.cpu() - reference_gbr(x)).abs().max().item() <= 1e-10


# --------------------------------------------------------------------------- domains and features


def test_gradient_domain_fuses_scales_per_channel():
    x = scene((2, 2, 48, 48), seed=10)
    maps = gradient_by_ratio(x, (3, 6, 11))
    mean = gradient_domain(x, "gradient-by-ratio", (3, 6, 11), EPS, "mean")
    mx = gradient_domain(x, "gradient-by-ratio", (3, 6, 11), EPS, "max")
    assert mean.shape == mx.shape == x.shape
    torch.testing.assert_close(mean, maps.mean(dim=2))
    torch.testing.assert_close(mx, maps.amax(dim=2))
    assert (mx >= mean - 1e-6).all()


def test_gradient_domain_identity_and_errors():
    x = speckle((1, 2, 16, 16))
    ident = gradient_domain(x, "identity")
    assert torch.equal(ident, x) and ident.data_ptr() != x.data_ptr()
    with pytest.raises(ValueError, match="domain"):
        gradient_domain(x, "hog")
    with pytest.raises(ValueError, match="fuse"):
        gradient_domain(x, "gradient-by-ratio", (3,), EPS, "median")


def test_sobel_of_log_ramp_and_gain():
    k = 0.05  # nepers per pixel along columns
    cols = torch.arange(40, dtype=torch.float64)
    x = torch.exp(k * cols).expand(1, 1, 30, 40).clone() * 1e4  # bright: eps is negligible
    mag = sobel(x, eps=EPS)
    assert mag.shape == x.shape and mag.dtype == torch.float64
    torch.testing.assert_close(mag[..., 1:-1, 1:-1], torch.full_like(mag[..., 1:-1, 1:-1], k),
                               rtol=0, atol=1e-6)
    y = speckle((2, 1, 32, 32), gain=100.0, seed=11, dtype=torch.float64)
    # per pixel log(3y + eps) - log(y + eps) - log 3 is within eps / y_min; the 1/8-scaled kernels
    # have absolute weights summing to 1 per direction, so the magnitude moves by <= 2 eps / y_min
    assert (sobel(3 * y) - sobel(y)).abs().max().item() <= 2 * EPS / y.min().item()
    assert sobel(torch.full((1, 1, 8, 8), 2.0)).abs().max().item() == 0.0
    # the 3x3 Sobel kernels, done directly
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], dtype=torch.float64) / 8
    logs = F.pad(torch.log(y + EPS), (1, 1, 1, 1), mode="reflect").reshape(2, 1, 34, 34)
    grads = F.conv2d(logs, torch.stack([kx, kx.t()]).unsqueeze(1))
    torch.testing.assert_close(sobel(y, EPS), grads.norm(dim=1, keepdim=True), rtol=0, atol=1e-12)
    assert torch.equal(gradient_domain(y, "sobel", eps=EPS), sobel(y, EPS))
    with pytest.raises(ValueError, match="2x2"):
        sobel(torch.ones(1, 1, 1, 8))

