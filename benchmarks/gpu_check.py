"""The GPU path in one command (``benchmarks/gpu_check.sh`` runs this), ≤ 8 minutes on one GPU.

Four parts, each bounded in time, all written to one JSON (``benchmarks/results/gpu_check.json``):

1. ``cuda_tests``: the test suite's CUDA tests (∇x and ``prepare_inputs`` on the device, with and
   without autocast) and the compile / bf16 tests of the train step; on a GPU a skipped test is a
   failure.
2. ``gradient``: ∇x (``prepare_inputs``: x and the gradient by ratio) on the device vs the CPU, same
   chips: largest difference and chips/s of each, side by side.
3. ``gpu_bench``: ``gpu_bench.py`` for ViT-S/16 and ViT-B/16 at 128 px, bf16, eager and compiled:
   img/s and MFU (goal: ≥ 45% MFU for ViT-B/16).
4. ``pretrain``: ``sarjepa synth`` then a 1-GPU ``sarjepa pretrain`` through Ray Train (NCCL backend,
   ``transform_placement: device``), read back from the run's last checkpoint.

Without a CUDA GPU it stops at once with ``sarjepa: error: ...`` (exit 2). ``--dry-run`` runs the
same four parts on the CPU, tiny (vit_tiny, 32 px, a few steps, gloo), so the script itself can be
tested on a machine without a GPU; its JSON says ``"dry_run": true``.

    bash benchmarks/gpu_check.sh                 # on the GPU machine, after bash infra/dev/bootstrap.sh
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
TOTAL_BUDGET_S = 470.0  # the whole check, under the 8-minute goal
MFU_GOAL_VIT_B = 0.45
CUDA_TEST_FILES = ("tests/transforms/test_gradient_by_ratio.py", "tests/transforms/test_prepare_inputs.py",
                   "tests/train/test_compile_precision.py")


class CheckFailed(RuntimeError):
    """One part of the check did not do what it must; the message says what."""


# --------------------------------------------------------------------------- the parts


def run_cuda_tests(a: argparse.Namespace, work: Path, timeout: float) -> dict[str, Any]:
    junit = work / "cuda_tests.xml"
    select = ["-k", "cuda"] if a.dry_run else ["-k", "cuda or compile or bf16 or precision"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           *select, *CUDA_TEST_FILES]
    proc = _run(cmd, timeout)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    skipped = [c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None]
    out = {"returncode": proc.returncode, **counts, "skipped_tests": skipped}
    if proc.returncode != 0:
        raise CheckFailed(f"CUDA tests failed: {counts}\n{proc.stdout[-3000:]}")
    if not a.dry_run and skipped:
        raise CheckFailed(f"CUDA tests were skipped on a GPU machine: {skipped}")
    return out


def run_gradient(a: argparse.Namespace, work: Path, timeout: float) -> dict[str, Any]:
    """∇x on the device vs the CPU on the same speckle chips (runs in this process)."""
    import torch

    from sarjepa_dist.config import DataConfig, GradientConfig
    from sarjepa_dist.transforms import prepare_inputs

    size, batch = (32, 8) if a.dry_run else (128, 256)
    device = torch.device("cpu" if a.dry_run else "cuda")
    data_cfg, grad_cfg = DataConfig(img_size=size, channels=1), GradientConfig()
    g = torch.Generator().manual_seed(0)
    amp = torch.empty(batch, 1, size, size).exponential_(1.0, generator=g).sqrt().mul(100.0)

    def on(dev: torch.device) -> Callable[[], dict[str, torch.Tensor]]:
        x = amp.to(dev)
        return lambda: prepare_inputs(x, data_cfg, grad_cfg, ("x", "gx"))

    cpu_out, cpu_s = _best_time(on(torch.device("cpu")), torch.device("cpu"), repeats=3)
    dev_out, dev_s = _best_time(on(device), device, repeats=10)
    diff = {k: float((dev_out[k].float().cpu() - cpu_out[k]).abs().max()) for k in cpu_out}
    scale = {k: float(cpu_out[k].abs().max()) for k in cpu_out}
    out = {"device": str(device), "chips": batch, "size": size, "radii": list(grad_cfg.radii),
           "cpu_threads": torch.get_num_threads(), "max_abs_diff": diff, "max_abs_value": scale,
           "cpu_chips_per_s": batch / cpu_s, "device_chips_per_s": batch / dev_s, "speedup": cpu_s / dev_s}
    for k in diff:
        if not diff[k] <= 1e-4 * max(1.0, scale[k]):
            raise CheckFailed(f"∇x on {device} differs from the CPU in {k!r} by {diff[k]:.3g} (scale {scale[k]:.3g})")
    return out


def run_gpu_bench(a: argparse.Namespace, work: Path, timeout: float) -> dict[str, Any]:
    out_json = work / "gpu_bench.json"
    if a.dry_run:
        args = ["--device", "cpu", "--models", "vit_tiny", "--batches", "4", "--img", "32", "--patch", "4",
                "--depth", "1", "--warmup", "1", "--steps", "2", "--modes", "eager"]
    else:
        # ViT-B first in each mode: the MFU goal is about it, and a tight budget skips the last configurations
        args = ["--models", "vit_base", "vit_small", "--batches", str(a.bench_batch), "--img", "128",
                "--patch", "16", "--modes", "eager", "compiled", "--time-budget", str(max(30.0, timeout - 60))]
    proc = _run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), *args, "--out", str(out_json)],
                timeout)
    if proc.returncode != 0 or not out_json.exists():
        raise CheckFailed(f"gpu_bench.py failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    bench = json.loads(out_json.read_text())
    rows = [r for r in bench["results"] if "step_ms" in r]
    if not rows:
        raise CheckFailed(f"gpu_bench.py measured nothing: {bench['results']}")
    vit_b = [r["mfu"] for r in rows if r["model"] == "vit_base" and r["mfu"] is not None]
    bench["best_mfu_vit_base"] = max(vit_b) if vit_b else None
    bench["mfu_goal_vit_base"] = MFU_GOAL_VIT_B
    return bench


def run_pretrain(a: argparse.Namespace, work: Path, timeout: float) -> dict[str, Any]:
    """``sarjepa synth`` + ``sarjepa pretrain`` (1 worker) as a user runs them; the last checkpoint's report."""
    deadline = time.perf_counter() + timeout
    if a.dry_run:
        size, steps, batch = 32, 4, 8
        specific = ["model.encoder=vit_tiny", "model.patch_size=4", "model.depth=1", "train.use_gpu=false",
                    "ray.num_cpus=4", "train.cpus_per_worker=0.5"]
    else:
        size, steps, batch = 128, 60, 128
        specific = ["model.encoder=vit_small", "model.patch_size=16", "model.predictor_dim=384",
                    "model.predictor_depth=6", "model.predictor_heads=12", "train.use_gpu=true"]
    data, runs = work / "synth", work / "runs"
    cli = [sys.executable, "-m", "sarjepa_dist.cli"]
    synth = _run([*cli, "synth", str(data), "--classes", "4", "--per-class", str(2 * batch), "--size", str(size),
                  "--shard-mib", "4"], timeout / 3)
    if synth.returncode != 0:
        raise CheckFailed(f"sarjepa synth failed:\n{synth.stdout[-2000:]}")
    sets = [f"data.path={data}", f"data.img_size={size}", f"data.batch_size={batch}",
            "data.transform_placement=device", "gradient.radii=[2,4]", "mask.min_keep=4", *specific,
            "train.num_workers=1", f"train.steps={steps}", f"train.checkpoint_every={steps}",
            f"train.log_every={max(1, steps // 4)}", "train.name=gpu-check", f"train.storage_path={runs}",
            "probe.every=0"]
    started = time.perf_counter()
    proc = _run([*cli, "pretrain", *[arg for s in sets for arg in ("--set", s)]], deadline - started)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise CheckFailed(f"sarjepa pretrain failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    history = _last_checkpoint_history(runs / "gpu-check")
    last = history[-1]
    out = {"backend": "gloo" if a.dry_run else "nccl", "transform_placement": "device", "steps": last["step"],
           "wall_s": wall, "loss": last["loss"], "chips_per_s": last["chips_per_s"],
           "ms_per_step": last["ms_per_step"], "data_wait_fraction": last["data_wait_fraction"],
           "world_size": last["world_size"], "batch_size": batch, "img_size": size,
           "reports": [{k: row[k] for k in ("step", "loss", "chips_per_s")} for row in history]}
    if last["step"] != steps or not all(math.isfinite(r["loss"]) for r in history):
        raise CheckFailed(f"pretrain ended at step {last['step']} of {steps} or with a non-finite loss: {out}")
    return out


# --------------------------------------------------------------------------- helpers


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    print(f"[gpu_check] $ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired as exc:
        raise CheckFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from exc
    print(proc.stdout[-4000:], flush=True)
    return proc


def _best_time(fn: Callable[[], Any], device, repeats: int) -> tuple[Any, float]:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - started)
    return out, min(times)


def _last_checkpoint_history(run_dir: Path) -> list[dict[str, Any]]:
    checkpoints = sorted(run_dir.glob("checkpoint_*/metrics_history.jsonl"))
    if not checkpoints:
        raise CheckFailed(f"pretrain left no checkpoint under {run_dir}")
    rows = [json.loads(line) for line in checkpoints[-1].read_text().splitlines() if line.strip()]
    if not rows:
        raise CheckFailed(f"{checkpoints[-1]} holds no report")
    return rows


PARTS: dict[str, tuple[Callable[..., dict[str, Any]], float]] = {  # name -> (function, its time limit)
    "cuda_tests": (run_cuda_tests, 90.0),
    "gradient": (run_gradient, 30.0),
    "gpu_bench": (run_gpu_bench, 240.0),
    "pretrain": (run_pretrain, 150.0),
}


def _machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "gpu_count": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same parts on the CPU, tiny (no GPU needed)")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--bench-batch", type=int, default=256, help="gpu_bench.py batch size per configuration")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.t0 = time.perf_counter()
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("sarjepa: error: benchmarks/gpu_check.sh needs a CUDA GPU, and torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine, "
              "or pass --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"dry_run": a.dry_run, "machine": _machine(), "parts": {},
                              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="sarjepa-gpu-check-") as tmp:
        for name in a.parts:
            fn, limit = PARTS[name]
            left = TOTAL_BUDGET_S - (time.perf_counter() - a.t0)
            started = time.perf_counter()
            try:
                result = {"ok": True, **fn(a, Path(tmp), min(limit, left))}
            except CheckFailed as exc:
                result = {"ok": False, "error": str(exc)}
            result["part_wall_s"] = time.perf_counter() - started
            report["parts"][name] = result
            print(f"[gpu_check] {name}: {'ok' if result['ok'] else 'FAILED'} ({result['part_wall_s']:.0f} s)",
                  flush=True)
    report["wall_s"] = time.perf_counter() - a.t0
    report["ok"] = all(p["ok"] for p in report["parts"].values())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[gpu_check] {'all parts passed' if report['ok'] else 'FAILED'} in {report['wall_s']:.0f} s; "
          f"wrote {a.out}")
    if not report["ok"]:
        failed = [n for n, p in report["parts"].items() if not p["ok"]]
        print(f"sarjepa: error: gpu_check parts failed: {', '.join(failed)} (see {a.out})", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
