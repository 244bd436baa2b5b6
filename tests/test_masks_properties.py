"""Property-based tests (hypothesis) of the multi-block mask sampler over arbitrary grids and settings.

For any grid and any ``MaskConfig`` that passes validation, the sampler either refuses the settings at
construction with a ``mask.min_keep`` message that is true (the stated bound really is below
``min_keep``), or every batch it draws has M target blocks, a context of at least ``min_keep``
patches disjoint from every target block, and sorted, unique, in-range indices.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sarjepa_dist.config import ConfigError, MaskConfig
from sarjepa_dist.masks import MultiBlockMaskSampler, block_hw, draw_positions, mask_generator

PROPERTY = settings(max_examples=60, deadline=None)


@st.composite
def scale_pairs(draw, low: float, high: float = 1.0) -> tuple[float, float]:
    a = draw(st.floats(low, high))
    b = draw(st.floats(low, high))
    return (min(a, b), max(a, b))


@st.composite
def mask_configs(draw) -> MaskConfig:
    cfg = MaskConfig(num_context_blocks=draw(st.integers(1, 4)),
                     context_scale=draw(scale_pairs(0.05)),
                     num_target_blocks=draw(st.integers(1, 6)),
                     target_scale=draw(scale_pairs(0.01, 0.6)),
                     target_aspect=draw(scale_pairs(0.2, 5.0)),
                     min_keep=draw(st.integers(1, 40)),
                     shared_sizes=draw(st.booleans()))
    cfg.validate()
    return cfg


GRIDS = st.tuples(st.integers(2, 16), st.integers(2, 16))


def _dense(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(*idx.shape[:-1], n, dtype=torch.bool).scatter_(-1, idx, True)


def _is_rectangle(cells: torch.Tensor, gw: int) -> bool:
    rows, cols = cells // gw, cells % gw
    box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
    return box == cells.numel()


def _context_room(grid: tuple[int, int], cfg: MaskConfig) -> int:
    """An upper bound on the patches a context can keep, from block_hw on a fine aspect grid."""
    n = grid[0] * grid[1]
    aspects = torch.linspace(cfg.target_aspect[0], cfg.target_aspect[1], 4001, dtype=torch.float64)
    h, w = block_hw(torch.full_like(aspects, cfg.target_scale[0]), aspects, grid)
    ch, cw = block_hw(torch.tensor([cfg.context_scale[1]], dtype=torch.float64), torch.ones(1, dtype=torch.float64),
                      grid)
    return min(n - int((h * w).min()), cfg.num_context_blocks * int(ch * cw), n)


@PROPERTY
@given(GRIDS, mask_configs(), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_sampler_refuses_truly_or_draws_valid_masks(grid, cfg, batch_size, seed):
    gh, gw = grid
    n = gh * gw
    try:
        sampler = MultiBlockMaskSampler(grid, cfg)
    except ConfigError as exc:
        assert "mask.min_keep" in str(exc)
        # the refusal is honest: by brute force over the aspect range, the context (outside the
        # smallest target block, inside the largest context blocks) can never keep min_keep patches
        assert _context_room(grid, cfg) < cfg.min_keep, str(exc)
        return
    masks = sampler.sample(batch_size, torch.Generator().manual_seed(seed))
    ctx, tgt = masks.context, masks.targets
    assert ctx.shape[0] == batch_size and ctx.shape[1] >= cfg.min_keep
    assert tgt.shape[:2] == (batch_size, cfg.num_target_blocks) and tgt.shape[2] >= 1
    for t in (ctx, tgt):
        assert int(t.min()) >= 0 and int(t.max()) < n
        assert bool((t[..., 1:] > t[..., :-1]).all()), "indices must be sorted and unique"
    assert not (_dense(ctx, n) & _dense(tgt, n).any(dim=1)).any(), "context and targets overlap"
    # no target block is larger than the settings allow: h grows with the aspect, w shrinks with it
    top_scale = torch.tensor([cfg.target_scale[1]], dtype=torch.float64)
    h_max, _ = block_hw(top_scale, torch.tensor([cfg.target_aspect[1]], dtype=torch.float64), grid)
    _, w_max = block_hw(top_scale, torch.tensor([cfg.target_aspect[0]], dtype=torch.float64), grid)
    assert tgt.shape[2] <= int(h_max * w_max)
    if cfg.shared_sizes and sampler.num_collapsed == 0:
        # one size per batch: truncation to the batch minimum cuts nothing, every block is a rectangle
        assert all(_is_rectangle(block, gw) for block in tgt.reshape(-1, tgt.shape[2]))
    again = sampler.sample(batch_size, torch.Generator().manual_seed(seed))
    assert torch.equal(again.context, ctx) and torch.equal(again.targets, tgt)


@PROPERTY
@given(GRIDS, st.floats(1e-3, 1.0), st.floats(0.1, 10.0), st.integers(0, 2**31 - 1))
def test_blocks_fit_the_grid_and_positions_stay_inside(grid, scale, aspect, seed):
    gh, gw = grid
    shape = (16,)
    h, w = block_hw(torch.full(shape, scale, dtype=torch.float64), torch.full(shape, aspect, dtype=torch.float64),
                    grid)
    assert ((1 <= h) & (h <= gh) & (1 <= w) & (w <= gw)).all()
    top, left = draw_positions(h, w, grid, torch.Generator().manual_seed(seed))
    assert ((0 <= top) & (top + h <= gh) & (0 <= left) & (left + w <= gw)).all()


@PROPERTY
@given(st.tuples(st.integers(0, 10**6), st.integers(0, 64), st.integers(0, 10**6)),
       st.tuples(st.integers(0, 10**6), st.integers(0, 64), st.integers(0, 10**6)))
def test_mask_generator_streams_differ_by_seed_rank_and_step(a, b):
    """Equal (seed, rank, step) give equal streams; different ones differ (a 64-bit seed each)."""
    first = torch.randint(0, 2**62, (2,), generator=mask_generator(*a))
    second = torch.randint(0, 2**62, (2,), generator=mask_generator(*b))
    assert torch.equal(first, second) == (a == b)
