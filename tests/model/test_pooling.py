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


def _tiny_encoder():
    from sarjepa_dist.config import ModelConfig
    from sarjepa_dist.model.encoder import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(encoder="vit_tiny", patch_size=4, depth=2), img_size=16, in_chans=1)
    return enc.eval()


def test_hflip_views_make_features_mirror_invariant():
    """Averaging a chip with its azimuth mirror: mean features equal for a chip and its mirror, and the
    token layout of the mirror is the mirrored layout (patch-aligned), while a plain ViT is neither."""
    from sarjepa_dist.model.pooling import encode_tokens

    enc = _tiny_encoder()
    x = torch.rand(3, 1, 16, 16)
    mirror = x.flip(-1)
    with torch.no_grad():
        plain, plain_m = encode_tokens(enc, x, enc.grid_size), encode_tokens(enc, mirror, enc.grid_size)
        tta, tta_m = encode_tokens(enc, x, enc.grid_size, "hflip"), encode_tokens(enc, mirror, enc.grid_size, "hflip")
    torch.testing.assert_close(plain, enc(x))
    assert not torch.allclose(pool_tokens(plain, enc.grid_size, "mean"), pool_tokens(plain_m, enc.grid_size, "mean"),
                              atol=1e-4)
    torch.testing.assert_close(pool_tokens(tta, enc.grid_size, "mean"), pool_tokens(tta_m, enc.grid_size, "mean"),
                               atol=1e-5, rtol=1e-5)
    grid_m = pool_tokens(tta_m, enc.grid_size, "grid2").reshape(3, -1, 2, 2)
    torch.testing.assert_close(pool_tokens(tta, enc.grid_size, "grid2").reshape(3, -1, 2, 2), grid_m.flip(-1),
                               atol=1e-5, rtol=1e-5)


def test_unknown_tta_is_refused():
    from sarjepa_dist.model.pooling import encode_tokens

    enc = _tiny_encoder()
    with pytest.raises(ValueError, match="tta = 'rot90'"):
        encode_tokens(enc, torch.rand(1, 1, 16, 16), enc.grid_size, "rot90")
