"""Gradient by ratio: integral-image implementation vs the direct convolution, single thread.

    python benchmarks/bench_gradient.py [--size 128] [--batch 64] [--repeats 7] [--radii 5 9 13 17]

The baseline is the formula as SAR-JEPA's code computes it: per scale, reflect-pad by r, add eps,
four float32 ``conv2d`` calls with (2r+1)² half-window box kernels, log-ratios, magnitude.
Both run on the same single-look speckle batch (amplitude = sqrt(Exp(1)) x 100), interleaved, and
each reports the best (minimum) of ``--repeats`` timings: on a shared machine the minimum is the
estimate least disturbed by other processes. Accuracy is the max abs difference from a float64
direct convolution on the first ``--check`` chips. Results go to ``benchmarks/results/gradient.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sarjepa_dist.transforms import gradient_by_ratio, prepare_inputs  # noqa: E402
from sarjepa_dist.config import DataConfig, GradientConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gradient.json"


def direct_conv(x: torch.Tensor, radii: Sequence[int], eps: float) -> torch.Tensor:
    """The formula with four (2r+1)² box kernels per scale, in ``x.dtype`` (SAR-JEPA's way)."""
    b, c, h, w = x.shape
    planes = x.reshape(b * c, 1, h, w)
    scales = []
    for r in radii:
        k = 2 * r + 1
        top = torch.zeros((1, 1, k, k), dtype=x.dtype)
        top[..., :r + 1, :] = 1
        bottom = torch.zeros_like(top)
        bottom[..., r:, :] = 1
        left = torch.zeros_like(top)
        left[..., :, :r + 1] = 1
        right = torch.zeros_like(top)
        right[..., :, r:] = 1
        p = F.pad(planes, (r, r, r, r), mode="reflect") + eps
        g_h = torch.log(F.conv2d(p, left) / F.conv2d(p, right))
        g_v = torch.log(F.conv2d(p, top) / F.conv2d(p, bottom))
        scales.append(torch.sqrt(g_h * g_h + g_v * g_v))
    return torch.stack(scales, dim=1).reshape(b, c, len(radii), h, w)


def elapsed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--radii", type=int, nargs="+", default=[5, 9, 13, 17])
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--check", type=int, default=8, help="chips compared with the float64 reference")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    radii, eps = tuple(args.radii), args.eps
    g = torch.Generator().manual_seed(0)
    x = (torch.empty((args.batch, 1, args.size, args.size), dtype=torch.float64)
         .exponential_(generator=g).sqrt().mul(100.0).float())
    one = x[:1].clone()
    data_cfg, grad_cfg = DataConfig(channels=1), GradientConfig(radii=radii, eps=eps)

    with torch.no_grad():
        runs: dict[str, Callable[[], object]] = {
            "direct_f32": lambda: direct_conv(x, radii, eps),
            "ours": lambda: gradient_by_ratio(x, radii, eps),
            "ours_batch1": lambda: gradient_by_ratio(one, radii, eps),
            "prepare_inputs_x_gx": lambda: prepare_inputs(x, data_cfg, grad_cfg, ("x", "gx")),
        }
        per_call_chips = {"direct_f32": args.batch, "ours": args.batch, "ours_batch1": 1,
                          "prepare_inputs_x_gx": args.batch}
        for fn in runs.values():  # warm-up (allocator, oneDNN primitive cache)
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved, so load spikes hit every variant alike
            for name, fn in runs.items():
                times[name].append(elapsed(fn))

        n = min(args.check, args.batch)
        ref = direct_conv(x[:n].double(), radii, eps)
        err_ours = (gradient_by_ratio(x[:n], radii, eps).double() - ref).abs().max().item()
        err_direct = (direct_conv(x[:n], radii, eps).double() - ref).abs().max().item()

    per_chip = {k: min(v) / per_call_chips[k] for k, v in times.items()}
    ratio = per_chip["direct_f32"] / per_chip["ours"]
    result = {
        "config": {"size": args.size, "batch": args.batch, "repeats": args.repeats, "radii": list(radii),
                   "eps": eps, "threads": torch.get_num_threads(), "timing": "min over repeats",
                   "data": "single-look speckle, amplitude = sqrt(Exp(1)) * 100"},
        "per_chip_ms": {k: v * 1e3 for k, v in per_chip.items()},
        "median_per_chip_ms": {k: sorted(v)[len(v) // 2] / per_call_chips[k] * 1e3 for k, v in times.items()},
        "speedup_vs_direct_f32": ratio,
        "chips_per_s_per_thread": {k: 1.0 / v for k, v in per_chip.items()},
        "max_abs_err_vs_f64": {"ours": err_ours, "direct_f32": err_direct, "chips": n},
        "machine": {
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }

    print(f"gradient by ratio, {args.size}x{args.size}, radii {list(radii)}, batch {args.batch}, "
          f"1 thread, best of {args.repeats}")
    print(f"{'variant':<22}{'ms/chip':>10}{'chips/s':>10}{'vs direct':>11}")
    for k, v in per_chip.items():
        print(f"{k:<22}{v * 1e3:>10.3f}{1.0 / v:>10.0f}{per_chip['direct_f32'] / v:>10.1f}x")
    print(f"max abs error vs float64 reference ({n} chips): ours {err_ours:.2e}, "
          f"direct float32 {err_direct:.2e}")
    print(f"machine: {result['machine']['cpu']}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load {result['machine']['load_avg_1m']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
