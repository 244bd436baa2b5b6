"""Property-based tests (hypothesis) of the transforms over arbitrary valid shapes and parameters.

The example-based tests pin values on chosen chips; these check what must hold for every chip:
finite outputs, the invariances METHOD.md §2 and the docstrings promise, and the bounds that follow
from the definitions (a mean of positive numbers lies between their extremes).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sarjepa_dist.transforms import augment_batch, condition, gradient_by_ratio

PROPERTY = settings(max_examples=40, deadline=None)
# The float64 integral image carries an absolute error of ~1e-16 x the chip's total; over the
# darkest half-window (eps only) of a chip with 1e6 dynamic range that is ~1e-5 in a log-ratio.
GBR_ATOL = 1e-5
LEVELS = st.sampled_from([1e-3, 1.0, 1e3])  # absolute amplitude levels: the transforms must not care


@st.composite
def amplitude_chips(draw, min_side: int = 1, max_side: int = 24, zeros: bool = True) -> torch.Tensor:
    """A float64 (B, C, H, W) amplitude batch: speckle over a random level, maybe a bright block and
    (with ``zeros``) some zero pixels, from a drawn seed so that shrinking keeps shapes simple."""
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h, w = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.empty((b, c, h, w), dtype=torch.float64).exponential_(generator=g).sqrt() * draw(LEVELS)
    if draw(st.booleans()):
        x[..., : max(1, h // 3), : max(1, w // 2)] *= draw(st.sampled_from([30.0, 1e3]))
    if zeros and draw(st.booleans()):
        x[torch.rand(x.shape, generator=g, dtype=torch.float64) < draw(st.sampled_from([0.05, 0.6]))] = 0.0
    return x


@st.composite
def chips_and_radii(draw) -> tuple[torch.Tensor, tuple[int, ...]]:
    x = draw(amplitude_chips(min_side=2))
    r_max = min(x.shape[-2:]) - 1
    radii = draw(st.lists(st.integers(1, min(r_max, 9)), min_size=1, max_size=3))
    return x, tuple(radii)


# --------------------------------------------------------------------------- gradient by ratio


@PROPERTY
@given(chips_and_radii(), st.sampled_from([1e-2, 1e-4, 1.0]))
def test_gbr_is_finite_non_negative_and_bounded(case, eps):
    """Each half-window mean of ``x + eps`` lies in [min + eps, max + eps], so each log-ratio is at
    most ``L = log((max + eps) / (min + eps))`` in size and the magnitude at most ``√2 · L``."""
    x, radii = case
    out = gradient_by_ratio(x, radii, eps)
    assert out.shape == (*x.shape[:2], len(radii), *x.shape[2:]) and out.dtype == x.dtype
    assert torch.isfinite(out).all() and (out >= 0).all()
    lo = x.amin(dim=(-2, -1)) + eps
    hi = x.amax(dim=(-2, -1)) + eps
    bound = math.sqrt(2) * torch.log(hi / lo)[:, :, None, None, None]
    assert (out <= bound * (1 + 1e-6) + GBR_ATOL).all()


@PROPERTY
@given(chips_and_radii(), st.floats(1e-3, 1e3), st.sampled_from([1e-2, 1.0]))
def test_gbr_gain_invariance_is_exact_when_eps_scales_with_the_gain(case, gain, eps):
    """Every half-window mean scales by the gain, so with ``eps`` scaled too every ratio is unchanged
    (METHOD.md §2: the operator sees contrast, not level)."""
    x, radii = case
    torch.testing.assert_close(gradient_by_ratio(x * gain, radii, eps * gain), gradient_by_ratio(x, radii, eps),
                               rtol=1e-6, atol=GBR_ATOL)


@PROPERTY
@given(chips_and_radii())
def test_gbr_commutes_with_transposes_and_flips(case):
    """A transpose swaps the vertical and horizontal ratios, a flip inverts one of them: the magnitude
    ``sqrt(G_H² + G_V²)`` only moves with the pixels (reflect padding is symmetric too)."""
    x, radii = case
    out = gradient_by_ratio(x, radii)
    torch.testing.assert_close(gradient_by_ratio(x.transpose(-1, -2), radii), out.transpose(-1, -2),
                               rtol=1e-6, atol=GBR_ATOL)
    for dims in ((-1,), (-2,)):
        torch.testing.assert_close(gradient_by_ratio(x.flip(dims), radii), out.flip(dims), rtol=1e-6, atol=GBR_ATOL)


@PROPERTY
@given(chips_and_radii(), st.floats(0.0, 1e3))
def test_gbr_of_a_constant_chip_is_zero(case, value):
    x, radii = case
    out = gradient_by_ratio(torch.full_like(x, value), radii)
    assert float(out.abs().max()) < 1e-9


# --------------------------------------------------------------------------- conditioning

MODES = st.sampled_from(["amplitude", "log", "db"])


@PROPERTY
@given(amplitude_chips(max_side=40), MODES)
def test_condition_is_finite_float32_and_order_preserving(x, mode):
    """Per chip-channel, conditioning is an increasing map of the amplitude (a shift and a positive
    scale of ``a``, ``log(a + δ)`` or ``dB(a + δ)``): it keeps the order of the pixels."""
    out = condition(x, mode)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    flat_x, flat_out = x.flatten(2), out.flatten(2).double()
    order = flat_x.argsort(dim=-1)
    sorted_out = flat_out.gather(-1, order)
    assert (sorted_out[..., 1:] >= sorted_out[..., :-1] - 1e-5 * (1 + sorted_out.abs()[..., 1:])).all()


@PROPERTY
@given(amplitude_chips(max_side=40), MODES)
def test_condition_puts_the_median_pixel_at_zero(x, mode):
    """Centred on the median: up to 64² pixels the quantiles are taken over every pixel (nearest
    rank), so the pixel holding the median maps to 0 exactly."""
    out = condition(x, mode)
    flat_x = x.flatten(2)
    med = torch.quantile(flat_x, 0.5, dim=-1, interpolation="nearest", keepdim=True)
    at_median = (flat_x == med)
    assert (out.flatten(2)[at_median].abs() < 1e-6).all()


@PROPERTY
@given(amplitude_chips(max_side=40), MODES, st.floats(1e-1, 1e3))
def test_condition_is_gain_invariant(x, mode, gain):
    """Invariant up to rounding while the log offset δ = 1e-3 · level dwarfs its 1e-12 floor: chips
    scaled to a peak of 1, gains from 0.1 up."""
    x = x / x.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(condition(x * gain, mode), condition(x, mode), rtol=1e-4, atol=1e-4)


@PROPERTY
@given(amplitude_chips(max_side=16), MODES)
def test_condition_clips_negative_amplitudes_and_zero_chips_give_zero(x, mode):
    signed = x * torch.where(torch.arange(x.numel()).reshape(x.shape) % 3 == 0, -1.0, 1.0).double()
    torch.testing.assert_close(condition(signed, mode), condition(signed.clamp_min(0), mode), rtol=0, atol=0)
    assert (condition(torch.zeros_like(x), mode) == 0).all()


# --------------------------------------------------------------------------- augmentation


@st.composite
def augment_cases(draw):
    x = draw(amplitude_chips(max_side=20, zeros=False)).float()
    # channel k is (k + 1) × channel 0: one geometry per sample keeps that relation exactly
    x = torch.cat([x[:, :1] * (k + 1) for k in range(x.shape[1])], dim=1)
    lo = draw(st.floats(0.05, 1.0))
    hi = draw(st.floats(lo, 1.0))
    return x, draw(st.integers(1, 24)), (lo, hi), draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 99))


@PROPERTY
@given(augment_cases())
def test_augment_shape_range_channels_and_determinism(case):
    """Bilinear antialiased weights are non-negative and sum to one: every output pixel lies within
    its sample's input range; all channels of a sample share one geometry; a seed fixes the result."""
    x, size, scale, flips, rot90, seed = case
    out = augment_batch(x, size, scale, flips, rot90, torch.Generator().manual_seed(seed))
    assert out.shape == (x.shape[0], x.shape[1], size, size) and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    slack = 1e-5 * hi
    assert ((out >= lo - slack) & (out <= hi + slack)).all()
    for k in range(1, x.shape[1]):
        torch.testing.assert_close(out[:, k], out[:, 0] * (k + 1), rtol=1e-5, atol=1e-6 * float(hi.max()))
    again = augment_batch(x, size, scale, flips, rot90, torch.Generator().manual_seed(seed))
    assert torch.equal(out, again)


@PROPERTY
@given(amplitude_chips(max_side=20, zeros=False), st.booleans(), st.booleans(), st.integers(0, 99))
def test_augment_without_crop_or_resize_permutes_pixels(x, flips, rot90, seed):
    """crop_scale (1, 1) on a square chip at its own size is a pure dihedral transform: the output
    holds exactly the input's pixels, rearranged."""
    side = min(x.shape[-2:])
    x = x[..., :side, :side].float()
    out = augment_batch(x, side, (1.0, 1.0), flips, rot90, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out.flatten(2).sort(dim=-1).values, x.flatten(2).sort(dim=-1).values,
                               rtol=0, atol=0)
