"""The train step side by side with an I-JEPA-reference-style step, one thread, one process.

Project: what a CPU worker does per step with ``transform_placement: device`` — the ∇x transform
(``make_inputs_on_device``), the mask draw and ``engine.train_step`` (context encoder fwd+bwd on the
kept tokens, EMA target encoder on all tokens, predictor, clip, AdamW, EMA).

Baseline: a step with the structure of facebookresearch/ijepa's ``src/train.py`` loop, built here
from timm ``Block``s (not the reference's code): attention written out (``q @ kᵀ``, softmax, ``@ v``),
masks as lists of (B, K) index tensors gathered and concatenated along the batch
(``apply_masks``), the context repeated once per target block through the predictor, targets
repeated to match, smooth-L1 loss, AdamW with torch's defaults, a per-weight gradient-norm log, and a per-parameter EMA
loop. It is fed the *same masks* as the project's step (the project's ~20–24 context and
4 × 10–12 target tokens on the 8×8 grid) and the conditioned chips; its masks and inputs are made
outside its timed region (the reference builds them in data-loader workers), the project's inside.

Timing: steps alternate project, baseline, baseline, project, … (ABBA), so machine load hits
both alike; the ratio of each adjacent pair is recorded and the median (with p10–p90) reported.

    python benchmarks/bench_step_cpu.py                      # the issue's configuration, default predictor context
    python benchmarks/bench_step_cpu.py --predictor-context per-block --out benchmarks/results/step_cpu_per_block.json
    python benchmarks/bench_step_cpu.py --profile            # plus a torch.profiler table of one project step
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sarjepa_dist.config import PREDICTOR_CONTEXTS, Config, DataConfig, GradientConfig, MaskConfig, ModelConfig, OptimConfig  # noqa: E402
from sarjepa_dist.engine import build_method, make_inputs_on_device, train_step  # noqa: E402
from sarjepa_dist.masks import MaskBatch, mask_generator  # noqa: E402
from sarjepa_dist.model.encoder import encoder_timm_kwargs, sincos_pos_embed_2d  # noqa: E402
from sarjepa_dist.optim import Schedules, build_optimizer, param_groups  # noqa: E402

GOAL_RATIO = 0.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="ema-gradient", choices=["ema-gradient", "ema-pixel"])
    p.add_argument("--predictor-context", default=ModelConfig.predictor_context, choices=list(PREDICTOR_CONTEXTS),
                   help="model.predictor_context of the project's step (default: the config's default)")
    p.add_argument("--encoder", default="vit_tiny")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--img", type=int, default=64)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--pred-dim", type=int, default=96)
    p.add_argument("--pred-depth", type=int, default=6)
    p.add_argument("--pred-heads", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each, first")
    p.add_argument("--rounds", type=int, default=8, help="timed ABBA rounds (each: 2 project + 2 baseline steps)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one project step")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cpu.json"))
    return p.parse_args(argv)


def make_config(a: argparse.Namespace) -> Config:
    return Config(
        data=DataConfig(img_size=a.img, channels=a.channels, batch_size=a.batch, transform_placement="device"),
        gradient=GradientConfig(),
        mask=MaskConfig(),
        model=ModelConfig(encoder=a.encoder, patch_size=a.patch, depth=a.depth, predictor_dim=a.pred_dim,
                          predictor_depth=a.pred_depth, predictor_heads=a.pred_heads, target_mode=a.mode,
                          predictor_context=a.predictor_context),
        optim=OptimConfig(),
    ).validate()


def synthetic_amplitude(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Speckled chips: exponential intensity (one look) times a bright blob, as amplitude."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = 1.0 + 8.0 * torch.exp(-((xx ** 2 + yy ** 2) / 0.05))
    intensity = torch.empty(batch, channels, size, size).exponential_(1.0, generator=g)
    return (intensity * blob).sqrt()


# ---------------------------------------------------------------------------- the baseline


def gather_and_stack(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """The reference's ``apply_masks`` structure: one gather per mask, concatenated along the batch."""
    return torch.cat([torch.gather(x, 1, m.unsqueeze(-1).repeat(1, 1, x.size(-1))) for m in masks], dim=0)


def unfuse(blocks: nn.Sequential | nn.ModuleList) -> None:
    for blk in blocks:  # attention written out, as the reference's Attention does
        blk.attn.fused_attn = False


class BaselineEncoder(nn.Module):
    """A timm ViT run the reference's way: embed, add positions, gather each mask, blocks, norm."""

    def __init__(self, timm_kwargs: dict) -> None:
        super().__init__()
        self.vit = VisionTransformer(**timm_kwargs)
        grid = tuple(int(g) for g in self.vit.patch_embed.grid_size)
        with torch.no_grad():
            self.vit.pos_embed.copy_(sincos_pos_embed_2d(self.vit.embed_dim, grid).unsqueeze(0))
        self.vit.pos_embed.requires_grad_(False)
        unfuse(self.vit.blocks)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        tokens = self.vit.patch_embed(x) + self.vit.pos_embed
        if masks is not None:
            tokens = gather_and_stack(tokens, masks)
        return self.vit.norm(self.vit.blocks(tokens))


class BaselinePredictor(nn.Module):
    """The reference predictor's structure: the context is repeated once per target block."""

    def __init__(self, grid: tuple[int, int], in_dim: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        unfuse(self.blocks)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, in_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, z: torch.Tensor, masks_x: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        b = len(z) // len(masks_x)
        z = self.embed(z)
        z = z + gather_and_stack(self.pos_embed.repeat(b, 1, 1), masks_x)
        n_ctx = z.shape[1]
        pos = gather_and_stack(self.pos_embed.repeat(b, 1, 1), masks)  # (M*B, Kt, d)
        pred = self.mask_token.repeat(pos.size(0), pos.size(1), 1) + pos
        x = torch.cat([z.repeat(len(masks), 1, 1), pred], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x)[:, n_ctx:])


class BaselineStep:
    """One reference-structured step: target fwd, context fwd, predictor, loss, backward, AdamW, EMA."""

    def __init__(self, cfg: Config) -> None:
        kwargs = encoder_timm_kwargs(cfg.model, cfg.data.img_size, cfg.data.channels)
        self.encoder = BaselineEncoder(kwargs)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        grid = tuple(int(g) for g in self.encoder.vit.patch_embed.grid_size)
        self.predictor = BaselinePredictor(grid, self.encoder.vit.embed_dim, cfg.model.predictor_dim,
                                           cfg.model.predictor_depth, cfg.model.predictor_heads)
        trained = nn.ModuleDict({"encoder": self.encoder, "predictor": self.predictor})
        # The reference's AdamW: torch's defaults over the same groups (on CPU, torch's per-tensor
        # loop; the project's build_optimizer uses the fused kernel).
        self.optimizer = torch.optim.AdamW(param_groups(trained), lr=cfg.optim.start_lr,
                                           betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
        self.schedules = Schedules(cfg.optim, 10_000)

    def __call__(self, imgs: torch.Tensor, masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor],
                 step: int) -> float:
        self.schedules.apply(self.optimizer, step)
        with torch.no_grad():
            h = self.target_encoder(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = gather_and_stack(h, masks_pred)  # one context mask: no further repeat
        z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.optimizer.step()
        _ = [float(p.grad.norm()) for n, p in self.encoder.named_parameters()  # the reference's grad log
             if p.grad is not None and not (n.endswith(".bias") or p.ndim == 1)]
        self.optimizer.zero_grad()
        m = self.schedules.ema(step)
        with torch.no_grad():
            for q, k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                k.mul_(m).add_((1.0 - m) * q.detach())
        return float(loss.detach())


# ---------------------------------------------------------------------------- the runs


def project_runner(cfg: Config, amp: torch.Tensor) -> tuple[Callable[[int], float], Callable[[int], MaskBatch]]:
    """(step(i) -> loss, masks(i)): the project's full step i, transform and mask draw included."""
    model, sampler = build_method(cfg)
    model.train()
    need = model.required_inputs()
    opt = build_optimizer(model, cfg.optim)
    sched = Schedules(cfg.optim, 10_000)

    def masks(i: int) -> MaskBatch:
        return sampler.sample(amp.shape[0], mask_generator(0, 0, i))

    def step(i: int) -> float:
        inputs = make_inputs_on_device({"amplitude": amp}, cfg.data, cfg.gradient, need)
        m = train_step(model, opt, sched, inputs, masks(i), i, grad_clip=cfg.optim.grad_clip)
        return float(m.loss)

    return step, masks


def baseline_runner(cfg: Config, amp: torch.Tensor, masks: Callable[[int], MaskBatch]) -> Callable[[int], float]:
    """step(i) -> loss: the baseline fed step i's project masks, prepared before its clock starts."""
    torch.manual_seed(1)
    base = BaselineStep(cfg)
    imgs = make_inputs_on_device({"amplitude": amp}, cfg.data, cfg.gradient, ("x",))["x"]
    prepared: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def prepare(i: int) -> None:
        mb = masks(i)
        prepared[i] = ([mb.context], [mb.targets[:, j] for j in range(mb.targets.shape[1])])

    def step(i: int) -> float:
        enc, pred = prepared.pop(i)
        return base(imgs, enc, pred, i)

    step.prepare = prepare  # type: ignore[attr-defined]
    return step


def timed(fn: Callable[[int], float], i: int) -> float:
    t0 = time.perf_counter()
    fn(i)
    return time.perf_counter() - t0


def run_abba(project: Callable[[int], float], baseline: Callable[[int], float], warmup: int,
             rounds: int) -> list[dict[str, float]]:
    """Alternate project and baseline steps (ABBA); one row per adjacent pair."""
    for i in range(warmup):
        project(i)
        baseline.prepare(i)  # type: ignore[attr-defined]
        baseline(i)
    rows = []
    for r in range(rounds):
        for order in ((0, 1), (1, 0)):
            i = warmup + 2 * r + (order == (1, 0))
            baseline.prepare(i)  # type: ignore[attr-defined]
            t = {}
            for who in order:
                t[who] = timed(project if who == 0 else baseline, i)
            rows.append({"project_s": t[0], "baseline_s": t[1], "ratio": t[0] / t[1]})
    return rows


def profile_project(project: Callable[[int], float], i: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        project(i)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def spread(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"median": statistics.median(s), "p10": s[len(s) // 10], "p90": s[min(len(s) - 1, (9 * len(s)) // 10)],
            "min": s[0], "max": s[-1]}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = make_config(a)
    torch.manual_seed(0)
    amp = synthetic_amplitude(a.batch, a.channels, a.img, 0)
    project, masks = project_runner(cfg, amp)
    baseline = baseline_runner(cfg, amp, masks)
    load_before = os.getloadavg()[0]
    rows = run_abba(project, baseline, a.warmup, a.rounds)
    load_after = os.getloadavg()[0]
    tokens = [masks(i) for i in range(a.warmup, a.warmup + 2 * a.rounds)]
    result = {
        "config": {"mode": a.mode, "predictor_context": a.predictor_context, "encoder": a.encoder, "depth": a.depth, "img": a.img, "patch": a.patch,
                   "channels": a.channels, "pred_dim": a.pred_dim, "pred_depth": a.pred_depth,
                   "batch": a.batch, "threads": a.threads, "radii": list(cfg.gradient.radii)},
        "tokens": {"context_mean": statistics.mean(m.context.shape[1] for m in tokens),
                   "target_per_block_mean": statistics.mean(m.targets.shape[2] for m in tokens),
                   "target_blocks": cfg.mask.num_target_blocks},
        "project_s": spread([r["project_s"] for r in rows]),
        "baseline_s": spread([r["baseline_s"] for r in rows]),
        "ratio": spread([r["ratio"] for r in rows]),
        "goal_ratio": GOAL_RATIO,
        "pairs": rows,
        "loadavg_1min_before": load_before, "loadavg_1min_after": load_after,
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "unix_time": time.time(),
    }
    result["meets_goal"] = result["ratio"]["median"] <= GOAL_RATIO
    r = result["ratio"]
    print(f"project  {1000 * result['project_s']['median']:.0f} ms/step | baseline (I-JEPA structure) "
          f"{1000 * result['baseline_s']['median']:.0f} ms/step | ratio {r['median']:.3f} "
          f"(p10 {r['p10']:.3f}, p90 {r['p90']:.3f}, {len(rows)} pairs) | goal ≤ {GOAL_RATIO}: "
          f"{'MET' if result['meets_goal'] else 'MISSED'} | tokens ctx {result['tokens']['context_mean']:.1f}, "
          f"tgt 4×{result['tokens']['target_per_block_mean']:.1f} | load {load_before:.1f} -> {load_after:.1f}")
    if a.profile:
        print(profile_project(project, a.warmup + 2 * a.rounds))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
