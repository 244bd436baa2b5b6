"""A timm ViT ``Block`` evaluated for a subset of its rows (queries), from the block's own modules.

Every sub-layer of a transformer block except attention acts on each token row independently, and
attention needs every row as a key and value but only the wanted rows as queries. So when only
some output rows are used (the predictor's last block: the target rows; the target encoder's
last block: the target positions), the other rows' attention output projection, MLP and norms
are skipped; the kept rows come out as ``blk(x)`` would give them (same modules, same order of
random draws for drop-path, whose mask is per sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def take_rows(t: torch.Tensor, rows: slice | torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of ``t`` along ``dim``: a slice, or (B, Q) per-sample indices (``dim`` ≥ 1; batch first)."""
    if isinstance(rows, slice):
        return t[(slice(None),) * dim + (rows,)]
    shape = [rows.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = rows.shape[1]
    idx = rows.reshape(shape).expand(*t.shape[:dim], rows.shape[1], *t.shape[dim + 1:])
    return torch.gather(t, dim, idx)


def block_rows(blk: Block, x: torch.Tensor, rows: slice | torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``blk(x, attn_mask)`` restricted to output ``rows`` (None: all); ``attn_mask`` (N, N) or
    broadcastable, given for all rows (it is cut to the query rows here)."""
    if rows is None:
        return blk(x, attn_mask=attn_mask)
    attn = blk.attn
    b, n, _ = x.shape
    h = blk.norm1(x)
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q = take_rows(q, rows, 2)
    if attn_mask is not None:
        if not isinstance(rows, slice):
            raise ValueError("an attention mask with per-sample query rows is not supported")
        attn_mask = attn_mask[..., rows, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.norm(o.transpose(1, 2).reshape(b, q.shape[2], attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(take_rows(h, rows, 1)).sigmoid()
    x = take_rows(x, rows, 1)
    x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(o))))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
