"""condition(): amplitude | log | db with robust per-chip-and-channel scaling."""

from __future__ import annotations

import pytest
import torch

from sarjepa_dist.config import CONDITIONINGS
from sarjepa_dist.transforms import condition

MODES = list(CONDITIONINGS)


def speckle(shape, gain: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float64).exponential_(generator=g).sqrt().mul(gain).float()


def scene(shape, gain: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Speckle with a bright target and a shadow of exact zeros (a clipped noise floor)."""
    x = speckle(shape, gain, seed)
    h, w = shape[-2:]
    x[..., h // 4:h // 2, w // 4:w // 2] *= 40.0
    x[..., h // 2:3 * h // 4, w // 4:w // 2] = 0.0
    return x


@pytest.mark.parametrize("mode", MODES)
def test_output_float32_finite_and_centred(mode):
    x = scene((3, 2, 64, 64), gain=50.0)
    out = condition(x, mode)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # robustly centred: the median of every chip-channel is 0
    med = out.flatten(2).median(dim=-1).values
    assert med.abs().max().item() <= 0.05


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [0.0, 3.5])
def test_constant_and_zero_chips_give_zeros(mode, value):
    out = condition(torch.full((2, 1, 32, 32), value), mode)
    assert torch.isfinite(out).all()
    assert out.abs().max().item() <= 1e-6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gain", [1e-3, 0.3, 7.0, 1e4])
def test_gain_invariant(mode, gain):
    x = scene((2, 1, 64, 64), gain=10.0, seed=1).double()
    base = condition(x, mode)
    assert (condition(x * gain, mode) - base).abs().max().item() <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_channels_scaled_independently(mode):
    x = scene((2, 2, 48, 48), seed=2)
    y = x.clone()
    y[:, 1] *= 1000.0
    out_x, out_y = condition(x, mode), condition(y, mode)
    assert torch.equal(out_x[:, 0], out_y[:, 0])
    assert (out_x[:, 1] - out_y[:, 1]).abs().max().item() <= 1e-4
    # and each chip on its own: a chip's result does not depend on its batch
    assert torch.equal(condition(x[1:], mode), out_x[1:])


@pytest.mark.parametrize("mode", MODES)
def test_a_few_hot_pixels_do_not_rescale_the_chip(mode):
    x = speckle((1, 1, 128, 128), gain=10.0, seed=3)
    hot = x.clone()
    g = torch.Generator().manual_seed(4)
    idx = torch.randperm(128 * 128, generator=g)[:80]  # 0.5 % of the pixels
    hot.view(-1)[idx] = 1e6
    clean = torch.ones(128 * 128, dtype=torch.bool)
    clean[idx] = False
    a, b = condition(x, mode).view(-1)[clean], condition(hot, mode).view(-1)[clean]
    # Min-max or mean/std scaling would squash the clean pixels by orders of magnitude. Here the
    # outliers only shift the ranks: q99 becomes the clean 99.5 % quantile (7 % higher for
    # Rayleigh amplitude, 2 % in log spread), and the median barely moves.
    assert (a - b).abs().max().item() <= 0.1 * (a.max() - a.min()).item()


def test_log_mode_is_a_robust_z_score():
    g = torch.Generator().manual_seed(5)
    v = torch.randn((4, 1, 128, 128), generator=g, dtype=torch.float64) * 0.7 + 3.0
    out = condition(torch.exp(v), "log")  # log-normal amplitude: log(a) is Gaussian
    assert out.flatten(1).std(dim=1).sub(1.0).abs().max().item() <= 0.05
    assert out.flatten(1).median(dim=1).values.abs().max().item() <= 0.03


def test_db_mode_reads_tens_of_db_above_the_median():
    x = torch.full((1, 1, 40, 40), 5.0)
    x[..., :10, :10] = 50.0  # 20 dB above the background (the median)
    x[..., 30:, 30:] = 0.5  # 20 dB below
    out = condition(x, "db")
    assert out[..., 20, 20].item() == pytest.approx(0.0, abs=1e-6)
    assert out[..., :10, :10].sub(2.0).abs().max().item() <= 0.01
    assert out[..., 30:, 30:].add(2.0).abs().max().item() <= 0.01
    # log mode renormalises contrast instead, so it reads differently
    assert not torch.allclose(condition(x, "log"), out)


def test_amplitude_mode_is_affine_in_amplitude():
    x = scene((1, 1, 32, 32), gain=20.0, seed=6)
    out = condition(x, "amplitude").double().flatten()
    a = x.double().flatten()
    slope = (out.max() - out.min()) / (a.max() - a.min())
    torch.testing.assert_close(out, out.min() + slope * (a - a.min()), rtol=0, atol=1e-5)
    assert slope > 0


@pytest.mark.parametrize("mode", MODES)
def test_negative_values_clip_to_zero_and_dtypes(mode):
    x = scene((2, 1, 32, 32), gain=3.0, seed=7)
    neg = x.clone()
    neg[..., :4, :4] = -5.0
    clipped = neg.clamp_min(0)
    assert torch.equal(condition(neg, mode), condition(clipped, mode))
    out64 = condition(x.double(), mode)
    assert out64.dtype == torch.float32
    assert (out64 - condition(x, mode)).abs().max().item() <= 1e-4
    as_uint8 = condition((x * 10).clamp(0, 255).to(torch.uint8), mode)
    assert as_uint8.dtype == torch.float32 and torch.isfinite(as_uint8).all()


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        condition(torch.ones(1, 1, 8, 8), "linear")
    with pytest.raises(ValueError, match="B, C, H, W"):
        condition(torch.ones(8, 8), "log")
