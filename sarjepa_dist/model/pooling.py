"""Token pooling: an encoder's (B, N, D) patch tokens → one (B, F) feature vector per chip.

A target fills a small part of a SAR chip (a vehicle is ~a quarter of a 128-px MSTAR chip), so a
mean over every token mixes it with clutter; the hand-made baselines keep the spatial layout
(flattened pixels, an 8×8 grid of gradient maps). The grid poolings keep it too:

- ``mean``: mean over all tokens (D features; what ``vit(x)`` returns);
- ``gridG``: tokens average-pooled on a G×G grid of the patch grid, flattened (D·G² features);
- ``centre``: mean of the tokens in the central half of the grid (each side), D features.

Test-time views (``tta``): ``hflip`` averages the tokens of the chip with the tokens of its
horizontal (azimuth) mirror, mirrored back to the chip's own patch positions, before pooling. A
ViT is not mirror-equivariant, so the two views differ; the hand-made baselines are, so the
average leaves them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sarjepa_dist.config import FEATURE_POOLINGS, FEATURE_TTAS


def grid_side(pooling: str) -> int | None:
    """G for ``gridG`` poolings, else None."""
    return int(pooling[4:]) if pooling.startswith("grid") else None


def pool_tokens(tokens: torch.Tensor, grid_size: tuple[int, int], pooling: str) -> torch.Tensor:
    """(B, N, D) tokens in row-major patch order → (B, F) features (see the module docstring)."""
    if pooling not in FEATURE_POOLINGS:
        raise ValueError(f"pooling = {pooling!r} is not allowed; choose one of {list(FEATURE_POOLINGS)}")
    b, n, d = tokens.shape
    gh, gw = grid_size
    if n != gh * gw:
        raise ValueError(f"{n} tokens do not fill a {gh}x{gw} patch grid")
    if pooling == "mean":
        return tokens.mean(dim=1)
    maps = tokens.transpose(1, 2).reshape(b, d, gh, gw)
    if pooling == "centre":
        top, left = gh // 4, gw // 4
        return maps[:, :, top:gh - top, left:gw - left].mean(dim=(2, 3))
    g = grid_side(pooling)
    return F.adaptive_avg_pool2d(maps, (g, g)).flatten(1)


def encode_tokens(encoder: torch.nn.Module, x: torch.Tensor, grid_size: tuple[int, int], tta: str = "none") -> torch.Tensor:
    """``encoder(x)`` tokens (B, N, D), averaged over the test-time views ``tta`` (module docstring)."""
    if tta not in FEATURE_TTAS:
        raise ValueError(f"tta = {tta!r} is not allowed; choose one of {list(FEATURE_TTAS)}")
    tokens = encoder(x)
    if tta == "none":
        return tokens
    b, n, d = tokens.shape
    gh, gw = grid_size
    mirrored = encoder(torch.flip(x, dims=[-1])).reshape(b, gh, gw, d).flip(2).reshape(b, n, d)
    return (tokens + mirrored) / 2
