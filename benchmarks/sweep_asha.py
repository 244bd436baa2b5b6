"""A 16-trial sweep with ASHA against the same 16 trials run to the end, side by side in one run.

    python benchmarks/sweep_asha.py [--mstar ../shared/data/mstar_soc_17deg] [--grid mask-ema|mask-lr]
        [--steps 600] [--probes 6] [--reduction-factor 3] [--concurrency 2] [--probe-per-class 120]

The 16 trials are a 4 x 4 grid over a tiny ViT (2 blocks, patch 4) on MSTAR 17° chips (ingested
at 128 px, trained at 32 px) on a local Ray cluster: ``mask-ema`` (the default) crosses the
target-block scale with the EMA τ start, the axes the mission sweeps first; ``mask-lr`` crosses it
with the learning rate (the earlier benchmark). Every trial probes its EMA encoder every
``steps / probes`` steps (5-shot k-NN, mean-pooled, ``--probe-per-class`` chips per class, 30% of
them scored). Arm ``asha``: ``tune.scheduler: asha`` (grace period one probe interval; the grid's
points in a seeded random order); arm ``hyperband``: synchronous successive halving (rungs at
``steps · η^-2`` and ``steps · η^-1``, judged at the next probe; paused trials resume from the
checkpoint each trial writes at every probe); arm ``fifo``: every trial to ``steps``
(``--arms``, default ``asha,fifo``). Both arms share the
cluster, the dataset and the grid; each gets a fresh sweep name.

Why MSTAR and not the demo's synthetic chips: at this budget a tiny ViT's mean-pooled probe on
32 px synthetic chips stays at chance for every point of the grid (a first attempt measured
0.16-0.17 at every rung), so any scheduler "finds" the best trial; on MSTAR at 32 px the probe
rises from 0.30 to 0.37 in 250 steps, enough to rank points. Each trial also pays a fixed
start-up that ASHA cannot save (measured per trial as ``startup_s``): with
``--trial-executor torch-trainer`` a Ray Train controller, a worker and Ray Data's coordinators,
each a new Python process importing torch (21-34 s here); with the default (``auto``: one-worker
trials train in the trial's own process, which later trials reuse) the pipeline's start and the
probe set. Sweeps worth early stopping train far longer than that, so trials run 600 steps by default.

Figures per arm: wall time of ``run_sweep`` (Ray start-up excluded: the cluster is up before
either arm), trial-steps run, the best trial (its point and final probe), and for ASHA the probe
the FIFO arm measured at the end for ASHA's chosen point (is ASHA's choice as good when run to the
end?), each trial's median start-up and wall time. The probe's noise: its accuracy is a proportion
over a fixed set of scored chips, so two probes differ beyond noise only past 1.96 standard
errors of their difference (``probe_noise_95``); the spread of the FIFO arm's final probes over
the 16 points is given too.
Results go to ``benchmarks/results/sweep_asha.json`` with the machine they came from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "sweep_asha.json"
TARGET_SCALES = {"grid": [[0.1, 0.15], [0.15, 0.2], [0.2, 0.3], [0.3, 0.4]]}
GRIDS = {
    # what the mission sweeps first: masking scale and EMA momentum (τ start; τ ramps to 1)
    "mask-ema": {"mask.target_scale": TARGET_SCALES, "optim.ema[0]": {"grid": [0.98, 0.99, 0.996, 0.999]}},
    # lr is per 256 chips (scaled by batch/256): this range runs from barely learning to too fast.
    # Under a cosine schedule whose length is train.steps, a higher lr trails at early rungs and
    # wins at the end: the curves cross, which is what ASHA cannot see (the earlier benchmark).
    "mask-lr": {"mask.target_scale": TARGET_SCALES, "optim.lr": {"grid": [1e-3, 3e-3, 1e-2, 3e-2]}},
}


def sweep_config(data: str, runs: str, name: str, scheduler: str, args: argparse.Namespace) -> Any:
    from sarjepa_dist.config import config_from_dict

    every = max(args.steps // args.probes, 1)
    return config_from_dict({
        "ray": {"num_cpus": args.num_cpus},
        "data": {"path": data, "img_size": 32, "batch_size": 32, "shuffle_buffer": 128},
        "gradient": {"radii": [2, 4]},
        "mask": {"min_keep": 4},
        "model": {"patch_size": 4, "depth": 2, "predictor_dim": 48, "predictor_depth": 1, "predictor_heads": 2,
                  "context_domain": "gradient"},
        # mask-ema trains at the lr the mask-lr benchmark found best (3e-2 per 256 chips)
        "optim": {"warmup_fraction": 0.1, **({"lr": 3e-2} if args.grid == "mask-ema" else {})},
        # hyperband resumes paused trials from the checkpoint at each probe; the others save at the end
        "train": {"steps": args.steps, "checkpoint_every": every if scheduler == "hyperband" else args.steps,
                  "log_every": max(every // 3, 1), "cpus_per_worker": 0.5, "storage_path": runs},
        "probe": {"every": every, "shots": 5, "episodes": 3, "max_per_class": args.probe_per_class,
                  "pooling": "mean"},
        "tune": {"name": name, "storage_path": runs, "search": GRIDS[args.grid], "scheduler": scheduler,
                 "max_concurrent_trials": args.concurrency, "grace_period": every, "reduction_factor": args.reduction_factor,
                 "max_failures": 0, "trial_executor": args.trial_executor},
    })


def run_arm(cfg: Any) -> dict[str, Any]:
    from sarjepa_dist.tune import run_sweep

    t0 = time.perf_counter()
    result = run_sweep(cfg)
    wall = time.perf_counter() - t0
    metric = cfg.tune.metric
    best = result.best or {}
    return {
        "wall_s": round(wall, 1),
        "trials": len(result.rows),
        "trial_steps": sum(r["steps"] for r in result.rows),
        "stopped_early": sum(r["stopped"] != "completed" for r in result.rows),
        "errors": sum(r["error"] is not None for r in result.rows),
        "best_point": best.get("params"), "best_probe": best.get(metric), "best_steps": best.get("steps"),
        "final_probes": {json.dumps(r["params"], sort_keys=True): r.get(metric) for r in result.rows
                         if r["stopped"] == "completed"},
        # per trial: start-up (Ray Train, Ray Data, the probe set) before its first step, and wall
        "startup_s_median": _median(r.get("startup_s") for r in result.rows),
        "trial_wall_s_median": _median(r.get("wall_s") for r in result.rows),
        "trial_order": [json.dumps(r["params"], sort_keys=True) for r in
                        sorted(result.rows, key=lambda r: r["trial_id"])],
        "table": result.table_text,
    }


def _median(values: Any) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mstar", default=str(Path(__file__).resolve().parents[2] / "shared/data/mstar_soc_17deg"),
                   help="MSTAR class-per-folder chips")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--probes", type=int, default=6, help="probes per trial; ASHA's grace period is one interval")
    p.add_argument("--reduction-factor", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--grid", choices=sorted(GRIDS), default="mask-ema")
    p.add_argument("--probe-per-class", type=int, default=120,
                   help="probe chips per class (30%% of them scored); more chips, less probe noise")
    p.add_argument("--arms", default="asha,fifo",
                   help="comma-separated, fifo among them: asha, hyperband (synchronous halving), fifo")
    p.add_argument("--trial-executor", default="auto", choices=["auto", "trial-process", "torch-trainer"],
                   help="tune.trial_executor of every arm")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    arm_names = [a for a in args.arms.split(",") if a]
    if "fifo" not in arm_names or not set(arm_names) <= {"asha", "hyperband", "fifo"}:
        raise SystemExit(f"--arms {args.arms!r}: give fifo and at least one of asha, hyperband")

    from sarjepa_dist.cluster import ray_session
    from sarjepa_dist.data.ingest import ingest_images

    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "chips")
        ingest_images(args.mstar, data, 128)
        runs = str(Path(tmp) / "runs")
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%H%M%S")
        configs = {arm: sweep_config(data, runs, f"bench-{arm}-{stamp}", "none" if arm == "fifo" else arm, args)
                   for arm in arm_names}
        first = configs[arm_names[0]]
        with ray_session(first.ray, first.storage):
            arms = {arm: run_arm(cfg) for arm, cfg in configs.items()}

    fifo_finals = [v for v in arms["fifo"]["final_probes"].values() if v is not None]
    summary: dict[str, Any] = {
        "fifo_best_probe": arms["fifo"]["best_probe"],
        "fifo_probe_spread_sd": round(statistics.pstdev(fifo_finals), 4) if len(fifo_finals) > 1 else None,
    }
    stoppers = [a for a in arm_names if a != "fifo"]
    for arm in stoppers:
        choice_key = json.dumps(arms[arm]["best_point"], sort_keys=True)
        summary.update({
            f"{arm}_over_fifo_wall": round(arms[arm]["wall_s"] / arms["fifo"]["wall_s"], 3),
            f"{arm}_over_fifo_trial_steps": round(arms[arm]["trial_steps"] / arms["fifo"]["trial_steps"], 3),
            f"{arm}_same_best_point": arms[arm]["best_point"] == arms["fifo"]["best_point"],
            f"fifo_probe_of_{arm}_choice": arms["fifo"]["final_probes"].get(choice_key),
        })
    # The probe scores a fixed set of chips: its accuracy is a binomial proportion over them, and two
    # probes differ by more than noise only past 1.96 standard errors of the difference.
    classes = sum(1 for d in Path(args.mstar).iterdir() if d.is_dir())
    scored = classes * max(round(args.probe_per_class * configs["fifo"].probe.test_fraction), 1)
    best = summary["fifo_best_probe"]
    if best is not None:
        se_diff = math.sqrt(2 * best * (1 - best) / scored)
        summary["probe_scored_chips"] = scored
        summary["probe_noise_95"] = round(1.96 * se_diff, 4)
        for arm in stoppers:
            choice = summary[f"fifo_probe_of_{arm}_choice"]
            summary[f"{arm}_choice_gap"] = None if choice is None else round(best - choice, 4)
            summary[f"{arm}_choice_within_noise"] = None if choice is None else best - choice <= 1.96 * se_diff
    record = {"benchmark": "sweep_asha", "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "settings": {**vars(args), "grid_axes": GRIDS[args.grid], "trials": 16}, "summary": summary, "arms": arms}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    for arm, fig in arms.items():
        print(f"{arm}: {fig['wall_s']} s, {fig['trial_steps']} trial-steps, {fig['stopped_early']} stopped early, "
              f"best {fig['best_point']} probe {fig['best_probe']}")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
