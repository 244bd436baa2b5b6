"""Benchmark the Ray Data pipeline (``sarjepa_dist.data.pipeline``) end to end.

Three questions, each against a local Ray cluster started here with ``--num-cpus`` logical CPUs:

(a) throughput: chips/s (and per CPU core given to Ray) from shard read to a torch batch in the
    consumer, for shards on local disk and on an S3 endpoint (a moto server on 127.0.0.1 that this
    script starts), at 64² and 128² chips, for both ``transform_placement`` values (``device``:
    decode + augment only; ``data``: also condition + gradient-by-ratio in the Ray Data workers);
(b) data wait: a consumer that mimics a training step (sleeps ``--step-ms`` per batch, as a GPU
    step would leave the CPU free) measures the fraction of its time spent waiting for the next
    batch;
(c) streaming: peak RSS of the Ray worker processes (read from /proc) while iterating an archive 1× and 10× in size
    (the pipeline must stream: the 10× peak should stay within +10 % of the 1× peak).

Numbers depend on what else runs on the machine: the load average is recorded with each result.

Usage::

    python benchmarks/bench_pipeline.py                      # defaults: a few minutes on 2 cores
    python benchmarks/bench_pipeline.py --chips 20000 --rss-chips 5000 --num-cpus 8   # bigger
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sarjepa_dist.config import AugmentConfig, DataConfig, GradientConfig  # noqa: E402
from sarjepa_dist.data import shards  # noqa: E402


# --------------------------------------------------------------------------- setup helpers


def start_moto():
    """A moto S3 server on a free loopback port (sarjepa_dist.local_s3); exports the AWS env Ray
    workers will inherit. Returns (context manager to close, url)."""
    from sarjepa_dist.local_s3 import local_s3_endpoint

    ctx = local_s3_endpoint()
    return ctx, ctx.__enter__()


def write_archive(root: str, n: int, size: int, seed: int, shard_mib: float) -> float:
    """``n`` float32 speckle chips (1 x size x size) in shards of ~``shard_mib``; returns seconds."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    with shards.ShardWriter(root, class_names=[f"c{i}" for i in range(10)], command=["bench_pipeline"],
                            target_shard_mib=shard_mib) as w:
        for start in range(0, n, 256):
            k = min(256, n - start)
            phase = rng.uniform(0, 6, size=(k, 1, 1, 1))
            scene = 1.0 + 0.5 * np.sin(xx / 5.0 + phase) * np.cos(yy / 7.0)
            chips = (np.sqrt(rng.exponential(1.0, size=(k, 1, size, size))) * scene + 1e-3).astype(np.float32)
            for j in range(k):
                i = start + j
                w.add(shards.ChipRecord(f"chip-{i:07d}", chips[j], label=i % 10, class_name=f"c{i % 10}"))
        w.commit()
    return time.perf_counter() - t0


def quiet_ray_data() -> None:
    """Ray Data prints an INFO block per execution (one per epoch here) on the console; keep its
    log file, raise the console handler to WARNING."""
    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__:
            h.setLevel(logging.WARNING)


def load() -> float:
    return round(os.getloadavg()[0], 2)


class RssSampler:
    """Samples the RSS of this cluster's Ray worker processes (our descendants named ``ray::*``)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_sum = 0
        self.peak_max = 0
        self.peak_anon_sum = 0
        self.peak_driver = 0
        self.peak_workers = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _workers() -> list[int]:
        """PIDs of our descendants whose title is ``ray::…`` (workers set it with setproctitle).

        Read from /proc (psutil is not a dependency of this project); other Ray clusters on the
        same machine are not our descendants, so they are not counted.
        """
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], list(children.get(os.getpid(), []))
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")[0]
            except OSError:
                continue
            if cmd.startswith(b"ray::"):
                out.append(pid)
        return out

    @staticmethod
    def _status(pid: int) -> dict[str, int]:
        vals: dict[str, int] = {}
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "RssAnon:")):
                        key, v = line.split(":")
                        vals[key] = int(v.split()[0]) * 1024
        except OSError:
            pass
        return vals

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, anon = [], []
            for pid in self._workers():
                st = self._status(pid)
                if st:
                    rss.append(st.get("VmRSS", 0))
                    anon.append(st.get("RssAnon", 0))
            if rss:
                self.peak_sum = max(self.peak_sum, sum(rss))
                self.peak_max = max(self.peak_max, max(rss))
                self.peak_anon_sum = max(self.peak_anon_sum, sum(anon))
                self.peak_workers = max(self.peak_workers, len(rss))
            self.peak_driver = max(self.peak_driver, self._status(os.getpid()).get("VmRSS", 0))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- measurements


def consume(cfg: DataConfig, grad: GradientConfig, *, epoch: int, step_ms: float = 0.0,
            need: tuple[str, ...] = ("x", "gx")) -> dict[str, Any]:
    """One epoch through one consumer; per-batch wait times and the totals."""
    from sarjepa_dist.data.pipeline import build_dataset, dataset_tracker
    from sarjepa_dist.train.batches import iter_train_batches

    quiet_ray_data()
    load0 = load()
    t0 = time.perf_counter()
    ds = build_dataset(cfg, grad, need=need, training=True, epoch=epoch, run_name=f"bench-{uuid.uuid4().hex[:8]}")
    it = iter_train_batches(ds.iterator(), cfg, epoch=epoch, device="cpu", drop_last=False)
    waits: list[float] = []
    chips = 0
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        waits.append(time.perf_counter() - t)
        if batch is None:
            break
        chips += len(batch["chip_id"])
        if step_ms:
            time.sleep(step_ms / 1000.0)
    total = time.perf_counter() - t0
    dataset_tracker(ds).kill()
    first = waits[0]
    steady = total - first
    out = {"chips": chips, "batches": len(waits) - 1, "wall_s": round(total, 3), "first_batch_s": round(first, 3),
           "chips_per_s": round(chips / total, 1),
           "steady_chips_per_s": (round((chips - cfg.batch_size) / steady, 1)
                                  if steady > 0 and chips > cfg.batch_size else None),
           "load_avg_start": load0, "load_avg_end": load()}
    if step_ms:
        out["step_ms"] = step_ms
        out["data_wait_fraction"] = round(sum(waits) / total, 4)
        out["steady_data_wait_fraction"] = round(sum(waits[1:]) / steady, 4) if steady > 0 else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--chips", type=int, default=3000, help="chips per throughput archive")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sources", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--placements", nargs="+", default=["device", "data"], choices=["device", "data"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-mib", type=float, default=8.0)
    ap.add_argument("--step-ms", type=float, default=20.0, help="simulated train step per batch (data-wait)")
    ap.add_argument("--wait-size", type=int, default=64)
    ap.add_argument("--rss-chips", type=int, default=1000, help="chips (128²) in the 1x archive")
    ap.add_argument("--rss-scale", type=int, default=10)
    ap.add_argument("--rss-size", type=int, default=128)
    ap.add_argument("--workdir", default=None, help="where local archives go (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "wait", "rss"])
    args = ap.parse_args(argv)

    import ray
    import torch

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    moto = None
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__, "torch": torch.__version__, "load_avg_start": load()},
        "params": vars(args) | {"workdir": str(workdir)},
        "throughput": [], "data_wait": [], "rss": [],
    }
    grad = GradientConfig()
    try:
        if "s3" in args.sources and "throughput" not in args.skip:
            moto, url = start_moto()
            import boto3

            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})

        def cfg_for(path: str, size: int, placement: str) -> DataConfig:
            return DataConfig(path=path, img_size=size, channels=1, conditioning="log", transform_placement=placement,
                              batch_size=args.batch_size, shuffle_buffer=512, seed=0, max_bad_fraction=0.01,
                              augment=AugmentConfig(flips=True, rot90=True, crop_scale=(0.6, 1.0)))

        # warm-up: start Ray Data workers and import torch in them, outside any timing
        warm = str(workdir / "warm")
        write_archive(warm, 256, 64, seed=99, shard_mib=1.0)
        for placement in args.placements:
            consume(cfg_for(warm, 64, placement), grad, epoch=0)

        epoch = 0
        if "throughput" not in args.skip:
            for size in args.sizes:
                sources: dict[str, str] = {}
                for src in args.sources:
                    root = str(workdir / f"tp{size}") if src == "local" else f"s3://{bucket}/tp{size}"
                    gen_s = write_archive(root, args.chips, size, seed=size, shard_mib=args.shard_mib)
                    print(f"wrote {args.chips} chips of {size}² to {src} in {gen_s:.1f}s", flush=True)
                    sources[src] = root
                for src, root in sources.items():
                    for placement in args.placements:
                        epoch += 1
                        r = consume(cfg_for(root, size, placement), grad, epoch=epoch)
                        r |= {"source": src, "size": size, "placement": placement,
                              "chips_per_s_per_core": round(r["chips_per_s"] / args.num_cpus, 1)}
                        results["throughput"].append(r)
                        print(f"throughput {src:5s} {size:3d}² {placement:6s}: {r['chips_per_s']:8.1f} chips/s "
                              f"({r['chips_per_s_per_core']:.1f}/core; first batch {r['first_batch_s']:.2f}s; "
                              f"load {r['load_avg_start']})", flush=True)

        if "wait" not in args.skip:
            root = str(workdir / f"wait{args.wait_size}")
            if not Path(root, shards.MANIFEST_NAME).exists():
                write_archive(root, args.chips, args.wait_size, seed=7, shard_mib=args.shard_mib)
            for placement in args.placements:
                epoch += 1
                r = consume(cfg_for(root, args.wait_size, placement), grad, epoch=epoch, step_ms=args.step_ms)
                r |= {"source": "local", "size": args.wait_size, "placement": placement,
                      "demand_chips_per_s": round(args.batch_size * 1000.0 / args.step_ms, 1)}
                results["data_wait"].append(r)
                print(f"data wait {placement:6s} step {args.step_ms:.0f} ms/batch of {args.batch_size}: "
                      f"{r['steady_data_wait_fraction']:.1%} steady ({r['data_wait_fraction']:.1%} with start-up)",
                      flush=True)

        if "rss" not in args.skip:
            for scale in (1, args.rss_scale):
                n = args.rss_chips * scale
                root = str(workdir / f"rss{scale}")
                gen_s = write_archive(root, n, args.rss_size, seed=scale, shard_mib=args.shard_mib)
                archive_mib = sum(s.bytes for s in shards.read_manifest(root).shards) / 2**20
                print(f"wrote {n} chips of {args.rss_size}² ({archive_mib:.0f} MiB) in {gen_s:.1f}s", flush=True)
                epoch += 1
                with RssSampler() as sampler:
                    r = consume(cfg_for(root, args.rss_size, "device"), grad, epoch=epoch)
                r |= {"scale": scale, "chips_in_archive": n, "archive_mib": round(archive_mib, 1),
                      "peak_worker_rss_sum_mib": round(sampler.peak_sum / 2**20, 1),
                      "peak_worker_rss_max_mib": round(sampler.peak_max / 2**20, 1),
                      "peak_worker_anon_sum_mib": round(sampler.peak_anon_sum / 2**20, 1),
                      "peak_driver_rss_mib": round(sampler.peak_driver / 2**20, 1),
                      "max_worker_processes": sampler.peak_workers, "samples": sampler.samples}
                results["rss"].append(r)
                print(f"rss x{scale:<3d}: workers sum {r['peak_worker_rss_sum_mib']:.0f} MiB (max one "
                      f"{r['peak_worker_rss_max_mib']:.0f}, anon sum {r['peak_worker_anon_sum_mib']:.0f}), "
                      f"driver {r['peak_driver_rss_mib']:.0f} MiB", flush=True)
                shutil.rmtree(root, ignore_errors=True)
            if len(results["rss"]) == 2:
                a, b = results["rss"]
                results["rss_growth"] = {
                    "worker_rss_sum": round(b["peak_worker_rss_sum_mib"] / a["peak_worker_rss_sum_mib"] - 1, 4),
                    "worker_rss_max": round(b["peak_worker_rss_max_mib"] / a["peak_worker_rss_max_mib"] - 1, 4),
                    "worker_anon_sum": round(b["peak_worker_anon_sum_mib"] / a["peak_worker_anon_sum_mib"] - 1, 4),
                    "within_10_percent": b["peak_worker_rss_sum_mib"] <= 1.1 * a["peak_worker_rss_sum_mib"],
                }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if moto is not None:
            moto.__exit__(None, None, None)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    results["machine"]["load_avg_end"] = load()
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {out}")
    return 0


def print_table(results: dict[str, Any]) -> None:
    n = results["params"]["num_cpus"]
    print(f"\nthroughput (Ray num_cpus={n}; machine load avg {results['machine']['load_avg_start']} at start)")
    print(f"{'source':6s} {'size':>5s} {'placement':9s} {'chips/s':>9s} {'per core':>9s} {'steady':>9s} "
          f"{'1st batch':>9s}")
    for r in results["throughput"]:
        print(f"{r['source']:6s} {r['size']:5d} {r['placement']:9s} {r['chips_per_s']:9.1f} "
              f"{r['chips_per_s_per_core']:9.1f} {r['steady_chips_per_s'] or 0:9.1f} {r['first_batch_s']:8.2f}s")
    if results["data_wait"]:
        print("\ndata wait (consumer sleeps step_ms per batch)")
        for r in results["data_wait"]:
            print(f"{r['placement']:9s} step {r['step_ms']:.0f} ms (demand {r['demand_chips_per_s']:.0f} chips/s): "
                  f"wait {r['steady_data_wait_fraction']:.1%} steady, {r['data_wait_fraction']:.1%} incl. start-up")
    if results["rss"]:
        print("\npeak RSS of Ray worker processes while iterating (device placement)")
        for r in results["rss"]:
            print(f"x{r['scale']:<3d} {r['archive_mib']:7.0f} MiB archive: "
                  f"sum {r['peak_worker_rss_sum_mib']:7.0f} MiB, max one {r['peak_worker_rss_max_mib']:6.0f} MiB, "
                  f"anon sum {r['peak_worker_anon_sum_mib']:6.0f} MiB, "
                  f"driver {r['peak_driver_rss_mib']:6.0f} MiB ({r['max_worker_processes']} worker processes)")
        if "rss_growth" in results:
            g = results["rss_growth"]
            print(f"growth 1x→10x: sum {g['worker_rss_sum']:+.1%}, max one {g['worker_rss_max']:+.1%}, "
                  f"anon {g['worker_anon_sum']:+.1%} → within +10%: {g['within_10_percent']}")


if __name__ == "__main__":
    sys.exit(main())
