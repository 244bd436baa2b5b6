"""Few-shot feature extraction side by side with a bare ``torch.inference_mode()`` loop.

Project: the features of every chip of a shard dataset as ``sarjepa fewshot`` computes them —
(a) ``extract_features`` (Ray Data: Parquet read, decode, ``ChipFeatureUDF`` on an actor pool) and
(b) ``extract_local`` (the same per-batch code in-process: read, decode, crop/resize, condition,
encoder, pooling). Baseline: the same encoder over the same chips, already decoded, resized and
conditioned into one tensor, in a bare ``torch.inference_mode()`` loop of ``encoder(x).mean(1)``
on the same number of threads (the Ray actor gets one CPU, hence one thread, on this machine).

Runs alternate baseline, project, baseline, … so machine load hits both alike; the ratio
(project chips/s ÷ baseline chips/s) of each adjacent pair is recorded, the median reported.

    python benchmarks/bench_fewshot.py [--chips 2048] [--size 128] [--rounds 3] [--no-ray]
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
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import write_archive  # noqa: E402
from sarjepa_dist.config import Config, DataConfig, ModelConfig  # noqa: E402
from sarjepa_dist.data import shards  # noqa: E402
from sarjepa_dist.fewshot.compute import build_model  # noqa: E402
from sarjepa_dist.fewshot.extract import extract_features, extract_local  # noqa: E402
from sarjepa_dist.fewshot.sources import FeatureSource, encoder_source  # noqa: E402
from sarjepa_dist.transforms import center_resize, prepare_inputs  # noqa: E402

GOAL_RATIO = 0.8


def bare_loop(source: FeatureSource, x: torch.Tensor, batch: int) -> Callable[[], float]:
    """seconds() of the baseline: the encoder over prepared inputs, nothing else."""
    model = build_model(source.recipe, source.state)

    def run() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(x), batch):
                model(x[start:start + batch]).mean(dim=1)
        return time.perf_counter() - t0
    return run


def prepared_inputs(root: str, source: FeatureSource) -> torch.Tensor:
    """Every chip of ``root`` decoded, resized and conditioned: the baseline's input tensor."""
    chips = []
    for uri in shards.shard_uris(root):
        t = pq.read_table(uri, columns=["chip", "chip_shape", "chip_dtype"]).to_pydict()
        chips += [shards.decode_checked(c, s, d) for c, s, d in zip(t["chip"], t["chip_shape"], t["chip_dtype"])]
    amp = center_resize(torch.from_numpy(np.stack(chips)).float(), source.recipe.img_size)
    r = source.recipe
    data_cfg = DataConfig(img_size=r.img_size, channels=r.channels, conditioning=r.conditioning)
    return prepare_inputs(amp, data_cfg, Config().gradient, need=(r.input,))[r.input].contiguous()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(base: Callable[[], float], project: Callable[[], object], rounds: int) -> list[dict[str, float]]:
    project()  # warm: actor start-up code paths, page cache, allocator
    rows = []
    for _ in range(rounds):
        b = base()
        p = timed(project)
        rows.append({"baseline_s": b, "project_s": p, "ratio": b / p})
    return rows


def summary(rows: list[dict[str, float]], chips: int) -> dict:
    ratios = sorted(r["ratio"] for r in rows)
    return {"project_chips_per_s": chips / statistics.median(r["project_s"] for r in rows),
            "baseline_chips_per_s": chips / statistics.median(r["baseline_s"] for r in rows),
            "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "pairs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chips", type=int, default=2048)
    ap.add_argument("--size", type=int, default=128, help="stored chip size (MSTAR-like); the encoder sees 64")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true", help="only the in-process path")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fewshot_extract.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = Config(data=DataConfig(img_size=64), model=ModelConfig(encoder="vit_tiny", patch_size=8)).validate()
    source = encoder_source("random-init:vit_tiny", cfg)
    result: dict = {"chips": a.chips, "stored_size": a.size, "img_size": 64, "batch": a.batch, "threads": a.threads,
                    "encoder": "vit_tiny/12 patch 8 (random init)", "goal_ratio": GOAL_RATIO,
                    "loadavg_1min_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as root:
        write_archive(root, a.chips, a.size, seed=0, shard_mib=8.0)
        base = bare_loop(source, prepared_inputs(root, source), a.batch)
        result["in_process"] = summary(alternate(base, lambda: extract_local(source, root, batch_size=a.batch),
                                                 a.rounds), a.chips)
        if not a.no_ray:
            import ray
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
            try:
                ray_run = lambda: extract_features([source], {"bench": root}, batch_size=a.batch)  # noqa: E731
                result["ray"] = summary(alternate(base, ray_run, a.rounds), a.chips)
            finally:
                ray.shutdown()
    result.update({"loadavg_1min_after": os.getloadavg()[0], "machine": platform.machine(),
                   "torch": torch.__version__, "unix_time": time.time()})
    for path in ("in_process", "ray"):
        if path in result:
            s = result[path]
            print(f"{path:10s} project {s['project_chips_per_s']:.0f} chips/s | bare inference_mode loop "
                  f"{s['baseline_chips_per_s']:.0f} chips/s | ratio {s['ratio_median']:.3f} "
                  f"({s['ratio_min']:.3f}–{s['ratio_max']:.3f}) | goal ≥ {GOAL_RATIO}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
