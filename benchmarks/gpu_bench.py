"""GPU throughput and model-FLOPs utilisation of the full JEPA training step (one GPU, bf16).

Times ``engine.train_step`` — context encoder fwd+bwd on the kept tokens, EMA target encoder fwd
on all tokens, predictor fwd+bwd, grad clip, fused AdamW, EMA update — for ViT-S/16 and ViT-B/16 on
128 px chips (an 8x8 patch grid) under bf16 autocast, over a batch-size sweep. Optionally the
gradient-domain transform (``prepare_inputs`` on the GPU, ``transform_placement: device``) is
timed inside the step too (``--with-transform``, on by default).

Model FLOPs are counted analytically from the token counts of each step (matmul FLOPs only):
per transformer layer and sequence of N tokens of width D, 24·N·D² for the linear layers
(qkv 3D², proj D², MLP 8D², ×2 FLOPs per multiply-add) plus 4·N²·D for attention (QKᵀ and AV);
patch embedding and the predictor's in/out projections are added. Trained parts (context
encoder, predictor) count ×3 (forward + backward), the target encoder ×1 (forward only).
MFU = model FLOPs per second / the GPU's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s,
H100 PCIe 756, A100 312).

Self-contained: run from the repository root; exits 0 with a message when there is no CUDA GPU
(``--device cpu`` runs the same code on the CPU, tiny, for ``gpu_check.py --dry-run``).
Keeps inside ``--time-budget`` seconds (configurations left are reported as skipped).

    python benchmarks/gpu_bench.py                         # ViT-S/16 and ViT-B/16, batches 128 256 512, eager
    python benchmarks/gpu_bench.py --models vit_base --batches 256 --modes eager compiled
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = (  # dense bf16 tensor-core peak, first match on the device name wins
    ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
)
# predictor per encoder: (dim, depth, heads); ViT-B's is SAR-JEPA's released setting
PREDICTORS = {"vit_small": (384, 6, 12), "vit_base": (512, 8, 16), "vit_tiny": (96, 6, 3), "vit_large": (512, 8, 16)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_small", "vit_base"])
    p.add_argument("--batches", nargs="+", type=int, default=[128, 256, 512])
    p.add_argument("--img", type=int, default=128)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--mode", default="ema-gradient", choices=["ema-gradient", "ema-pixel", "gradient-features"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "compiled"],
                   help="run each configuration eager and/or torch.compile'd (each batch size compiles)")
    p.add_argument("--compile", dest="modes", action="store_const", const=["compiled"],
                   help="shorthand for --modes compiled")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--depth", type=int, default=None, help="encoder depth override (tiny dry runs)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: the same code on the CPU (no MFU), to check the script without a GPU")
    p.add_argument("--no-transform", dest="with_transform", action="store_false",
                   help="feed precomputed inputs instead of running prepare_inputs in the step")
    p.set_defaults(with_transform=True)
    p.add_argument("--time-budget", type=float, default=480.0, help="seconds; later configurations are skipped")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu.json, else benchmarks/results/gpu.json)")
    return p.parse_args(argv)


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def transformer_flops(n_seq: int, n_tok: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs of ``depth`` pre-norm ViT blocks over n_seq sequences of n_tok tokens."""
    linear = 2 * (4 + 2 * mlp_ratio) * dim * dim * n_tok  # qkv 3D², proj D², mlp 2·r·D²; ×2 per MAC
    attention = 4 * n_tok * n_tok * dim
    return depth * n_seq * (linear + attention)


def step_flops(b: int, kc: int, m: int, kt: int, n: int, enc_dim: int, enc_depth: int, pred_dim: int,
               pred_depth: int, target_dim: int, patch_in: int, ema_target: bool) -> dict[str, float]:
    """Model FLOPs of one training step, split by part (see the module docstring)."""
    ctx = transformer_flops(b, kc, enc_dim, enc_depth) + 2 * b * n * patch_in * enc_dim
    pred = (transformer_flops(b * m, kc + kt, pred_dim, pred_depth)
            + 2 * b * kc * enc_dim * pred_dim + 2 * b * m * kt * pred_dim * target_dim)
    tgt = (transformer_flops(b, n, enc_dim, enc_depth) + 2 * b * n * patch_in * enc_dim) if ema_target else 0.0
    return {"context_encoder": 3 * ctx, "predictor": 3 * pred, "target_encoder": tgt,
            "total": 3 * ctx + 3 * pred + tgt}


def _timer(torch, device):
    """Seconds of ``fn()`` on ``device``: CUDA events on a GPU, wall time after a sync elsewhere."""
    def run(fn):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - started
    return run


def bench_one(model_name: str, batch: int, compiled: bool, a: argparse.Namespace, torch, device) -> dict:
    from sarjepa_dist.config import Config, DataConfig, GradientConfig, MaskConfig, ModelConfig, OptimConfig
    from sarjepa_dist.engine import build_method, make_inputs_on_device, train_step
    from sarjepa_dist.masks import mask_generator
    from sarjepa_dist.optim import Schedules, build_optimizer

    pdim, pdepth, pheads = PREDICTORS[model_name]
    cfg = Config(data=DataConfig(img_size=a.img, channels=a.channels, batch_size=batch),
                 gradient=GradientConfig(), mask=MaskConfig(),
                 model=ModelConfig(encoder=model_name, patch_size=a.patch, depth=a.depth, predictor_dim=pdim,
                                   predictor_depth=pdepth, predictor_heads=pheads, target_mode=a.mode),
                 optim=OptimConfig()).validate()
    torch.manual_seed(0)
    model, sampler = build_method(cfg)
    model.to(device).train()
    need = model.required_inputs()
    opt = build_optimizer(model, cfg.optim)
    sched = Schedules(cfg.optim, 1000)
    net = torch.compile(model, backend=a.compile_backend) if compiled else None
    timed = _timer(torch, device)

    g = torch.Generator(device=device).manual_seed(0)
    amp = torch.empty(batch, a.channels, a.img, a.img, device=device).exponential_(1.0, generator=g).sqrt()
    fixed_inputs = make_inputs_on_device({"amplitude": amp}, cfg.data, cfg.gradient, need)
    # masks are drawn on the CPU in training (overlapping the GPU); a pool keeps that out of the timing
    pool = [sampler.sample(batch, mask_generator(0, 0, s)).to(device) for s in range(8)]

    def one(step: int):
        inputs = make_inputs_on_device({"amplitude": amp}, cfg.data, cfg.gradient, need) if a.with_transform \
            else fixed_inputs
        return train_step(model, opt, sched, inputs, pool[step % len(pool)], step, grad_clip=1.0,
                          autocast_dtype=torch.bfloat16, ddp_model=net)

    # compiled: each distinct (Kc, Kt) in the pool may trigger a (then dynamic-shape) recompile
    warmup = max(a.warmup, len(pool) + 2) if compiled else a.warmup
    t_compile = time.perf_counter()
    for s in range(warmup):
        one(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - t_compile

    times = []
    for s in range(a.steps):
        metrics, seconds = timed(lambda: one(warmup + s))
        times.append(seconds)
    loss = float(metrics.loss)

    transform_ms = None
    if a.with_transform:
        transform = lambda: make_inputs_on_device({"amplitude": amp}, cfg.data, cfg.gradient, need)  # noqa: E731
        transform_ms = 1000 * statistics.median(timed(transform)[1] for _ in range(5))

    step_s = statistics.median(times)
    kc = statistics.mean(mb.context.shape[1] for mb in pool)
    kt = statistics.mean(mb.targets.shape[2] for mb in pool)
    m = pool[0].targets.shape[1]
    enc = model.encoder
    flops = step_flops(batch, kc, m, kt, enc.num_patches, enc.embed_dim, len(enc.vit.blocks), pdim, pdepth,
                       model.target_dim, a.channels * a.patch ** 2, model.target_encoder is not None)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tflops = flops["total"] / step_s / 1e12
    return {
        "model": model_name, "batch": batch, "img": a.img, "patch": a.patch, "mode": a.mode,
        "predictor": {"dim": pdim, "depth": pdepth, "heads": pheads},
        "compile": compiled, "compile_backend": a.compile_backend if compiled else None,
        "with_transform": a.with_transform,
        "step_ms": 1000 * step_s, "step_ms_p90": 1000 * sorted(times)[int(0.9 * (len(times) - 1))],
        "img_per_s": batch / step_s, "transform_ms": transform_ms,
        "tokens": {"context": kc, "target_per_block": kt, "blocks": m, "all": enc.num_patches},
        "model_tflop_per_step": flops["total"] / 1e12,
        "flops_split": {k: v / flops["total"] for k, v in flops.items() if k != "total"},
        "achieved_tflops": tflops, "mfu": (tflops / peak) if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "warmup_s": warmup_s, "final_loss": loss,
    }


def _open_device(a: argparse.Namespace, torch):
    """(device, its name, bf16 peak TFLOP/s) or None when the asked-for device is missing."""
    if a.device == "cpu":
        return torch.device("cpu"), "cpu", None
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible (torch.cuda.is_available() is False); this benchmark needs one. "
              "Skipping.")
        return None
    device = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device)
    return device, name, peak_tflops(name)


def _run_one(model_name: str, batch: int, mode: str, a: argparse.Namespace, torch, device) -> dict:
    try:
        row = bench_one(model_name, batch, mode == "compiled", a, torch, device)
    except torch.cuda.OutOfMemoryError:
        row = {"model": model_name, "batch": batch, "compile": mode == "compiled", "error": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "step_ms" in row:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        print(f"  {model_name:<10} {mode:<8} B={batch:<5} {row['step_ms']:8.1f} ms  {row['img_per_s']:9.0f} img/s  "
              f"{row['achieved_tflops']:7.1f} TFLOP/s  MFU {mfu:>6}  warm-up {row['warmup_s']:.0f} s", flush=True)
    else:
        print(f"  {model_name:<10} {mode:<8} B={batch:<5} {row['error']}", flush=True)
    return row


def _print_table(rows: list[dict]) -> None:
    header = (f"{'model':<10}{'mode':>9}{'batch':>6}{'ms/step':>10}{'img/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
              f"{'Kc':>6}{'Kt':>6}{'xform ms':>9}")
    print("\n" + header)
    for r in rows:
        if "step_ms" not in r:
            continue
        mfu = f"{100 * r['mfu']:.1f}" if r["mfu"] is not None else "n/a"
        xf = f"{r['transform_ms']:.2f}" if r["transform_ms"] is not None else "-"
        mode = "compiled" if r["compile"] else "eager"
        print(f"{r['model']:<10}{mode:>9}{r['batch']:>6}{r['step_ms']:>10.1f}{r['img_per_s']:>10.0f}"
              f"{r['achieved_tflops']:>9.1f}{mfu:>7}{r['tokens']['context']:>6.1f}"
              f"{r['tokens']['target_per_block']:>6.1f}{xf:>9}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_bench: torch is not installed; nothing to do")
        return 0
    opened = _open_device(a, torch)
    if opened is None:
        return 0
    device, name, peak = opened
    print(f"gpu_bench: {name} (bf16 peak {peak or 'unknown'} TFLOP/s), torch {torch.__version__}, "
          f"{' and '.join(a.modes)}, transform {'in' if a.with_transform else 'outside'} the step")

    t0 = time.perf_counter()
    rows: list[dict] = []
    for mode in a.modes:
        for model_name in a.models:
            for batch in a.batches:
                if time.perf_counter() - t0 > a.time_budget:
                    rows.append({"model": model_name, "batch": batch, "compile": mode == "compiled",
                                 "skipped": "time budget"})
                    continue
                rows.append(_run_one(model_name, batch, mode, a, torch, device))
    _print_table(rows)

    out = Path(a.out) if a.out else (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT")
                                      else ROOT / "benchmarks" / "results" / "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": name, "peak_bf16_tflops": peak, "torch": torch.__version__,
                               "args": vars(a), "results": rows, "wall_s": time.perf_counter() - t0}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
