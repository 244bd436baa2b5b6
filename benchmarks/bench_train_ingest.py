"""Data-wait fraction of a pipeline-fed pretraining run (goal: at most 5 % of step time).

    python benchmarks/bench_train_ingest.py [--steps 30] [--placements device data] [--chips 1100]
                                            [--num-cpus 4] [--data DIR] [--out results/train_ingest.json]

Runs ``run_pretrain`` with the default step config (ViT-tiny, 12 blocks, 64 px chips, patch 8,
batch 32, one worker) on a local Ray cluster, fed by the Ray Data pipeline from local shards of
synthetic SAR chips (written once into a temporary folder unless ``--data`` names a dataset).
The dataset holds more chips than ``steps x batch`` so the run stays inside one epoch: epoch
boundaries start a new Ray Data execution, a cost this benchmark reports separately from the
steady state rather than mixing in.

Figures per placement, from the run's own reports (every ``--log-every`` steps):

- ``steady``: the intervals after the first one. The first interval holds the pipeline's cold
  start (Ray Data launching its read/map tasks) and is reported alone as ``warmup``;
- ``ms_per_step`` (step wall time, waiting included), ``chips_per_s`` and
  ``data_wait_fraction`` = time blocked on the next batch / step wall time.

Results go to ``benchmarks/results/train_ingest.json`` with the machine they came from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "train_ingest.json"
GOAL = 0.05


def interval_summary(rows: list[dict[str, Any]], log_every: int) -> dict[str, float]:
    """Step-time-weighted figures over report intervals (each ``log_every`` steps long)."""
    if not rows:
        return {}
    step_ms = sum(r["ms_per_step"] * log_every for r in rows)
    wait_ms = sum(r["data_wait_fraction"] * r["ms_per_step"] * log_every for r in rows)
    steps = log_every * len(rows)
    return {
        "steps": steps,
        "ms_per_step": step_ms / steps,
        "chips_per_s": sum(r["chips_per_s"] * r["ms_per_step"] * log_every for r in rows) / step_ms,
        "data_wait_fraction": wait_ms / step_ms,
        "data_wait_fraction_worst_interval": max(r["data_wait_fraction"] for r in rows),
    }


def run_one(placement: str, data: str, runs: str, args: argparse.Namespace) -> dict[str, Any]:
    from sarjepa_dist.config import config_from_dict
    from sarjepa_dist.train.runner import run_pretrain

    cfg = config_from_dict({
        "data": {"path": data, "transform_placement": placement},  # defaults: 64 px, batch 32
        "train": {"name": f"bench-ingest-{placement}", "storage_path": runs, "steps": args.steps,
                  "log_every": args.log_every, "checkpoint_every": max(args.steps, 1), "num_workers": 1,
                  "cpus_per_worker": args.cpus_per_worker},
    })
    t0 = time.perf_counter()
    result = run_pretrain(cfg)
    wall = time.perf_counter() - t0
    rows = [r for r in result.metrics_history if r["step"] % args.log_every == 0]
    warm, steady = rows[:1], rows[1:]
    out = {
        "placement": placement,
        "final_step": result.final_step,
        "fit_wall_s": wall,
        "warmup": interval_summary(warm, args.log_every),
        "steady": interval_summary(steady, args.log_every),
        "all": interval_summary(rows, args.log_every),
        "final_loss": rows[-1]["loss"] if rows else None,
        "intervals": [{k: r[k] for k in ("step", "ms_per_step", "chips_per_s", "data_wait_fraction", "loss")}
                      for r in rows],
    }
    s = out["steady"]
    print(f"[{placement}] steady: {s.get('ms_per_step', float('nan')):.0f} ms/step, "
          f"{s.get('chips_per_s', float('nan')):.1f} chips/s, data wait {100 * s.get('data_wait_fraction', 0):.2f}% "
          f"(goal <= {100 * GOAL:.0f}%); warm-up interval wait "
          f"{100 * out['warmup'].get('data_wait_fraction', 0):.1f}%", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--placements", nargs="+", default=["device"], choices=["device", "data"])
    p.add_argument("--chips", type=int, default=1100, help="synthetic chips to write (> steps x 32)")
    p.add_argument("--data", default=None, help="an existing 64 px shard dataset instead of synthetic chips")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    import ray
    import torch

    from sarjepa_dist.cluster import ray_session
    from sarjepa_dist.config import RayConfig
    from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="bench-train-ingest-") as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, "chips")
            t0 = time.perf_counter()
            per_class = -(-args.chips // 10)
            manifest = write_synthetic_dataset(data, SynthConfig(num_classes=10, per_class=per_class, size=64),
                                               target_shard_mib=4.0)
            print(f"wrote {manifest.num_chips} synthetic chips in {len(manifest.shards)} shards "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        with ray_session(RayConfig(num_cpus=args.num_cpus)):
            results = [run_one(pl, data, os.path.join(tmp, "runs"), args) for pl in args.placements]

    record = {
        "benchmark": "train_ingest",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "goal_data_wait_fraction": GOAL,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                    "device": "cuda" if torch.cuda.is_available() else "cpu",
                    "ray_num_cpus": args.num_cpus, "cpus_per_worker": args.cpus_per_worker},
        "config": {"model": "vit_tiny depth 12, patch 8, predictor 96x6", "img_size": 64, "batch_size": 32,
                   "num_workers": 1, "steps": args.steps, "log_every": args.log_every},
        "results": results,
        "met_goal": all(r["steady"].get("data_wait_fraction", 1.0) <= GOAL for r in results),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results → {out}")


if __name__ == "__main__":
    main()
