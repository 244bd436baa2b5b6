"""The encoder: a plain timm ``VisionTransformer`` driven so that masked tokens are *dropped*.

Why wrap rather than subclass: the exported weights must load into an unmodified timm model
(``VisionTransformer(**timm_kwargs)``), so the wrapped ``.vit`` is exactly what timm builds; this
module only adds a forward that gathers the kept patch tokens *before* the transformer blocks
(I-JEPA's token dropping), which is both the method (dropped tokens cannot influence the
context) and the saving (attention cost grows with the square of the kept count).

Choices fixed here:
- no class token (``class_token=False``), mean pooling (``global_pool='avg'``) and the final norm
  applied per token (``fc_norm=False``), so ``vit.forward_features`` returns the same layer-normed
  tokens the JEPA loss sees, and ``vit(x)`` returns their mean;
- a fixed 2-D sin-cos position embedding (MAE / I-JEPA formula) written into timm's ``pos_embed``
  parameter with ``requires_grad=False``: it keeps timm's state-dict layout (the key exists) while
  never being trained or decayed;
- fused attention (``F.scaled_dot_product_attention``) forced on in every block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from sarjepa_dist.config import ENCODER_ARCHS, ModelConfig
from sarjepa_dist.model.blocks import block_rows


def sincos_pos_embed_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(len(pos), dim): half sines, half cosines of ``pos`` at geometric frequencies (MAE formula)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """(gh*gw, dim) fixed 2-D sin-cos embedding, rows in row-major patch order.

    Half the width encodes the row, half the column (each a 1-D sin-cos code), as in MAE/I-JEPA.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    gh, gw = grid_size
    rows, cols = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    emb = np.concatenate([sincos_pos_embed_1d(dim // 2, rows), sincos_pos_embed_1d(dim // 2, cols)], axis=1)
    return torch.from_numpy(emb).float()


def encoder_timm_kwargs(model_cfg: ModelConfig, img_size: int, in_chans: int) -> dict[str, Any]:
    """The explicit, JSON-safe keyword arguments that build the encoder's timm model."""
    if model_cfg.encoder not in ENCODER_ARCHS:  # load_encoder's 'random-init:<name>' bypasses validation
        raise ValueError(f"model.encoder = {model_cfg.encoder!r} is unknown; choose one of {list(ENCODER_ARCHS)}")
    if img_size % model_cfg.patch_size:
        raise ValueError(f"img_size = {img_size} must be a multiple of patch_size = {model_cfg.patch_size}")
    dim, depth, heads = ENCODER_ARCHS[model_cfg.encoder]
    return dict(
        img_size=int(img_size),
        patch_size=int(model_cfg.patch_size),
        in_chans=int(in_chans),
        num_classes=0,
        global_pool="avg",
        fc_norm=False,
        class_token=False,
        no_embed_class=True,
        pos_embed="learn",  # the parameter holds the fixed sin-cos table (frozen)
        embed_dim=dim,
        depth=int(model_cfg.depth if model_cfg.depth is not None else depth),
        num_heads=heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=float(model_cfg.drop_path),
        dynamic_img_size=False,
    )


class MaskedViT(nn.Module):
    """A timm ViT whose forward takes the indices of the patch tokens to keep.

    Attributes: ``vit`` (the plain timm model), ``timm_kwargs``, ``grid_size`` (rows, cols),
    ``num_patches``, ``embed_dim``, ``patch_size``, ``img_size``, ``in_chans``.
    """

    def __init__(self, timm_kwargs: dict[str, Any]) -> None:
        super().__init__()
        if timm_kwargs.get("class_token", True) or not timm_kwargs.get("no_embed_class", False):
            raise ValueError("MaskedViT needs class_token=False and no_embed_class=True")
        self.timm_kwargs = dict(timm_kwargs)
        self.vit = VisionTransformer(**self.timm_kwargs)
        gh, gw = (int(g) for g in self.vit.patch_embed.grid_size)
        self.grid_size: tuple[int, int] = (gh, gw)
        self.num_patches = int(self.vit.patch_embed.num_patches)
        self.embed_dim = int(self.vit.embed_dim)
        self.patch_size = int(self.timm_kwargs["patch_size"])
        self.img_size = int(self.timm_kwargs["img_size"])
        self.in_chans = int(self.timm_kwargs["in_chans"])
        with torch.no_grad():
            self.vit.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid_size).unsqueeze(0))
        self.vit.pos_embed.requires_grad_(False)
        for blk in self.vit.blocks:  # F.scaled_dot_product_attention, whatever TIMM_FUSED_ATTN says
            blk.attn.fused_attn = True

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens plus fixed positions, before any block."""
        # timm's patch embedding returns a transposed view of the conv output; made contiguous once
        # here, or every block's layer norms and linears copy their input (~5% of a full-grid pass)
        tokens = self.vit.patch_embed(x).contiguous()
        return self.vit.pos_drop(tokens + self.vit.pos_embed)

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, K, D) after the final norm; only ``keep_idx`` (B, K) tokens enter the blocks.

        ``keep_idx`` indexes the row-major patch grid; ``None`` keeps all N tokens.
        """
        tokens = self.embed(x)
        if keep_idx is not None:
            tokens = gather_tokens(tokens, keep_idx)
        tokens = self.vit.norm_pre(tokens)
        tokens = self.vit.blocks(tokens)
        return self.vit.norm(tokens)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, Q, D): ``forward(x)`` (all tokens enter the blocks) read at ``rows`` (B, Q) only; the
        last block computes just those rows (exact: see :mod:`sarjepa_dist.model.blocks`)."""
        tokens = self.vit.norm_pre(self.embed(x))
        blocks = list(self.vit.blocks)
        for blk in blocks[:-1]:
            tokens = blk(tokens)
        return self.vit.norm(block_rows(blocks[-1], tokens, rows))

    def forward_features_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) mean of the normed tokens: the evaluation feature (equals ``vit(x)``)."""
        return self.forward(x).mean(dim=1)


def gather_tokens(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), idx (B, K) or (B, M, K) -> (B, K, D) or (B, M, K, D)."""
    d = tokens.shape[-1]
    if idx.dim() == 2:
        return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, d))
    if idx.dim() == 3:
        b, m, k = idx.shape
        flat = torch.gather(tokens, 1, idx.reshape(b, m * k, 1).expand(-1, -1, d))
        return flat.reshape(b, m, k, d)
    raise ValueError(f"token indices must be (B, K) or (B, M, K), got shape {tuple(idx.shape)}")


def build_encoder(model_cfg: ModelConfig, img_size: int, in_chans: int) -> MaskedViT:
    """The encoder named by ``model_cfg`` (width/heads from ``config.ENCODER_ARCHS``, ``depth`` override)."""
    return MaskedViT(encoder_timm_kwargs(model_cfg, img_size, in_chans))
