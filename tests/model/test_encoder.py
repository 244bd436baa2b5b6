"""Encoder: token dropping, fixed sin-cos positions, fused attention, timm compatibility."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from _model_helpers import one_thread, CHANS, IMG, tiny_cfg  # noqa: F401
from sarjepa_dist.model.encoder import build_encoder, gather_tokens, sincos_pos_embed_2d


def _enc():
    torch.manual_seed(0)
    return build_encoder(tiny_cfg(), IMG, CHANS).eval()


def test_attributes_and_shapes():
    enc = _enc()
    assert enc.grid_size == (8, 8) and enc.num_patches == 64 and enc.embed_dim == 192
    x = torch.rand(2, CHANS, IMG, IMG)
    assert enc(x).shape == (2, 64, 192)
    keep = torch.tensor([[0, 5, 9], [1, 2, 63]])
    assert enc(x, keep).shape == (2, 3, 192)


def test_keep_all_equals_plain_timm_forward():
    enc = _enc()
    x = torch.rand(3, CHANS, IMG, IMG)
    all_idx = torch.arange(64).expand(3, -1)
    full = enc.vit.forward_features(x)
    torch.testing.assert_close(enc(x), full)
    torch.testing.assert_close(enc(x, all_idx), full)
    torch.testing.assert_close(enc.forward_features_pooled(x), enc.vit(x))  # num_classes=0: pooled features
    torch.testing.assert_close(enc.vit(x), full.mean(1))


def test_embedded_tokens_are_contiguous_so_blocks_do_not_copy_them():
    # timm's patch embedding returns a transposed view; left so, the residual stream keeps that
    # layout through every block and each layer norm / linear copies its input
    enc = _enc()
    x = torch.rand(2, CHANS, IMG, IMG)
    assert not enc.vit.patch_embed(x).is_contiguous()
    tokens = enc.embed(x)
    assert tokens.is_contiguous()
    assert enc.vit.blocks[0](tokens).is_contiguous()


def test_subset_runs_blocks_on_gathered_tokens_only():
    enc = _enc()
    x = torch.rand(2, CHANS, IMG, IMG)
    keep = torch.tensor([[3, 10, 20, 40], [0, 1, 2, 63]])
    tokens = gather_tokens(enc.embed(x), keep)
    expected = enc.vit.norm(enc.vit.blocks(tokens))
    torch.testing.assert_close(enc(x, keep), expected)


def test_dropped_patches_do_not_influence_kept_outputs():
    enc = _enc()
    x = torch.rand(1, CHANS, IMG, IMG)
    keep = torch.tensor([[9, 10, 17, 18]])  # patches in rows 1-2, cols 1-2 of the 8x8 grid
    ref = enc(x, keep)
    x2 = x.clone()
    x2[..., 24:32, 24:32] += 5.0  # patch 63 (dropped)
    torch.testing.assert_close(enc(x2, keep), ref)
    x3 = x.clone()
    x3[..., 4:8, 4:8] += 5.0  # patch 9 (kept): every kept token changes through attention
    assert not torch.allclose(enc(x3, keep), ref)


def test_sincos_positions_fixed_and_not_trainable():
    enc = _enc()
    pe = enc.vit.pos_embed
    assert not pe.requires_grad
    torch.testing.assert_close(pe[0], sincos_pos_embed_2d(192, (8, 8)))
    table = sincos_pos_embed_2d(192, (8, 8))
    assert table.shape == (64, 192)
    assert torch.cdist(table, table).add(torch.eye(64) * 1e3).min() > 0.1  # every position distinct
    # first half encodes the row, second half the column
    torch.testing.assert_close(table[0, :96], table[7, :96])
    torch.testing.assert_close(table[0, 96:], table[56, 96:])


def test_fused_attention_on():
    enc = _enc()
    assert all(blk.attn.fused_attn for blk in enc.vit.blocks)


def test_timm_kwargs_rebuild_plain_timm():
    enc = _enc()
    vit = VisionTransformer(**enc.timm_kwargs)
    vit.load_state_dict(enc.vit.state_dict(), strict=True)
    x = torch.rand(2, CHANS, IMG, IMG)
    torch.testing.assert_close(vit.eval()(x), enc.forward_features_pooled(x))
    assert enc.timm_kwargs["class_token"] is False and enc.timm_kwargs["num_classes"] == 0


def test_arch_widths_and_depth_override():
    for name, (dim, heads) in {"vit_small": (384, 6), "vit_base": (768, 12)}.items():
        kw = build_encoder(tiny_cfg(encoder=name, depth=1), IMG, 2).timm_kwargs
        assert (kw["embed_dim"], kw["num_heads"], kw["depth"], kw["in_chans"]) == (dim, heads, 1, 2)
    assert build_encoder(tiny_cfg(depth=None), IMG, 1).timm_kwargs["depth"] == 12
