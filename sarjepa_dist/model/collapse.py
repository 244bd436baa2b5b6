"""Cheap collapse figures for embeddings (logged every few steps, never inside the hot path).

- ``std``: mean over feature dims of the per-dim standard deviation of layer-normed embeddings
  (layer norm first, so the figure ignores overall scale: ~1 for spread-out tokens, 0 when every
  token is the same vector);
- ``effective_rank``: RankMe, exp of the entropy of the normalised singular values of the
  (layer-normed, uncentred) embedding matrix: 1 for a constant embedding, up to min(N, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def collapse_stats(z: torch.Tensor, max_tokens: int = 1024) -> dict[str, float]:
    """z (..., D) -> dict(std, effective_rank); at most ``max_tokens`` rows, evenly strided (no RNG)."""
    z = z.detach().reshape(-1, z.shape[-1]).float()
    n = z.shape[0]
    if n > max_tokens:
        z = z[torch.linspace(0, n - 1, max_tokens, device=z.device).long()]
    z = F.layer_norm(z, z.shape[-1:])
    std = z.std(dim=0, unbiased=False).mean() if z.shape[0] > 1 else z.new_zeros(())
    s = torch.linalg.svdvals(z)
    p = s / s.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"std": float(std), "effective_rank": float(torch.exp(entropy))}
