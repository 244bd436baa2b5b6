"""The JEPA predictor: a narrow transformer that fills in target tokens from the context.

Per target block it sees the context tokens (projected to the predictor width, plus their
positions) and one learnable mask token per target position (plus that position); it returns its
guesses at the target positions, projected back to the target width. As in I-JEPA, the context is
repeated once per target block (batch B*M), so target blocks never attend to one another and each
block is predicted from the context alone.

``shared_context=True`` (``model.predictor_context: shared``, the config's default; the class's
default stays I-JEPA's) changes the method, not only its cost: the context tokens attend only to
one another, so they are computed once for all M blocks (one sequence of Kc + M·Kt rows per sample
under a block attention mask) instead of once per block; each block's mask tokens still attend to
the context and to their own block only.

Exact savings in both modes: the last block computes only the rows whose output is used (the
target rows; see :mod:`sarjepa_dist.model.blocks`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block

from sarjepa_dist.model.blocks import block_rows
from sarjepa_dist.model.encoder import gather_tokens, sincos_pos_embed_2d


class Predictor(nn.Module):
    """forward(ctx_tokens (B,Kc,D), ctx_idx (B,Kc), tgt_idx (B,Kt) or (B,M,Kt)) -> (B,[M,]Kt,out_dim)."""

    def __init__(self, grid_size: tuple[int, int], in_dim: int, dim: int, depth: int, num_heads: int,
                 out_dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 shared_context: bool = False) -> None:
        super().__init__()
        self.shared_context = bool(shared_context)
        self.grid_size = tuple(grid_size)
        self.in_dim, self.dim, self.out_dim = in_dim, dim, out_dim
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # fixed positions; not saved (rebuilt from the grid), never trained
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid_size).unsqueeze(0), persistent=False)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r) for r in rates)
        for blk in self.blocks:
            blk.attn.fused_attn = True
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """I-JEPA's init: truncated-normal(0.02) linears, zero biases, then residual branches scaled
        down by sqrt(2*layer) so a deep predictor starts near the identity."""
        trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, ctx_tokens: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor) -> torch.Tensor:
        single = tgt_idx.dim() == 2
        if single:
            tgt_idx = tgt_idx.unsqueeze(1)
        b, kc, _ = ctx_tokens.shape
        _, m, kt = tgt_idx.shape
        pos = self.pos_embed.expand(b, -1, -1)

        ctx = self.embed(ctx_tokens) + gather_tokens(pos, ctx_idx)  # (B, Kc, d): embedded once
        tgt = gather_tokens(pos, tgt_idx) + self.mask_token  # (B, M, Kt, d)
        if self.shared_context:
            x = torch.cat([ctx, tgt.reshape(b, m * kt, self.dim)], dim=1)
            attn_mask = block_attention_mask(kc, m, kt, ctx.device)
        else:
            ctx = ctx.unsqueeze(1).expand(b, m, kc, self.dim).reshape(b * m, kc, self.dim)
            x = torch.cat([ctx, tgt.reshape(b * m, kt, self.dim)], dim=1)
            attn_mask = None
        for blk in self.blocks[:-1]:
            x = blk(x, attn_mask=attn_mask)
        x = block_rows(self.blocks[-1], x, slice(kc, None), attn_mask)  # only the target rows
        x = self.proj(self.norm(x)).reshape(b, m, kt, self.out_dim)
        return x[:, 0] if single else x


def block_attention_mask(kc: int, m: int, kt: int, device: torch.device) -> torch.Tensor:
    """(Kc+M·Kt)² boolean mask, True = may attend: the context sees the context; block j's rows see
    the context and block j."""
    block_of = torch.cat([torch.full((kc,), -1, device=device),
                          torch.arange(m, device=device).repeat_interleave(kt)])
    is_ctx_key = (block_of < 0).unsqueeze(0)
    same_block = block_of.unsqueeze(1) == block_of.unsqueeze(0)
    return is_ctx_key | (same_block & (block_of >= 0).unsqueeze(1))
