"""I-JEPA multi-block mask sampler (METHOD.md §3), pure torch and vectorised over the batch.

Each sample gets ``M = num_target_blocks`` rectangular *target* blocks (the patches the predictor must
predict) and a *context* (the patches the context encoder sees): the union of ``num_context_blocks``
square blocks minus every target block, so the context never sees what it must predict.

Differences from the I-JEPA reference collator, and why:

* **Independent scale and aspect.** The reference drew a block's scale and aspect ratio from one shared
  uniform number, so big blocks were always tall and small blocks always wide. Here they come from two
  independent draws (:func:`draw_block_sizes`).
* **Every position reachable.** The reference placed blocks with ``randint(0, gh - h)``, whose exclusive
  upper bound means no block ever touches the last row or column; on an 8×8 grid that starves 1/8 of the
  image of targets. Top-left corners here are uniform over all ``gh - h + 1`` (``gw - w + 1``) positions.
* **Sizes per block, not per batch.** The reference drew one target size and one context size per batch;
  here each block of each sample gets its own size. Since tokens are equalised across the batch by
  truncation (no padding), every target block is then cut to the smallest block in the batch and every
  context to the smallest context, which on small grids costs many tokens; ``shared_sizes=True``
  restores the reference's per-batch sizes (see :class:`MultiBlockMaskSampler`).
* **Random-subset truncation.** The reference kept the *first* ``k`` sorted indices when truncating, which
  systematically drops the bottom/right of every block and of the context (a spatial bias the model can
  learn). Here the kept ``k`` are a uniformly random subset (drawn with the same generator), returned
  sorted.
* **Disjointness is never loosened.** When the reference could not find a context block with enough
  patches it progressively *dropped* the target-exclusion constraint, leaking target patches into the
  context. Here the fall-back keeps context ∩ targets = ∅ and instead (1) redraws the context blocks,
  (2) redraws the whole sample, (3) widens the context to every non-target patch (counted in
  :attr:`MultiBlockMaskSampler.num_fallbacks`, logged as a warning) and (4) only for near-infeasible
  settings stacks the sample's target blocks on one smallest block (``num_collapsed``). Sampling never fails once the constructor
  has accepted the settings; settings that can never keep ``min_keep`` patches raise there.

Aspect ratios are drawn uniformly in ``target_aspect`` (as the reference does), ``aspect = h / w``.
Context blocks have aspect 1 in patch units, so on a non-square grid a context of scale 1.0 is clipped to
the short side and does not cover the whole grid (the project's chips are square).

Everything is drawn on the CPU with the given ``torch.Generator``; the same generator state gives the same
masks. Use :func:`mask_generator` for a generator that is reproducible per (seed, rank, step) and distinct
across ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from sarjepa_dist.config import ConfigError, MaskConfig

__all__ = ["MaskBatch", "MultiBlockMaskSampler", "mask_generator", "BlockSizes", "draw_block_sizes"]

_log = logging.getLogger(__name__)

# Bounded retries per stage (see MultiBlockMaskSampler.sample). With settings that pass the feasibility
# check these are rarely exhausted; each round only redraws the samples that are still failing.
CONTEXT_TRIES = 20  # redraw only the context blocks of a failing sample
SAMPLE_TRIES = 20  # redraw targets and context of a failing sample
FALLBACK_TRIES = 50  # context = all non-target patches; redraw the targets until it is big enough

# Domain-separation tag for mask_generator, so the mask stream never coincides with another stream that
# a different module derives from the same (seed, rank, step).
_MASK_STREAM = 0x6D61736B  # "mask"


@dataclass
class MaskBatch:
    """Masks for one batch; indices are into the row-major flattened patch grid, sorted ascending.

    ``context``: (B, Kc) patches the context encoder keeps. ``targets``: (B, M, Kt) patches of each of
    the M target blocks. Kc and Kt are the same for every sample (truncated to the batch minimum), and
    each sample's context is disjoint from all of its target blocks.
    """

    context: torch.Tensor  # LongTensor (B, Kc)
    targets: torch.Tensor  # LongTensor (B, M, Kt)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskBatch":
        return MaskBatch(self.context.to(device, non_blocking=non_blocking),
                         self.targets.to(device, non_blocking=non_blocking))


@dataclass
class BlockSizes:
    """Drawn block sizes: the raw ``scale`` and ``aspect`` draws and the resulting grid ``h``, ``w``."""

    scale: torch.Tensor  # float64, fraction of the grid's patches
    aspect: torch.Tensor  # float64, h / w
    h: torch.Tensor  # int64 in [1, gh]
    w: torch.Tensor  # int64 in [1, gw]


def block_hw(scale: torch.Tensor, aspect: torch.Tensor,
             grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block height/width for a scale (fraction of N patches) and aspect ratio h/w, clipped to the grid.

    ``h = round(sqrt(scale*N*aspect))``, ``w = round(sqrt(scale*N/aspect))``, each at least 1 so that a
    block always has a patch, and at most the grid side (the reference clipped to ``side - 1``, which made
    a full-width block impossible).
    """
    gh, gw = grid_size
    area = scale * float(gh * gw)
    h = torch.round(torch.sqrt(area * aspect)).clamp(1, gh).long()
    w = torch.round(torch.sqrt(area / aspect)).clamp(1, gw).long()
    return h, w


def draw_block_sizes(shape: tuple[int, ...], grid_size: tuple[int, int], scale: tuple[float, float],
                     aspect: tuple[float, float], generator: torch.Generator | None = None) -> BlockSizes:
    """Draw block scales and aspect ratios from two *independent* uniforms (the reference's defect was one
    shared uniform, which made scale and aspect perfectly correlated), then the block ``h``, ``w``."""
    u_scale = torch.rand(shape, generator=generator, dtype=torch.float64)
    u_aspect = torch.rand(shape, generator=generator, dtype=torch.float64)
    s = scale[0] + u_scale * (scale[1] - scale[0])
    a = aspect[0] + u_aspect * (aspect[1] - aspect[0])
    h, w = block_hw(s, a, grid_size)
    return BlockSizes(scale=s, aspect=a, h=h, w=w)


def draw_positions(h: torch.Tensor, w: torch.Tensor, grid_size: tuple[int, int],
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners uniform over *all* valid positions: ``top`` in ``0..gh-h`` inclusive (``gh-h+1``
    choices), so a block can touch the last row/column (the reference's ``randint(0, gh-h)`` could not)."""
    gh, gw = grid_size
    u_top = torch.rand(h.shape, generator=generator, dtype=torch.float64)
    u_left = torch.rand(w.shape, generator=generator, dtype=torch.float64)
    top = torch.minimum((u_top * (gh - h + 1)).floor().long(), gh - h)
    left = torch.minimum((u_left * (gw - w + 1)).floor().long(), gw - w)
    return top, left


def block_masks(top: torch.Tensor, left: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                grid_size: tuple[int, int]) -> torch.Tensor:
    """Boolean masks (..., gh*gw) of rectangles, built by broadcasting row and column ranges (no loops)."""
    gh, gw = grid_size
    rows = torch.arange(gh)
    cols = torch.arange(gw)
    in_rows = (rows >= top[..., None]) & (rows < (top + h)[..., None])  # (..., gh)
    in_cols = (cols >= left[..., None]) & (cols < (left + w)[..., None])  # (..., gw)
    return (in_rows[..., :, None] & in_cols[..., None, :]).flatten(-2)


def random_subset(mask: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted indices of a uniformly random ``k``-subset of the True entries of each row of ``mask``.

    Every row must have at least ``k`` True entries. Random keys are given to the True entries and 2.0
    (above any key) to the False ones; the ``k`` smallest keys are then a uniform random subset.
    """
    keys = torch.rand(mask.shape, generator=generator)
    keys.masked_fill_(~mask, 2.0)
    idx = keys.topk(k, dim=-1, largest=False).indices
    return idx.sort(dim=-1).values


def mask_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from (seed, rank, step).

    Reproducible (a resumed run redraws the same masks for the same step) and distinct across ranks (each
    data-parallel worker masks its own shard differently). The three numbers are mixed with numpy's
    ``SeedSequence`` hash rather than e.g. ``seed + rank + step``, so that (rank 1, step 0) and
    (rank 0, step 1) do not collide.
    """
    for name, value in (("seed", seed), ("rank", rank), ("step", step)):
        if int(value) < 0:
            raise ValueError(f"mask_generator: {name} = {value} must be >= 0")
    state = np.random.SeedSequence([_MASK_STREAM, int(seed), int(rank), int(step)]).generate_state(
        2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) | (int(state[1]) << 32))
    return g


class MultiBlockMaskSampler:
    """Samples I-JEPA multi-block masks for a patch grid (see the module docstring for the semantics)."""

    def __init__(self, grid_size: tuple[int, int], cfg: MaskConfig, *, shared_sizes: bool | None = None):
        """``shared_sizes=False`` (the METHOD.md semantics) draws a size for every block of every sample.
        ``shared_sizes=True`` draws one target size and one context size per *batch*, shared by all
        samples and blocks, as the I-JEPA reference does: nothing is lost to truncation then (every
        target block is intact, and the context is cut only by placement, not by size, differences), at
        the price of less size diversity within a step. On an 8x8 grid with the default MaskConfig and
        B=256 this keeps ~0.30 instead of ~0.19 of the patches as context and ~0.175 instead of ~0.14
        per target block. ``None`` takes ``cfg.shared_sizes`` (default True, the reference's choice).

        ``cfg`` is taken as validated (``Config.validate`` at load); only its fit to this grid is
        checked here: settings that can never keep ``min_keep`` patches raise ``ConfigError``.
        """
        gh, gw = (int(v) for v in grid_size)
        if gh < 1 or gw < 1:
            raise ValueError(f"grid_size = {tuple(grid_size)} must be two positive integers "
                             "(patch rows, patch columns)")
        self.grid_size: tuple[int, int] = (gh, gw)
        self.num_patches: int = gh * gw
        self.cfg = cfg
        self.shared_sizes = bool(cfg.shared_sizes if shared_sizes is None else shared_sizes)
        self.num_fallbacks: int = 0  # samples whose context had to be widened to all non-target patches
        self.num_collapsed: int = 0  # of those, samples whose target blocks had to be stacked on one block
        self._check_feasible()

    # ------------------------------------------------------------------ feasibility

    def min_target_block(self) -> tuple[int, int]:
        """(h, w) of the smallest target block that ``target_scale``/``target_aspect`` can produce.

        ``h`` and ``w`` are monotone in the scale, so the minimum is at the lowest scale; over the aspect
        they are piecewise constant, changing only where ``sqrt(scale*N*aspect)`` (or ``/aspect``) crosses
        ``k + 1/2``, so evaluating the range ends and the midpoints between those breakpoints is exact.
        """
        s = float(self.cfg.target_scale[0])
        a0, a1 = (float(v) for v in self.cfg.target_aspect)
        area = s * self.num_patches
        points = {a0, a1}
        if area > 0:
            for k in range(max(self.grid_size) + 2):
                c = (k + 0.5) ** 2
                points.update(p for p in (c / area, area / c) if a0 < p < a1)
        pts = sorted(points)
        aspect = torch.tensor(pts + [(x + y) / 2 for x, y in zip(pts, pts[1:])], dtype=torch.float64)
        h, w = block_hw(torch.full_like(aspect, s), aspect, self.grid_size)
        i = int((h * w).argmin())
        return int(h[i]), int(w[i])

    def min_target_area(self) -> int:
        """The fewest patches one target block can have (all M blocks can coincide, so also the fewest
        patches the targets of a sample can cover)."""
        h, w = self.min_target_block()
        return h * w

    def max_context_area(self) -> int:
        """The most patches the union of the context blocks can cover (largest scale, aspect 1)."""
        s = torch.tensor([float(self.cfg.context_scale[1])], dtype=torch.float64)
        h, w = block_hw(s, torch.ones_like(s), self.grid_size)
        return min(self.num_patches, self.cfg.num_context_blocks * int(h * w))

    def _check_feasible(self) -> None:
        """Raise when ``min_keep`` can never be met, naming the setting to change.

        Two necessary conditions: the context lies inside the context blocks, and outside at least one
        target block. (They are not sufficient for every sample, which is what the retries are for.)
        """
        gh, gw = self.grid_size
        n, mk = self.num_patches, self.cfg.min_keep
        if mk > n:
            raise ConfigError(
                f"mask.min_keep = {mk} exceeds the {gh}x{gw} = {n} patches of the grid; lower mask.min_keep "
                f"(or get more patches: a smaller model.patch_size or a larger data.img_size)")
        t_min = self.min_target_area()
        if mk > n - t_min:
            raise ConfigError(
                f"mask.min_keep = {mk} can never be met on a {gh}x{gw} grid: the smallest target block "
                f"covers {t_min} of {n} patches, leaving at most {n - t_min} for the context; lower "
                f"mask.min_keep or mask.target_scale")
        c_max = self.max_context_area()
        if mk > c_max:
            raise ConfigError(
                f"mask.min_keep = {mk} can never be met on a {gh}x{gw} grid: the context blocks cover at "
                f"most {c_max} patches with mask.context_scale = {list(self.cfg.context_scale)}; raise "
                f"mask.context_scale (or mask.num_context_blocks), or lower mask.min_keep")

    # ------------------------------------------------------------------ drawing

    def _target_sizes(self, generator: torch.Generator | None) -> BlockSizes:
        return draw_block_sizes((1, 1), self.grid_size, self.cfg.target_scale, self.cfg.target_aspect,
                                generator)

    def _context_sizes(self, generator: torch.Generator | None) -> BlockSizes:
        return draw_block_sizes((1, 1), self.grid_size, self.cfg.context_scale, (1.0, 1.0), generator)

    def _draw_targets(self, n: int, generator: torch.Generator | None,
                      shared: BlockSizes | None = None) -> torch.Tensor:
        """(n, M, N) boolean target-block masks; sizes drawn per block, or ``shared`` ones expanded."""
        cfg = self.cfg
        shape = (n, cfg.num_target_blocks)
        sizes = shared if shared is not None else draw_block_sizes(
            shape, self.grid_size, cfg.target_scale, cfg.target_aspect, generator)
        h, w = sizes.h.expand(shape), sizes.w.expand(shape)
        top, left = draw_positions(h, w, self.grid_size, generator)
        return block_masks(top, left, h, w, self.grid_size)

    def _draw_context(self, n: int, generator: torch.Generator | None,
                      shared: BlockSizes | None = None) -> torch.Tensor:
        """(n, N) boolean union of the context blocks (aspect 1), before removing the targets."""
        cfg = self.cfg
        shape = (n, cfg.num_context_blocks)
        sizes = shared if shared is not None else draw_block_sizes(
            shape, self.grid_size, cfg.context_scale, (1.0, 1.0), generator)
        h, w = sizes.h.expand(shape), sizes.w.expand(shape)
        top, left = draw_positions(h, w, self.grid_size, generator)
        return block_masks(top, left, h, w, self.grid_size).any(dim=1)

    def _widen_contexts(self, bad: torch.Tensor, targets: torch.Tensor, covered: torch.Tensor,
                        context: torch.Tensor, g: torch.Generator | None, t_sz: BlockSizes | None) -> None:
        """Give the samples ``bad`` every non-target patch as context, in place, redrawing their targets
        until that keeps ``min_keep``; failing that, stack their target blocks on one smallest block."""
        self.num_fallbacks += bad.numel()
        for _ in range(FALLBACK_TRIES):
            context[bad] = ~covered[bad]
            bad = bad[context[bad].sum(dim=1) < self.cfg.min_keep]
            if bad.numel() == 0:
                return
            t = self._draw_targets(bad.numel(), g, t_sz)
            targets[bad], covered[bad] = t, t.any(dim=1)
        # Last resort, always valid by _check_feasible: all M target blocks on one smallest block.
        self.num_collapsed += bad.numel()
        _log.warning("mask sampler: %d samples still too crowded; stacking their %d target blocks "
                     "on one smallest block", bad.numel(), self.cfg.num_target_blocks)
        h0, w0 = self.min_target_block()
        h = torch.full((bad.numel(), 1), h0)
        w = torch.full((bad.numel(), 1), w0)
        top, left = draw_positions(h, w, self.grid_size, g)
        t = block_masks(top, left, h, w, self.grid_size).expand(-1, self.cfg.num_target_blocks, -1)
        targets[bad], covered[bad] = t, t[:, 0]
        context[bad] = ~covered[bad]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> MaskBatch:
        """Draw masks for ``batch_size`` samples (CPU tensors; see :class:`MaskBatch`).

        A sample is valid when its context (context blocks minus all target blocks) keeps at least
        ``min_keep`` patches. Failing samples are, in bounded stages: given new context blocks; redrawn
        entirely (new targets too); given the widest disjoint context, every non-target patch, with their
        targets redrawn until that is big enough; finally (near-infeasible settings only) their target
        blocks are stacked on one smallest block, which the feasibility check guarantees is enough. Only
        the failing samples are redrawn at each round, so valid samples are untouched and the cost stays
        at a few batched tensor ops.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size} must be >= 1")
        g = generator
        mk = self.cfg.min_keep
        t_sz = self._target_sizes(g) if self.shared_sizes else None
        c_sz = self._context_sizes(g) if self.shared_sizes else None

        targets = self._draw_targets(batch_size, g, t_sz)  # (B, M, N)
        covered = targets.any(dim=1)  # (B, N) union of the target blocks
        context = self._draw_context(batch_size, g, c_sz) & ~covered
        ok = context.sum(dim=1) >= mk

        for _ in range(CONTEXT_TRIES):
            bad = (~ok).nonzero().squeeze(1)
            if bad.numel() == 0:
                break
            c = self._draw_context(bad.numel(), g, c_sz) & ~covered[bad]
            context[bad] = c
            ok[bad] = c.sum(dim=1) >= mk

        for _ in range(SAMPLE_TRIES):
            bad = (~ok).nonzero().squeeze(1)
            if bad.numel() == 0:
                break
            t = self._draw_targets(bad.numel(), g, t_sz)
            cov = t.any(dim=1)
            c = self._draw_context(bad.numel(), g, c_sz) & ~cov
            targets[bad], covered[bad], context[bad] = t, cov, c
            ok[bad] = c.sum(dim=1) >= mk

        bad = (~ok).nonzero().squeeze(1)
        if bad.numel():
            _log.warning("mask sampler: %d of %d samples found no context block keeping mask.min_keep = %d "
                         "patches; widening their context to every non-target patch (settings are tight: "
                         "consider a lower mask.min_keep or mask.target_scale)", bad.numel(), batch_size, mk)
            self._widen_contexts(bad, targets, covered, context, g, t_sz)

        # Equalise token counts across the batch (no padding): every context to the smallest context and
        # every target block to the smallest block, keeping a random subset (see module docstring).
        kc = int(context.sum(dim=1).min())
        kt = int(targets.sum(dim=2).min())
        return MaskBatch(context=random_subset(context, kc, g), targets=random_subset(targets, kt, g))
