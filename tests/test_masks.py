"""Multi-block mask sampler: shapes, invariants and the statistics of what it draws."""

from __future__ import annotations

import logging

import pytest
import torch

from sarjepa_dist.config import ConfigError, MaskConfig
from sarjepa_dist.masks import (
    MaskBatch,
    MultiBlockMaskSampler,
    block_hw,
    draw_block_sizes,
    draw_positions,
    mask_generator,
    random_subset,
)

GRIDS = [(8, 8), (16, 16), (8, 16), (16, 8)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Index tensor (..., K) -> boolean mask (..., n)."""
    out = torch.zeros(*idx.shape[:-1], n, dtype=torch.bool)
    return out.scatter_(-1, idx, True)


def _check_batch(mb: MaskBatch, grid: tuple[int, int], cfg: MaskConfig, batch_size: int) -> None:
    """The invariants every MaskBatch must satisfy."""
    n = grid[0] * grid[1]
    ctx, tgt = mb.context, mb.targets
    assert ctx.dtype == torch.int64 and tgt.dtype == torch.int64
    assert ctx.ndim == 2 and ctx.shape[0] == batch_size
    assert tgt.ndim == 3 and tgt.shape[:2] == (batch_size, cfg.num_target_blocks)
    assert ctx.shape[1] >= cfg.min_keep
    assert tgt.shape[2] >= 1
    for t in (ctx, tgt):
        assert int(t.min()) >= 0 and int(t.max()) < n
        assert bool((t[..., 1:] > t[..., :-1]).all()), "indices must be sorted and unique"
    overlap = _dense(ctx, n) & _dense(tgt, n).any(dim=1)
    assert not bool(overlap.any()), "context and targets must be disjoint in every sample"


# --------------------------------------------------------------------------- shapes and invariants


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("shared_sizes", [False, True])
def test_shapes_sorted_disjoint(grid, shared_sizes):
    cfg = MaskConfig()
    sampler = MultiBlockMaskSampler(grid, cfg, shared_sizes=shared_sizes)
    g = _gen()
    for batch_size in (1, 7, 64):
        for _ in range(10):
            _check_batch(sampler.sample(batch_size, g), grid, cfg, batch_size)


@pytest.mark.parametrize("grid", GRIDS)
def test_target_blocks_lie_in_rectangles(grid):
    """After truncation a target block is a subset of one rectangle no larger than the biggest drawable."""
    cfg = MaskConfig()
    gh, gw = grid
    # the largest h and w any draw can give (h grows with scale*aspect, w with scale/aspect)
    s_hi = torch.tensor([cfg.target_scale[1]], dtype=torch.float64)
    h_max, _ = block_hw(s_hi, torch.tensor([cfg.target_aspect[1]], dtype=torch.float64), grid)
    _, w_max = block_hw(s_hi, torch.tensor([cfg.target_aspect[0]], dtype=torch.float64), grid)
    mb = MultiBlockMaskSampler(grid, cfg, shared_sizes=False).sample(128, _gen())
    rows, cols = mb.targets // gw, mb.targets % gw
    assert int((rows.amax(-1) - rows.amin(-1) + 1).max()) <= int(h_max)
    assert int((cols.amax(-1) - cols.amin(-1) + 1).max()) <= int(w_max)


@pytest.mark.parametrize("grid", GRIDS)
def test_shared_sizes_keep_whole_rectangles(grid):
    """With per-batch sizes nothing is truncated from a target: each block is a full h x w rectangle."""
    gw = grid[1]
    sampler = MultiBlockMaskSampler(grid, MaskConfig(), shared_sizes=True)
    g = _gen()
    for _ in range(10):
        t = sampler.sample(32, g).targets
        rows, cols = t // gw, t % gw
        area = (rows.amax(-1) - rows.amin(-1) + 1) * (cols.amax(-1) - cols.amin(-1) + 1)
        assert bool((area == t.shape[-1]).all())


def test_equal_counts_are_the_batch_minimum():
    """Kc and Kt are the smallest per-sample counts: a batch of 1 keeps its whole context and block."""
    cfg = MaskConfig(num_target_blocks=1)
    sampler = MultiBlockMaskSampler((16, 16), cfg, shared_sizes=False)
    g = _gen()
    singles_c, singles_t = [], []
    for _ in range(200):
        mb = sampler.sample(1, g)
        gw = 16
        r, c = mb.targets[0, 0] // gw, mb.targets[0, 0] % gw
        # a lone block is never truncated, so it is a full rectangle
        assert (int(r.max() - r.min()) + 1) * (int(c.max() - c.min()) + 1) == mb.targets.shape[-1]
        singles_c.append(mb.context.shape[1])
        singles_t.append(mb.targets.shape[2])
    big = sampler.sample(256, g)
    assert big.context.shape[1] <= sum(singles_c) / len(singles_c)
    assert big.targets.shape[2] <= sum(singles_t) / len(singles_t)
    assert big.targets.shape[2] >= sampler.min_target_area()


# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("grid", GRIDS)
def test_target_block_fraction(grid):
    """Drawn blocks cover target_scale of the grid up to rounding; after truncation Kt sits between the
    smallest drawable block and the mean block."""
    cfg = MaskConfig()
    gh, gw = grid
    n = gh * gw
    s_lo, s_hi = cfg.target_scale
    sizes = draw_block_sizes((20000,), grid, cfg.target_scale, cfg.target_aspect, _gen())
    frac = (sizes.h * sizes.w).double() / n
    # |h*w - s*N| <= (sqrt(s*N*a) + sqrt(s*N/a)) / 2 + 1/4 from rounding each side by at most 1/2
    a_lo, a_hi = cfg.target_aspect
    worst = max((s_hi * n * a) ** 0.5 + (s_hi * n / a) ** 0.5 for a in (a_lo, a_hi))
    slack = (worst / 2 + 0.25) / n
    assert float(frac.min()) >= s_lo - slack and float(frac.max()) <= s_hi + slack
    # rounding errors largely cancel on average
    assert abs(float(frac.mean()) - (s_lo + s_hi) / 2) < 0.02

    sampler = MultiBlockMaskSampler(grid, cfg, shared_sizes=False)
    g = _gen(1)
    kt = torch.tensor([sampler.sample(64, g).targets.shape[2] for _ in range(50)], dtype=torch.float64)
    assert float(kt.min()) >= sampler.min_target_area()
    assert float(kt.mean()) / n <= float(frac.mean())
    assert float(kt.mean()) / n >= s_lo - slack


def test_min_target_area_is_exact():
    for grid in GRIDS + [(14, 14), (4, 4)]:
        cfg = MaskConfig(min_keep=1)
        sampler = MultiBlockMaskSampler(grid, cfg, shared_sizes=False)
        sizes = draw_block_sizes((200000,), grid, cfg.target_scale, cfg.target_aspect, _gen())
        assert int((sizes.h * sizes.w).min()) == sampler.min_target_area(), grid


@pytest.mark.parametrize("grid", GRIDS)
def test_targets_cover_every_cell(grid):
    """Over many draws every cell, the last row and column included, is in some target block."""
    gh, gw = grid
    n = gh * gw
    sampler = MultiBlockMaskSampler(grid, MaskConfig(), shared_sizes=False)
    g = _gen()
    hits = torch.zeros(n, dtype=torch.long)
    for _ in range(20):
        hits += _dense(sampler.sample(64, g).targets, n).sum(dim=(0, 1))
    hits = hits.view(gh, gw)
    assert bool((hits > 0).all()), f"cells never targeted:\n{(hits == 0).int()}"
    # the edges are not starved: the last row/column get a fair share compared with the first
    assert int(hits[-1].sum()) > 0.5 * int(hits[0].sum())
    assert int(hits[:, -1].sum()) > 0.5 * int(hits[:, 0].sum())


def test_positions_uniform_over_all_valid_offsets():
    """Top-left offsets take all gh-h+1 values (the last one included) with equal frequency."""
    gh, gw = 8, 16
    n_draws = 40000
    for h_val, w_val in [(3, 4), (8, 16), (1, 1), (5, 2)]:
        h = torch.full((n_draws,), h_val)
        w = torch.full((n_draws,), w_val)
        top, left = draw_positions(h, w, (gh, gw), _gen())
        for pos, count in ((top, gh - h_val + 1), (left, gw - w_val + 1)):
            freq = torch.bincount(pos, minlength=count).double()
            assert freq.numel() == count, "a position beyond the last valid offset was drawn"
            expected = n_draws / count
            assert bool(((freq - expected).abs() < 0.1 * expected).all()), freq


def _one_parameter_family(h: torch.Tensor, w: torch.Tensor) -> bool:
    """True when the drawn (h, w) pairs form a chain: bigger h always with bigger-or-equal w, or always
    with smaller-or-equal w. That is the fingerprint of scale and aspect sharing one random number (h and
    w are then both monotone functions of it); independent draws give both kinds of pairs."""
    pairs = torch.stack([h, w], dim=1).unique(dim=0)
    dh = pairs[:, None, 0] - pairs[None, :, 0]
    dw = pairs[:, None, 1] - pairs[None, :, 1]
    concordant = bool(((dh > 0) & (dw > 0)).any())
    discordant = bool(((dh > 0) & (dw < 0)).any())
    return not (concordant and discordant)


def test_scale_and_aspect_are_independent():
    cfg = MaskConfig()
    for grid in GRIDS:
        _check_independent(cfg, grid)


def _check_independent(cfg: MaskConfig, grid: tuple[int, int]) -> None:
    sizes = draw_block_sizes((20000,), grid, cfg.target_scale, cfg.target_aspect, _gen())
    r = torch.corrcoef(torch.stack([sizes.scale, sizes.aspect]))[0, 1]
    assert abs(float(r)) < 0.03
    r_hw = torch.corrcoef(torch.stack([sizes.h.double(), sizes.w.double()]))[0, 1]
    assert abs(float(r_hw)) < 0.95
    assert not _one_parameter_family(sizes.h, sizes.w)
    # the check above does catch the reference's defect (one shared uniform for scale and aspect)
    u = torch.rand(20000, generator=_gen(1), dtype=torch.float64)
    s = cfg.target_scale[0] + u * (cfg.target_scale[1] - cfg.target_scale[0])
    a = cfg.target_aspect[0] + u * (cfg.target_aspect[1] - cfg.target_aspect[0])
    h_bad, w_bad = block_hw(s, a, grid)
    assert _one_parameter_family(h_bad, w_bad)


def test_sampler_draws_independent_block_shapes():
    """The same fingerprint on the sampler's own output: lone blocks (batch 1, one block) are whole
    rectangles, whose (h, w) must not form a one-parameter chain."""
    gw = 16
    sampler = MultiBlockMaskSampler((16, 16), MaskConfig(num_target_blocks=1))
    g = _gen()
    hs, ws = [], []
    for _ in range(400):
        t = sampler.sample(1, g).targets[0, 0]
        r, c = t // gw, t % gw
        hs.append(int(r.max() - r.min()) + 1)
        ws.append(int(c.max() - c.min()) + 1)
    assert not _one_parameter_family(torch.tensor(hs), torch.tensor(ws))


def test_truncation_keeps_a_random_subset():
    """Truncation must not favour the top-left (keeping the first k sorted indices would)."""
    n, k = 64, 16
    mask = torch.ones(2000, n, dtype=torch.bool)
    idx = random_subset(mask, k, _gen())
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    freq = _dense(idx, n).double().mean(0)
    assert bool(((freq - k / n).abs() < 0.05).all()), freq
    # only True entries are ever picked
    mask = torch.rand(500, n, generator=_gen(2)) < 0.5
    mask[:, :k] = True
    assert bool(mask.gather(1, random_subset(mask, k, _gen(3))).all())


def test_truncated_context_reaches_the_bottom_right():
    """Over many draws the truncated context still includes the last row and column."""
    gh, gw = 8, 8
    sampler = MultiBlockMaskSampler((gh, gw), MaskConfig())
    g = _gen()
    hits = torch.zeros(gh * gw, dtype=torch.long)
    for _ in range(20):
        hits += _dense(sampler.sample(64, g).context, gh * gw).sum(0)
    hits = hits.view(gh, gw)
    assert bool((hits > 0).all())
    assert int(hits[-1].sum()) > 0.5 * int(hits[0].sum())
    assert int(hits[:, -1].sum()) > 0.5 * int(hits[:, 0].sum())


# --------------------------------------------------------------------------- reproducibility


def test_deterministic_given_seed():
    sampler = MultiBlockMaskSampler((16, 16), MaskConfig())
    a = sampler.sample(32, _gen(5))
    b = sampler.sample(32, _gen(5))
    c = sampler.sample(32, _gen(6))
    assert torch.equal(a.context, b.context) and torch.equal(a.targets, b.targets)
    assert not (a.context.shape == c.context.shape and torch.equal(a.context, c.context))
    # the default generator works too
    _check_batch(sampler.sample(4), (16, 16), MaskConfig(), 4)


def test_mask_generator_per_rank_and_step():
    sampler = MultiBlockMaskSampler((8, 8), MaskConfig())

    def draw(seed: int, rank: int, step: int) -> torch.Tensor:
        mb = sampler.sample(16, mask_generator(seed, rank, step))
        return torch.cat([_dense(mb.context, 64).flatten(), _dense(mb.targets, 64).flatten()])

    assert torch.equal(draw(0, 0, 3), draw(0, 0, 3))
    keys = [(0, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 2, 0), (0, 1, 1)]
    masks = [draw(*k) for k in keys]
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not torch.equal(masks[i], masks[j]), (keys[i], keys[j])
    # the generator states themselves differ (no additive collisions like rank+step)
    assert not torch.equal(mask_generator(0, 1, 0).get_state(), mask_generator(0, 0, 1).get_state())
    with pytest.raises(ValueError, match="rank"):
        mask_generator(0, -1, 0)


# --------------------------------------------------------------------------- min_keep and errors


@pytest.mark.parametrize("min_keep", [20, 30, 40])
def test_min_keep_respected_when_tight(min_keep, caplog):
    cfg = MaskConfig(min_keep=min_keep)
    sampler = MultiBlockMaskSampler((8, 8), cfg, shared_sizes=False)
    g = _gen()
    with caplog.at_level(logging.WARNING, logger="sarjepa_dist.masks"):
        for _ in range(5):
            mb = sampler.sample(128, g)
            _check_batch(mb, (8, 8), cfg, 128)
            assert mb.context.shape[1] >= min_keep
    if min_keep == 40:  # tight enough on 8x8 that some samples need the widened context
        assert sampler.num_fallbacks > 0
        assert "mask.min_keep" in caplog.text


def test_near_infeasible_settings_still_valid(caplog):
    """min_keep = N - smallest block: only stacked smallest target blocks leave enough context."""
    probe = MultiBlockMaskSampler((8, 8), MaskConfig())
    cfg = MaskConfig(min_keep=64 - probe.min_target_area())
    sampler = MultiBlockMaskSampler((8, 8), cfg, shared_sizes=False)
    with caplog.at_level(logging.WARNING, logger="sarjepa_dist.masks"):
        mb = sampler.sample(32, _gen())
    _check_batch(mb, (8, 8), cfg, 32)
    assert sampler.num_collapsed > 0


@pytest.mark.parametrize("grid", GRIDS)
def test_default_settings_need_no_fallback(grid):
    sampler = MultiBlockMaskSampler(grid, MaskConfig(), shared_sizes=False)
    g = _gen()
    for _ in range(10):
        sampler.sample(256, g)
    assert sampler.num_fallbacks == 0


def test_impossible_settings_raise():
    with pytest.raises(ConfigError, match=r"mask\.min_keep = 65 exceeds"):
        MultiBlockMaskSampler((8, 8), MaskConfig(min_keep=65))
    with pytest.raises(ConfigError, match=r"mask\.target_scale"):
        MultiBlockMaskSampler((8, 8), MaskConfig(min_keep=60))  # smallest block is 3x3 = 9
    with pytest.raises(ConfigError, match=r"mask\.context_scale"):
        MultiBlockMaskSampler((8, 8), MaskConfig(context_scale=(0.05, 0.1)))  # at most 3x3 = 9 < 10
    with pytest.raises(ValueError, match="grid_size"):
        MultiBlockMaskSampler((0, 8), MaskConfig())
    with pytest.raises(ValueError, match="batch_size"):
        MultiBlockMaskSampler((8, 8), MaskConfig()).sample(0)


def test_multiple_context_blocks_and_extreme_scales():
    for cfg in (MaskConfig(num_context_blocks=3, context_scale=(0.2, 0.3)),
                MaskConfig(num_target_blocks=1, target_scale=(0.0, 1.0), target_aspect=(0.1, 10.0),
                           min_keep=1),
                MaskConfig(num_target_blocks=8, target_scale=(0.01, 0.05))):
        for grid in GRIDS:
            sampler = MultiBlockMaskSampler(grid, cfg, shared_sizes=False)
            g = _gen()
            for _ in range(5):
                _check_batch(sampler.sample(32, g), grid, cfg, 32)


# --------------------------------------------------------------------------- speed




def test_config_default_shares_sizes_across_the_batch():
    """MaskConfig.shared_sizes (default True) reaches the sampler: whole blocks, no size truncation."""
    assert MultiBlockMaskSampler((8, 8), MaskConfig()).shared_sizes is True
    assert MultiBlockMaskSampler((8, 8), MaskConfig(shared_sizes=False)).shared_sizes is False
    mb = MultiBlockMaskSampler((8, 8), MaskConfig()).sample(64, _gen())
    assert mb.context.shape[1] > 16  # per-sample sizes truncate to ~16 at this batch size
