import pytest
import torch

from sarjepa_dist.model.pooling import pool_tokens


def _tokens_from_maps(maps: torch.Tensor) -> torch.Tensor:
    b, d, h, w = maps.shape
    return maps.reshape(b, d, h * w).transpose(1, 2)


def test_mean_pooling_is_the_token_mean():
    t = torch.randn(3, 16, 5)
    assert torch.allclose(pool_tokens(t, (4, 4), "mean"), t.mean(1))


def test_grid_pooling_keeps_the_layout():
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, :4, :4] = 1.0  # top-left quadrant lit
    out = pool_tokens(_tokens_from_maps(maps), (8, 8), "grid2")
    assert out.shape == (1, 4)
    assert out.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    out4 = pool_tokens(_tokens_from_maps(maps), (8, 8), "grid4")
    assert out4.shape == (1, 16)
    assert out4.reshape(4, 4)[:2, :2].eq(1).all() and out4.sum() == 4


def test_grid_features_are_channel_major():
    maps = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    out = pool_tokens(_tokens_from_maps(maps), (4, 4), "grid2")
    expected = torch.nn.functional.adaptive_avg_pool2d(maps, (2, 2)).flatten(1)
    assert torch.equal(out, expected)


def test_centre_pooling_ignores_the_border():
    maps = torch.full((1, 1, 8, 8), 5.0)
    maps[0, 0, 2:6, 2:6] = 1.0  # the central half of each side
    assert pool_tokens(_tokens_from_maps(maps), (8, 8), "centre").item() == pytest.approx(1.0)


def test_bad_pooling_and_grid_mismatch_are_refused():
    t = torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="pooling = 'cls'"):
        pool_tokens(t, (4, 4), "cls")
    with pytest.raises(ValueError, match="do not fill a 5x5"):
        pool_tokens(t, (5, 5), "mean")
