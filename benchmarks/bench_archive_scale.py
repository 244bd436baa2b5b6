"""Streaming an archive 100× larger: worker RSS and chips/s at 1× vs 100× (goal: flat, ≤ +10 %), on
local disk and on the S3 endpoint; and the listing/planning time of a 10,000-shard dataset.

(a) local disk: ``--base`` chips (1×) and ``--scale``× that (≥ 100,000 chips), 64×64 float32 speckle
    (small chips keep the 100× archive inside the time budget: 100,000 chips are 1.6 GB raw),
    ~``--shard-mib`` shards; one training epoch each through the real pipeline
    (``build_dataset`` → ``iter_train_batches``), with the peak RSS of the Ray worker processes
    sampled from /proc while it runs (``bench_pipeline.RssSampler``). The 1× archive is streamed once
    to warm up (worker start-up, first touch of the object store's pages) and then ``--repeats`` times;
    its median epoch is the 1× figure. RSS is reported whole and anonymous (the processes' own
    heap): whole RSS also counts the shared object-store pages a worker has touched, which grow to
    the object store's size on any archive that fills it once and then stay there.
(b) the S3 endpoint (a moto server on 127.0.0.1): ``--base`` chips vs ``--s3-chips`` (≥ 20,000).
(c) a dataset of ``--plan-shards`` one-chip shards: ``read_manifest`` (listing) and
    ``build_dataset`` (planning the read over every shard) timed, then the first batch.

Runs against a local Ray cluster of ``--num-cpus`` CPUs; results in
``benchmarks/results/archive_scale.json``.

    python benchmarks/bench_archive_scale.py          # ~6-8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import RssSampler, consume, quiet_ray_data, start_moto, write_archive  # noqa: E402
from sarjepa_dist import storage  # noqa: E402
from sarjepa_dist.config import DataConfig, GradientConfig  # noqa: E402
from sarjepa_dist.data import shards  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "archive_scale.json"
SIZE = 64


def stream(path: str, batch: int) -> dict[str, Any]:
    cfg = DataConfig(path=path, img_size=SIZE, batch_size=batch, shuffle_buffer=256, transform_placement="device")
    with RssSampler() as rss:
        out = consume(cfg, GradientConfig(), epoch=0)
    out.update({"worker_rss_peak_sum_mib": round(rss.peak_sum / 2**20, 1),
                "worker_rss_peak_max_mib": round(rss.peak_max / 2**20, 1),
                "worker_rss_anon_peak_sum_mib": round(rss.peak_anon_sum / 2**20, 1),
                "driver_rss_peak_mib": round(rss.peak_driver / 2**20, 1), "workers": rss.peak_workers})
    return out


def scale_pair(name: str, root: str, base: int, big: int, shard_mib: float, batch: int,
               repeats: int) -> dict[str, Any]:
    """1x then big/base x. The 1x archive streams once to warm the cluster up (discarded), then
    ``repeats`` times; its figures are the median epoch's (by steady chips/s)."""
    out: dict[str, Any] = {}
    for label, n in (("1x", base), (f"{big // base}x", big)):
        path = storage.join(root, f"{label}-{uuid.uuid4().hex[:6]}")
        t_write = write_archive(path, n, SIZE, seed=n, shard_mib=shard_mib)
        if label == "1x":
            stream(path, batch)  # warm-up: worker start, object store pages first touched
            runs = sorted((stream(path, batch) for _ in range(repeats)), key=lambda r: r["steady_chips_per_s"] or 0)
            res = runs[len(runs) // 2]
            res["epochs_steady_chips_per_s"] = [r["steady_chips_per_s"] for r in runs]
        else:
            res = stream(path, batch)
        res.update({"archive_chips": n, "write_s": round(t_write, 1),
                    "shards": len(shards.read_manifest(path).shards)})
        out[label] = res
        print(f"{name:<6}{label:>5} {n:>7} chips  {res['steady_chips_per_s'] or res['chips_per_s']:8.0f} chips/s  "
              f"worker RSS peak {res['worker_rss_peak_sum_mib']:7.0f} MiB (max one {res['worker_rss_peak_max_mib']:.0f})",
              flush=True)
    small, large = out["1x"], out[f"{big // base}x"]
    rate = lambda r: r["steady_chips_per_s"] or r["chips_per_s"]  # noqa: E731
    out["rss_ratio"] = round(large["worker_rss_peak_sum_mib"] / small["worker_rss_peak_sum_mib"], 3)
    out["anon_rss_ratio"] = round(large["worker_rss_anon_peak_sum_mib"] / small["worker_rss_anon_peak_sum_mib"], 3)
    out["chips_per_s_ratio"] = round(rate(large) / rate(small), 3)
    return out


def plan_many_shards(work: Path, n_shards: int, batch: int) -> dict[str, Any]:
    from sarjepa_dist.data.pipeline import build_dataset, dataset_tracker
    from sarjepa_dist.train.batches import iter_train_batches

    root = str(work / "many-shards")
    chip = np.full((1, SIZE, SIZE), 2.0, np.float32)
    t0 = time.perf_counter()
    with shards.ShardWriter(root, target_shard_mib=1e-9, command=["bench_archive_scale"]) as w:
        for i in range(n_shards):
            w.add(shards.ChipRecord(f"c{i:06d}", chip))
        w.commit()
    t_write = time.perf_counter() - t0
    cfg = DataConfig(path=root, img_size=SIZE, batch_size=batch, shuffle_buffer=0)
    t0 = time.perf_counter()
    manifest = shards.read_manifest(root)
    t_list = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = build_dataset(cfg, GradientConfig(), need=("x", "gx"), training=True, epoch=0, manifest=manifest,
                       run_name=f"bench-{uuid.uuid4().hex[:8]}")
    t_plan = time.perf_counter() - t0
    t0 = time.perf_counter()
    next(iter(iter_train_batches(ds.iterator(), cfg, epoch=0)))
    t_first = time.perf_counter() - t0
    dataset_tracker(ds).kill()
    out = {"shards": n_shards, "write_s": round(t_write, 1), "list_s": round(t_list, 3), "plan_s": round(t_plan, 3),
           "first_batch_s": round(t_first, 3)}
    print(f"{n_shards} shards: list {t_list:.3f} s, plan {t_plan:.3f} s, first batch {t_first:.2f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="epochs of the 1x archive measured (after a warm-up)")
    p.add_argument("--scale", type=int, default=100)
    p.add_argument("--s3-chips", type=int, default=20_000)
    p.add_argument("--shard-mib", type=float, default=16.0)
    p.add_argument("--plan-shards", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["local", "s3", "plan"])
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    import ray

    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                          "ray": ray.__version__, "load_avg_start": round(os.getloadavg()[0], 2)},
                              "params": vars(a) | {"out": str(a.out), "chip": f"1x{SIZE}x{SIZE} float32"},
                              "goal": "worker RSS and chips/s within +-10% from 1x to 100x"}
    moto_ctx, url = start_moto()
    try:
        ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
        quiet_ray_data()
        with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
            work = Path(tmp)
            if "local" not in a.skip:
                result["local"] = scale_pair("local", str(work), a.base, a.base * a.scale, a.shard_mib, a.batch,
                                             a.repeats)
            if "s3" not in a.skip:
                from sarjepa_dist.local_s3 import create_bucket

                bucket = create_bucket(url, f"bench-{uuid.uuid4().hex[:8]}")
                result["s3"] = scale_pair("s3", bucket, a.base, a.s3_chips, a.shard_mib, a.batch, a.repeats)
            if "plan" not in a.skip:
                result["plan"] = plan_many_shards(work, a.plan_shards, a.batch)
    finally:
        ray.shutdown()
        moto_ctx.__exit__(None, None, None)
    result["machine"]["load_avg_end"] = round(os.getloadavg()[0], 2)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
