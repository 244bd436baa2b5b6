"""Few-shot feature extraction side by side with a bare ``torch.inference_mode()`` loop.

Project: the features of every chip of a shard dataset as ``sarjepa fewshot`` computes them —
(a) ``extract_features`` (Ray Data: shard read, decode, feature UDF on an actor pool) and
(b) ``extract_local`` (the same per-batch code in-process: read, decode, crop/resize, condition,
encoder, pooling). Baseline: the same encoders over the same chips, already decoded, resized and
conditioned into one tensor per input, in a bare ``torch.inference_mode()`` loop of
``encoder(x).mean(1)`` — plus ``encoder(flip(x))`` when the sources average the mirrored view
(``fewshot.tta = hflip``), and over ``crop_views``' six views of every chip, prepared before the
clock, under ``hflip+crops`` (``sarjepa fewshot``'s default; the baselines get the views too), so
both sides run the same forward passes — on the same
number of threads (the Ray actor gets one CPU, hence one thread, on this machine). The hand-made
baselines cost the bare loop a flatten or an 8×8 average pool of their ready-made inputs.

Ray starts its workers 15 nice levels below the driver; here they run at the driver's (and so the
bare loop's) priority (``RAY_worker_niceness=0``), or any other load on the machine would take
their CPU first and the ratio would measure the scheduler rather than the code.

Two workloads:

- default: one random-init ViT-tiny/12 (patch 8, 64² input) over ``--chips`` chips; rounds
  alternate baseline, project, baseline, … after one warm-up run of the project, so machine load
  hits both alike; the ratio (project chips/s ÷ baseline chips/s) of each adjacent pair is
  recorded, the median reported. In-process and Ray paths.
- ``--issue``: the issue's shape, 5 random-init ViT-tiny/12 (seeds 0–4) and the two baselines in
  ONE ``extract_features`` call over ``--chips`` chips (the issue: 5,171 MSTAR chips), against the
  bare loop doing the same 5 encoders and 2 baselines; no warm-up (the start-up is part of the
  cost), ``--rounds`` pairs. Ray path only. ``--tta none`` halves the encoder work, which makes
  the fixed start-up weigh twice as much: the harder case for the ratio.

    python benchmarks/bench_fewshot.py [--chips 1024] [--rounds 3] [--tta hflip|none|hflip+crops] [--paths in_process,ray]
    python benchmarks/bench_fewshot.py --issue --chips 2600 --rounds 1 --tta none
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import write_archive  # noqa: E402
from sarjepa_dist.config import DataConfig, GradientConfig, config_from_dict  # noqa: E402
from sarjepa_dist.data import shards  # noqa: E402
from sarjepa_dist.fewshot.compute import GRADIENT_MAP_GRID, build_model  # noqa: E402
from sarjepa_dist.fewshot.extract import extract_features, extract_local  # noqa: E402
from sarjepa_dist.fewshot.sources import BASELINES, FeatureSource, baseline_source, encoder_source  # noqa: E402
from sarjepa_dist.transforms import center_resize, crop_views, prepare_inputs  # noqa: E402

GOAL_RATIO = 0.8
# the Ray path as sarjepa runs it (reads as actor_plan says), and with read tasks forced
RAY_PATHS = {"ray": None, "ray_read_tasks": "tasks"}
PATHS = ("in_process", *RAY_PATHS)
ISSUE_ENCODERS = 5


def bench_sources(encoders: int, baselines: bool, tta: str) -> list[FeatureSource]:
    """``encoders`` random-init ViT-tiny/12 (patch 8, 64²; seeds 0, 1, …) and optionally the baselines."""
    def cfg(seed: int):
        return config_from_dict({"data": {"img_size": 64}, "model": {"encoder": "vit_tiny", "patch_size": 8},
                                 "fewshot": {"encoders": ["random-init"], "seed": seed, "tta": tta}})
    sources = [encoder_source("random-init:vit_tiny", cfg(i), name=f"random-init-{i}") for i in range(encoders)]
    return sources + ([baseline_source(b, cfg(0)) for b in BASELINES] if baselines else [])


def prepared_inputs(root: str, sources: Sequence[FeatureSource]) -> dict[tuple[str, str], list[torch.Tensor]]:
    """Every chip of ``root`` decoded, resized and conditioned: each source's input tensor per
    test-time view (``hflip+crops``: ``crop_views``' six; otherwise the one resized chip), by
    ``(conditioning, input)``."""
    chips = []
    for uri in shards.shard_uris(root):
        t = pq.read_table(uri, columns=["chip", "chip_shape", "chip_dtype"]).to_pydict()
        chips += [shards.decode_checked(c, s, d) for c, s, d in zip(t["chip"], t["chip_shape"], t["chip_dtype"])]
    raw = torch.from_numpy(np.stack(chips)).float()
    out: dict[tuple[str, str], list[torch.Tensor]] = {}
    for r in (s.recipe for s in sources):
        if (r.conditioning, r.input) not in out:
            data_cfg = DataConfig(img_size=r.img_size, channels=r.channels, conditioning=r.conditioning)
            grad = {**r.gradient, "radii": tuple(r.gradient["radii"])}
            views = crop_views(raw, r.img_size) if r.tta == "hflip+crops" else [center_resize(raw, r.img_size)]
            out[(r.conditioning, r.input)] = [
                prepare_inputs(v, data_cfg, GradientConfig(**grad), need=(r.input,))[r.input].contiguous()
                for v in views]
    return out


def bare_loop(sources: Sequence[FeatureSource], inputs: dict[tuple[str, str], list[torch.Tensor]],
              batch: int) -> Callable[[], float]:
    """seconds() of the baseline: each source's features from its prepared inputs, averaged over
    its test-time views (and an encoder's mirror under hflip / hflip+crops), nothing else."""
    steps = []
    for src in sources:
        views, r = inputs[(src.recipe.conditioning, src.recipe.input)], src.recipe
        if r.kind == "encoder":
            model = build_model(r, src.state)
            mirrors = 2 if r.tta in ("hflip", "hflip+crops") else 1
            steps.append((views, lambda xb, m=model, v=mirrors: sum(m(xb if i == 0 else xb.flip(-1)).mean(1)
                                                                     for i in range(v)) / v))
        elif r.pooling == "flatten":
            steps.append((views, lambda xb: xb.flatten(1)))
        else:
            steps.append((views, lambda xb: torch.nn.functional.adaptive_avg_pool2d(xb, GRADIENT_MAP_GRID).flatten(1)))

    def run() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for views, step in steps:
                for start in range(0, len(views[0]), batch):
                    sum(step(x[start:start + batch]) for x in views) / len(views)
        return time.perf_counter() - t0
    return run


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(base: Callable[[], float], project: Callable[[], object], rounds: int, warm: bool = True
              ) -> list[dict[str, float]]:
    if warm:
        project()  # warm: actor start-up code paths, page cache, allocator
    rows = []
    for _ in range(rounds):
        b = base()
        p = timed(project)
        rows.append({"baseline_s": b, "project_s": p, "ratio": b / p, "loadavg_1min": os.getloadavg()[0]})
    return rows


def summary(rows: list[dict[str, float]], chips: int) -> dict:
    ratios = sorted(r["ratio"] for r in rows)
    return {"project_chips_per_s": chips / statistics.median(r["project_s"] for r in rows),
            "baseline_chips_per_s": chips / statistics.median(r["baseline_s"] for r in rows),
            "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "pairs": rows}


def start_ray() -> None:
    import ray

    os.environ["RAY_worker_niceness"] = "0"  # workers at the driver's priority (module docstring)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")


def run_default(a: argparse.Namespace, root: str, result: dict) -> None:
    sources = bench_sources(1, False, a.tta)
    base = bare_loop(sources, prepared_inputs(root, sources), a.batch)
    if "in_process" in a.paths:
        result["in_process"] = summary(alternate(base, lambda: extract_local(sources[0], root, batch_size=a.batch),
                                                 a.rounds), a.chips)
    ray_paths = {k: v for k, v in RAY_PATHS.items() if k in a.paths}
    if not ray_paths:
        return
    import ray

    start_ray()
    try:
        for key, reads in ray_paths.items():
            run = lambda r=reads: extract_features(sources, {"bench": root}, batch_size=a.batch, reads=r)  # noqa: E731
            result[key] = summary(alternate(base, run, a.rounds), a.chips)
    finally:
        ray.shutdown()


def run_issue(a: argparse.Namespace, root: str, result: dict) -> None:
    import ray

    sources = bench_sources(ISSUE_ENCODERS, True, a.tta)
    result["sources"] = [s.name for s in sources]
    base = bare_loop(sources, prepared_inputs(root, sources), a.batch)
    start_ray()
    try:
        run = lambda: extract_features(sources, {"bench": root}, batch_size=a.batch)  # noqa: E731
        result["ray"] = summary(alternate(base, run, a.rounds, warm=False), a.chips)
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--issue", action="store_true", help="the issue's workload: 5 encoders + 2 baselines in one call")
    ap.add_argument("--chips", type=int, default=1024)
    ap.add_argument("--size", type=int, default=128, help="stored chip size (MSTAR-like); the encoder sees 64")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tta", default="hflip", choices=["none", "hflip", "hflip+crops"],
                    help="fewshot.tta of the encoders (hflip+crops: of the baselines too, as sarjepa fewshot does)")
    ap.add_argument("--paths", default="in_process,ray",
                    help=f"default workload: which project paths, comma-separated, of {','.join(PATHS)} "
                         "(ray_read_tasks: Ray with read tasks instead of the actor reading its shards)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/fewshot_extract[_issue].json")
    a = ap.parse_args()
    a.paths = [p for p in a.paths.split(",") if p]
    if not a.paths or set(a.paths) - set(PATHS):
        ap.error(f"--paths {','.join(a.paths)}: choose from {','.join(PATHS)}")
    torch.set_num_threads(a.threads)
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"fewshot_extract{'_issue' if a.issue else ''}.json")
    result: dict = {"workload": "issue" if a.issue else "default", "chips": a.chips, "stored_size": a.size,
                    "img_size": 64, "batch": a.batch, "threads": a.threads, "tta": a.tta,
                    "encoder": "vit_tiny/12 patch 8 (random init)", "ray_worker_niceness": 0,
                    "goal_ratio": GOAL_RATIO, "loadavg_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as root:
        write_archive(root, a.chips, a.size, seed=0, shard_mib=8.0)
        (run_issue if a.issue else run_default)(a, root, result)
    result.update({"loadavg_1min_after": os.getloadavg()[0], "machine": platform.machine(),
                   "torch": torch.__version__, "unix_time": time.time()})
    for path in PATHS:
        if path in result:
            s = result[path]
            print(f"{path:14s} project {s['project_chips_per_s']:.1f} chips/s | bare inference_mode loop "
                  f"{s['baseline_chips_per_s']:.1f} chips/s | ratio {s['ratio_median']:.3f} "
                  f"({s['ratio_min']:.3f}–{s['ratio_max']:.3f}) | goal ≥ {GOAL_RATIO}")
    print(f"loadavg {result['loadavg_1min_before']:.2f} → {result['loadavg_1min_after']:.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
