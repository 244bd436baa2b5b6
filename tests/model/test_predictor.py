"""Predictor shapes and the independence of target blocks."""

from __future__ import annotations

import torch

from _model_helpers import one_thread  # noqa: F401  (autouse fixture)

from sarjepa_dist.model.predictor import Predictor


def _pred(out_dim=48):
    torch.manual_seed(0)
    return Predictor((8, 8), in_dim=64, dim=32, depth=2, num_heads=2, out_dim=out_dim).eval()


def test_shapes_single_and_multi_block():
    p = _pred()
    ctx = torch.randn(3, 20, 64)
    ctx_idx = torch.arange(20).expand(3, -1)
    assert p(ctx, ctx_idx, torch.randint(0, 64, (3, 7))).shape == (3, 7, 48)
    assert p(ctx, ctx_idx, torch.randint(0, 64, (3, 4, 7))).shape == (3, 4, 7, 48)


def test_blocks_predicted_independently():
    """Block k's prediction depends on the context and block k's positions only."""
    p = _pred()
    ctx = torch.randn(2, 10, 64)
    ctx_idx = torch.arange(10).expand(2, -1)
    tgt = torch.randint(10, 64, (2, 3, 5))
    ref = p(ctx, ctx_idx, tgt)
    tgt2 = tgt.clone()
    tgt2[:, 1] = torch.randint(10, 64, (2, 5))
    out = p(ctx, ctx_idx, tgt2)
    torch.testing.assert_close(out[:, 0], ref[:, 0])
    torch.testing.assert_close(out[:, 2], ref[:, 2])
    torch.testing.assert_close(p(ctx, ctx_idx, tgt[:, 2]), ref[:, 2])  # same as asking for that block alone


def test_positions_matter():
    p = _pred()
    ctx = torch.randn(1, 10, 64)
    ctx_idx = torch.arange(10)[None]
    a = p(ctx, ctx_idx, torch.tensor([[20, 30]]))
    b = p(ctx, ctx_idx, torch.tensor([[40, 50]]))
    assert not torch.allclose(a, b)
