"""The row-restricted block and the speed-ups built on it give the unrestricted numbers."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block

from _model_helpers import one_thread  # noqa: F401  (autouse fixture)

from sarjepa_dist.config import ModelConfig
from sarjepa_dist.model.blocks import block_rows
from sarjepa_dist.model.encoder import build_encoder, gather_tokens
from sarjepa_dist.model.predictor import Predictor, block_attention_mask


def _block(drop_path: float = 0.0) -> Block:
    torch.manual_seed(0)
    blk = Block(dim=32, num_heads=2, qkv_bias=True, drop_path=drop_path)
    blk.attn.fused_attn = True
    return blk


def test_block_rows_slice_matches_full_block_in_train_mode_with_drop_path():
    blk = _block(drop_path=0.5).train()
    x = torch.randn(6, 9, 32)
    torch.manual_seed(1)
    full = blk(x)[:, 4:]
    torch.manual_seed(1)  # same per-sample drop-path draws, in the same order
    torch.testing.assert_close(block_rows(blk, x, slice(4, None)), full)


def test_block_rows_per_sample_indices_and_attention_mask():
    blk = _block().eval()
    x = torch.randn(3, 10, 32)
    rows = torch.tensor([[0, 5, 5], [9, 1, 2], [3, 3, 8]])
    torch.testing.assert_close(block_rows(blk, x, rows), gather_tokens(blk(x), rows))
    mask = block_attention_mask(4, 3, 2, x.device)
    torch.testing.assert_close(block_rows(blk, x, slice(4, None), mask), blk(x, attn_mask=mask)[:, 4:])


def _per_block_reference(p: Predictor, ctx_tokens, ctx_idx, tgt_idx):
    """The predictor as first written: every block over every row, context repeated per block."""
    b, kc, _ = ctx_tokens.shape
    _, m, kt = tgt_idx.shape
    pos = p.pos_embed.expand(b, -1, -1)
    ctx = (p.embed(ctx_tokens) + gather_tokens(pos, ctx_idx)).unsqueeze(1).expand(b, m, kc, p.dim)
    tgt = gather_tokens(pos, tgt_idx) + p.mask_token
    x = torch.cat([ctx.reshape(b * m, kc, p.dim), tgt.reshape(b * m, kt, p.dim)], dim=1)
    for blk in p.blocks:
        x = blk(x)
    return p.proj(p.norm(x[:, kc:])).reshape(b, m, kt, p.out_dim)


def test_predictor_matches_per_block_reference_values_and_gradients():
    torch.manual_seed(0)
    p = Predictor((8, 8), in_dim=48, dim=32, depth=3, num_heads=2, out_dim=40).train()
    ctx = torch.randn(4, 12, 48, requires_grad=True)
    ctx_idx = torch.randperm(64)[:12].sort().values.expand(4, -1)
    tgt_idx = torch.randint(0, 64, (4, 3, 5))
    got = p(ctx, ctx_idx, tgt_idx)
    want = _per_block_reference(p, ctx, ctx_idx, tgt_idx)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, [ctx, *p.parameters()], g)
    want_grads = torch.autograd.grad(want, [ctx, *p.parameters()], g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_shared_context_predicts_each_block_as_if_alone_and_differs_from_per_block():
    torch.manual_seed(0)
    shared = Predictor((8, 8), in_dim=48, dim=32, depth=2, num_heads=2, out_dim=40, shared_context=True).eval()
    per_block = Predictor((8, 8), in_dim=48, dim=32, depth=2, num_heads=2, out_dim=40).eval()
    per_block.load_state_dict(shared.state_dict())
    ctx = torch.randn(2, 10, 48)
    ctx_idx = torch.arange(10).expand(2, -1)
    tgt_idx = torch.randint(10, 64, (2, 3, 4))
    out = shared(ctx, ctx_idx, tgt_idx)
    for j in range(3):  # block j sees the context and itself only
        torch.testing.assert_close(out[:, j], shared(ctx, ctx_idx, tgt_idx[:, j]))
    assert not torch.allclose(out, per_block(ctx, ctx_idx, tgt_idx))


def test_encoder_forward_rows_matches_gathered_forward():
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(encoder="vit_tiny", depth=2), 32, 1).eval()
    x = torch.randn(3, 1, 32, 32)
    rows = torch.randint(0, enc.num_patches, (3, 7))
    torch.testing.assert_close(enc.forward_rows(x, rows), gather_tokens(enc(x), rows))
