"""Streaming an archive 100× larger: worker RSS and chips/s at 1× vs 100× (goal: flat, ≤ ±10 %), on
local disk and on the S3 endpoint; and the listing/planning time of a 10,000-shard dataset.

(a) local disk: ``--base`` chips (1×) and ``--scale``× that (≥ 100,000 chips), 64×64 float32 speckle
    (small chips keep the 100× archive inside the time budget: 100,000 chips are 1.6 GB raw) in
    ~``--shard-mib`` shards (the same shard size on both sides: ~1,000 chips a shard);
(b) the S3 endpoint (a moto server on 127.0.0.1): ``--base`` chips vs ``--s3-chips`` (≥ 20,000);
(c) a dataset of ``--plan-shards`` one-chip shards: ``read_manifest`` (listing) and
    ``build_dataset`` (planning the read over every shard) timed, then the first batch.

How (a) and (b) are compared, and why. Every pass runs the real pipeline (``build_dataset`` →
``iter_train_batches``, 256-row shuffle buffer, 64-chip batches) in this process, with the peak RSS
of the Ray worker processes sampled from /proc (``bench_pipeline.RssSampler``), and logs the
arrival time of every batch.

- Same number of chips, one pass each. A 1× epoch (1,000 chips, ~0.4 s) has no steady state: its
  first batch waits for a whole output block (one shard) and for the shuffle buffer to hold
  256 + 64 rows, so "chips after the first batch / time after it" mostly counts rows produced during
  the start-up (the old 1× figure, the median of three such epochs, was inflated by this; the same
  rule costs a 100,000-chip pass well under 1 %). So the 1× side streams the 1× archive
  as many times as the large side has chips (its manifest's shard list repeated, handed to
  ``build_dataset``) in ONE pass: both sides then read the same number of chips from shards of the
  same size through the same graph, and differ only in the archive (one shard file vs ~100 distinct
  ones, 16 MB vs 1.6 GB of bytes).
- Start-up excluded the same way on both sides: a pass's start-up is the time to its first batch
  (reported separately, also for a real 1× epoch); its chips/s is the chips after the first batch
  over the time after it. The chips after the first batch are also cut into ``WINDOWS`` equal
  windows whose rates are reported, to show whether the rate drifts as a pass goes on.
- Interleaved repeats: after one discarded warm-up epoch (worker start), ``--repeats`` rounds of
  (real 1× epoch, 1× pass, large pass), the order of the two passes alternating (1×, L, L, 1×, …)
  so that neither side always runs second; medians and min–max spread per side, and the load
  average at the start and end of every pass.
- Page cache warm on both sides: every archive is written before anything is timed, ``os.sync()``
  flushes it (no write-back while reading), and each local shard file is read once (1.6 GB fits
  the page cache many times over here: MemAvailable is recorded). On S3 moto keeps the objects in
  its memory.
- Same object-store traffic: both passes push the same number of chips through the object store,
  so whole worker RSS (which counts the store's pages a worker has touched, and never shrinks once
  they are) is comparable; anonymous RSS (the workers' own heap) is reported too.

Runs against a local Ray cluster of ``--num-cpus`` CPUs; results in
``benchmarks/results/archive_scale.json``. Run it under the CPU lock on a quiet machine.

    python benchmarks/bench_archive_scale.py          # ~8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
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

from bench_pipeline import RssSampler, load, quiet_ray_data, start_moto, write_archive  # noqa: E402
from sarjepa_dist import storage  # noqa: E402
from sarjepa_dist.config import DataConfig, GradientConfig  # noqa: E402
from sarjepa_dist.data import shards  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "archive_scale.json"
SIZE = 64
SHUFFLE_BUFFER = 256
WINDOWS = 5  # equal chip windows of a pass's steady part, to see whether its rate drifts


def rate_profile(arrivals: list[tuple[float, int]]) -> dict[str, Any]:
    """Start-up, steady chips/s and per-window chips/s from (seconds since the pass began,
    chips delivered so far) at every batch."""
    t_first, c_first = arrivals[0]
    t_end, c_end = arrivals[-1]
    out: dict[str, Any] = {"chips": c_end, "wall_s": round(t_end, 3), "startup_s": round(t_first, 3),
                           "chips_per_s": round(c_end / t_end, 1), "steady_chips_per_s": None,
                           "window_chips_per_s": []}
    if c_end <= c_first or t_end <= t_first:
        return out
    out["steady_chips_per_s"] = round((c_end - c_first) / (t_end - t_first), 1)
    if len(arrivals) > 4 * WINDOWS:
        edges = [arrivals[0]]
        for k in range(1, WINDOWS + 1):
            target = c_first + (c_end - c_first) * k / WINDOWS
            edges.append(next(a for a in arrivals if a[1] >= target))
        out["window_chips_per_s"] = [round((c1 - c0) / (t1 - t0), 1) for (t0, c0), (t1, c1) in zip(edges, edges[1:])]
    return out


def stream_pass(path: str, manifest: shards.Manifest, batch: int, epoch: int) -> dict[str, Any]:
    """One pass over ``manifest``'s shard list (the dataset at ``path``) in this process."""
    from sarjepa_dist.data.pipeline import build_dataset, dataset_tracker
    from sarjepa_dist.train.batches import iter_train_batches

    cfg = DataConfig(path=path, img_size=SIZE, batch_size=batch, shuffle_buffer=SHUFFLE_BUFFER,
                     transform_placement="device")
    quiet_ray_data()  # Ray Data adds its console handler at its first execution
    load0 = load()
    arrivals: list[tuple[float, int]] = []
    with RssSampler() as rss:
        t0 = time.perf_counter()
        ds = build_dataset(cfg, GradientConfig(), need=("x", "gx"), training=True, epoch=epoch, manifest=manifest,
                           run_name=f"bench-{uuid.uuid4().hex[:8]}")
        chips = 0
        for b in iter_train_batches(ds.iterator(), cfg, epoch=epoch, device="cpu", drop_last=False):
            chips += len(b["chip_id"])
            arrivals.append((time.perf_counter() - t0, chips))
        dataset_tracker(ds).kill()
    out = rate_profile(arrivals)
    out.update({"load_avg_start": load0, "load_avg_end": load(),
                "worker_rss_peak_sum_mib": round(rss.peak_sum / 2**20, 1),
                "worker_rss_peak_max_mib": round(rss.peak_max / 2**20, 1),
                "worker_rss_anon_peak_sum_mib": round(rss.peak_anon_sum / 2**20, 1),
                "driver_rss_peak_mib": round(rss.peak_driver / 2**20, 1), "workers": rss.peak_workers})
    return out


def repeated(manifest: shards.Manifest, times: int) -> shards.Manifest:
    """``manifest`` with its shard list ``times`` over: one pass reads the archive ``times`` times."""
    return dataclasses.replace(manifest, shards=list(manifest.shards) * times, num_chips=manifest.num_chips * times)


def build_archive(root: str, label: str, n: int, shard_mib: float) -> tuple[str, dict[str, Any]]:
    path = storage.join(root, f"{label}-{uuid.uuid4().hex[:6]}")
    t_write = write_archive(path, n, SIZE, seed=n, shard_mib=shard_mib)
    manifest = shards.read_manifest(path)
    return path, {"chips": n, "shards": len(manifest.shards), "write_s": round(t_write, 1),
                  "mib": round(sum(s.bytes for s in manifest.shards) / 2**20, 1)}


def warm_page_cache(path: str) -> float:
    """Flush what was written, then read every file under a local ``path`` once; returns seconds."""
    t0 = time.perf_counter()
    os.sync()
    for f in Path(path).rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                while fh.read(16 << 20):
                    pass
    return time.perf_counter() - t0


def summary(passes: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(statistics.median(p[key] for p in passes), 3)

    rates = [p["steady_chips_per_s"] for p in passes]
    return {"steady_chips_per_s_median": med("steady_chips_per_s"),
            "steady_chips_per_s_range": [min(rates), max(rates)],
            "startup_s_median": med("startup_s"),
            "worker_rss_peak_sum_mib_median": med("worker_rss_peak_sum_mib"),
            "worker_rss_anon_peak_sum_mib_median": med("worker_rss_anon_peak_sum_mib"),
            "passes": passes}


def scale_pair(name: str, small: tuple[str, dict[str, Any]], big: tuple[str, dict[str, Any]], batch: int,
               repeats: int) -> dict[str, Any]:
    """Interleaved rounds of (a real 1x epoch, the 1x archive repeated to the large one's size in
    one pass, the large archive in one pass); see the module docstring."""
    (small_path, small_info), (big_path, big_info) = small, big
    small_manifest, big_manifest = shards.read_manifest(small_path), shards.read_manifest(big_path)
    times = max(1, round(big_info["chips"] / small_info["chips"]))
    big_label = f"{times}x"
    stream_pass(small_path, small_manifest, batch, epoch=0)  # warm-up: worker start
    epochs, runs = [], {"1x": [], big_label: []}
    for r in range(repeats):
        epochs.append(stream_pass(small_path, small_manifest, batch, epoch=r))
        order = ("1x", big_label) if r % 2 == 0 else (big_label, "1x")
        for label in order:
            if label == "1x":
                res = stream_pass(small_path, repeated(small_manifest, times), batch, epoch=r)
            else:
                res = stream_pass(big_path, big_manifest, batch, epoch=r)
            runs[label].append(res)
            print(f"{name:<6}{label:>5} round {r}: {res['chips']:>7} chips, start-up {res['startup_s']:5.2f} s, "
                  f"steady {res['steady_chips_per_s']:7.0f} chips/s (windows {res['window_chips_per_s']}), "
                  f"worker RSS {res['worker_rss_peak_sum_mib']:.0f} MiB (anon "
                  f"{res['worker_rss_anon_peak_sum_mib']:.0f}), load {res['load_avg_start']}", flush=True)
    one, large = summary(runs["1x"]), summary(runs[big_label])
    one.update({"archive": small_info, "pass_reads_archive_times": times,
                "epoch_startup_s_median": round(statistics.median(e["startup_s"] for e in epochs), 3),
                "epoch_startup_s": [e["startup_s"] for e in epochs]})
    large["archive"] = big_info
    per_round = [round(b["steady_chips_per_s"] / s["steady_chips_per_s"], 3)
                 for s, b in zip(runs["1x"], runs[big_label])]
    return {"1x": one, big_label: large,
            "chips_per_s_ratio": round(large["steady_chips_per_s_median"] / one["steady_chips_per_s_median"], 3),
            "chips_per_s_ratio_per_round": per_round,
            "rss_ratio": round(large["worker_rss_peak_sum_mib_median"] / one["worker_rss_peak_sum_mib_median"], 3),
            "anon_rss_ratio": round(large["worker_rss_anon_peak_sum_mib_median"]
                                    / one["worker_rss_anon_peak_sum_mib_median"], 3)}


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


def mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return -1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of 1x and large passes")
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
                                          "ray": ray.__version__, "load_avg_start": load()},
                              "params": vars(a) | {"out": str(a.out), "chip": f"1x{SIZE}x{SIZE} float32",
                                                   "shuffle_buffer": SHUFFLE_BUFFER, "windows": WINDOWS},
                              "goal": "worker RSS and chips/s within +-10% from 1x to 100x"}
    moto_ctx, url = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-archive-") as tmp:
            work = Path(tmp)
            archives = {}
            if "local" not in a.skip:
                archives["local"] = [build_archive(str(work), label, n, a.shard_mib)
                                     for label, n in (("1x", a.base), ("big", a.base * a.scale))]
                result["machine"]["page_cache_warm_s"] = round(sum(warm_page_cache(p) for p, _ in archives["local"]), 1)
            if "s3" not in a.skip:
                from sarjepa_dist.local_s3 import create_bucket

                bucket = create_bucket(url, f"bench-{uuid.uuid4().hex[:8]}")
                archives["s3"] = [build_archive(bucket, label, n, a.shard_mib)
                                  for label, n in (("1x", a.base), ("big", a.s3_chips))]
                os.sync()
            result["machine"]["mem_available_mib"] = mem_available_mib()
            ray.init(num_cpus=a.num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
            quiet_ray_data()
            for name, (small, big) in archives.items():
                result[name] = scale_pair(name, small, big, a.batch, a.repeats)
            if "plan" not in a.skip:
                result["plan"] = plan_many_shards(work, a.plan_shards, a.batch)
    finally:
        ray.shutdown()
        moto_ctx.__exit__(None, None, None)
    result["machine"]["load_avg_end"] = load()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
