"""Where the input path's CPU goes, part by part, in one run (issue "An input path that can feed a
GPU node": what keeps Ray per CPU-second under 0.5x the bare ``_process_batch``).

On the archive and config of ``bench_input_path.py`` (12,000 float32 chips of 128², 8 MiB shards,
``jobs/pretrain.yaml``'s data section, device placement, ``ray.init(num_cpus=2)`` with
``--consumer-cpus`` (default 1) held for the consumer as in ``bench_input_path.py``), each epoch
runs, interleaved:

- ``bare_process``: ``_process_batch`` over pre-read blocks, one thread, this process (the baseline);
- ``bare_task``: read + validate + process, shard after shard, one thread, this process;
- ``task_in_ray``: that same loop inside one plain Ray task (no Ray Data), its outputs dropped:
  what a Ray worker process itself changes;
- ``task_in_ray_put``: the same, every 128-chip output ``ray.put`` and kept until the task ends, as
  a Ray Data task's outputs stay in the object store until consumed: the object store's share;
- ``pipeline_no_consumer``: ``build_dataset`` run to the end with the driver taking only block
  references (``iter_internal_ref_bundles``), never the data: Ray Data's executor and its workers;
- ``pipeline``: ``build_dataset`` consumed by ``iter_train_batches`` as a training run's rank 0
  consumes it (``bench_input_path.ray_round``): the whole input path;
- ``pipeline_no_shuffle``: the same with ``shuffle=False`` (Ray's own batching, no shuffle buffer):
  the share of the consumer's shuffle buffer (``data/shuffle.py``) against Ray's plain batches.

Every figure is CPU seconds of the processes concerned (the Ray side: this process and every
descendant, from /proc, by kind) and their minor page faults, per chip. The summary gives
microseconds a chip for each part as the medians' differences:

    read + validate          = bare_task - bare_process
    a Ray worker's own share = task_in_ray - bare_task
    the object store's put   = task_in_ray_put - task_in_ray
    Ray Data in its workers  = pipeline_no_consumer workers - task_in_ray_put
    the executor (driver)    = pipeline_no_consumer driver
    the consumer (driver)    = pipeline driver - pipeline_no_consumer driver
    its shuffle buffer       = pipeline driver - pipeline_no_shuffle driver

Usage::

    flock /tmp/sarjepa-cpu.lock python benchmarks/input_path_breakdown.py [--epochs 3] [--data DIR]
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
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_input_path import (_tree_cpu, bare_process, bare_task, hold_consumer_cpus, make_spec,  # noqa: E402
                              ray_round, shard_paths)
from bench_pipeline import load, quiet_ray_data, write_archive  # noqa: E402

from sarjepa_dist.config import load_config  # noqa: E402
from sarjepa_dist.data import shards  # noqa: E402


def _minor_faults(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[pid] = int(f.read().rsplit(")", 1)[1].split()[7])
        except (OSError, IndexError):
            continue
    return out


def tree_reading() -> dict[int, tuple[str, float, int]]:
    """pid → (kind, CPU s, minor faults) for this process and its descendants."""
    cpu = _tree_cpu()
    faults = _minor_faults(list(cpu))
    return {pid: (kind, c, faults.get(pid, 0)) for pid, (kind, c) in cpu.items()}


def tree_delta(before: dict[int, tuple[str, float, int]], after: dict[int, tuple[str, float, int]],
               chips: int) -> dict[str, Any]:
    """CPU µs and minor faults per chip by process kind between two readings."""
    cpu: dict[str, float] = {}
    faults: dict[str, int] = {}
    for pid, (kind, c, f) in after.items():
        _, c0, f0 = before.get(pid, (kind, 0.0, 0))
        cpu[kind] = cpu.get(kind, 0.0) + c - c0
        faults[kind] = faults.get(kind, 0) + f - f0
    return {"chips": chips, "cpu_s": round(sum(cpu.values()), 3),
            "us_per_chip": {k: round(v / chips * 1e6, 1) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0},
            "faults_per_chip": {k: round(v / chips, 1) for k, v in faults.items() if v > 0}}


def _task_loop(data_cfg: Any, grad_cfg: Any, expected_shape: tuple[int, ...], paths: list[tuple[str, int]],
               epoch: int, keep_puts: bool) -> tuple[int, float, int]:
    """The bare task loop inside a Ray task: (chips, process CPU s, minor faults)."""
    import resource

    import pyarrow.fs as pafs
    import ray

    from sarjepa_dist.data.pipeline import _process_in_pieces, _read_one_shard, _Spec

    spec = _Spec(data_cfg=data_cfg, gradient_cfg=grad_cfg, need=("x", "gx"), training=True, epoch=epoch,
                 expected_shape=expected_shape, shard_prefix="")
    fs = pafs.LocalFileSystem()
    kept = []
    f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    chips = 0
    for path, rows in paths:
        for block in _read_one_shard(path, rows, spec=spec, filesystem=fs, tracker=None):
            for out in _process_in_pieces(block, spec=spec):
                chips += len(out["label"])
                if keep_puts:
                    kept.append(ray.put(out))
    cpu, faults = time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    del kept
    return chips, cpu, faults


def in_ray_task(cfg: Any, epoch: int, keep_puts: bool) -> dict[str, Any]:
    import ray

    spec = make_spec(cfg, cfg.gradient, epoch)
    task = ray.remote(num_cpus=1, max_retries=0)(_task_loop)
    chips, cpu, faults = ray.get(task.remote(cfg.data, cfg.gradient, spec.expected_shape,
                                             shard_paths(cfg.data.path), epoch, keep_puts))
    return {"chips": chips, "cpu_s": round(cpu, 3), "us_per_chip": {"ray-worker": round(cpu / chips * 1e6, 1)},
            "faults_per_chip": {"ray-worker": round(faults / chips, 1)}}


def in_this_process(fn: Any, cfg: Any, epoch: int) -> dict[str, Any]:
    import resource

    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = fn(cfg, cfg.gradient, epoch)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"chips": out["chips"], "cpu_s": out["cpu_s"],
            "us_per_chip": {"driver": round(out["cpu_s"] / out["chips"] * 1e6, 1)},
            "faults_per_chip": {"driver": round(faults / out["chips"], 1)}}


def pipeline_no_consumer(cfg: Any, epoch: int, tracker: Any) -> dict[str, Any]:
    from sarjepa_dist.data.pipeline import build_dataset

    before = tree_reading()
    ds = build_dataset(cfg.data, cfg.gradient, need=("x", "gx"), training=True, epoch=epoch, tracker=tracker)
    chips = sum(bundle.num_rows() for bundle in ds.iter_internal_ref_bundles())
    return tree_delta(before, tree_reading(), chips)


def pipeline(cfg: Any, epoch: int, tracker: Any) -> dict[str, Any]:
    before = tree_reading()
    out = ray_round(cfg, cfg.gradient, epoch, 2, tracker)
    return tree_delta(before, tree_reading(), out["chips"])


def pipeline_no_shuffle(cfg: Any, epoch: int, tracker: Any) -> dict[str, Any]:
    """As ``pipeline``, the consumer without the shuffle buffer (Ray's own batching)."""
    from sarjepa_dist.data.pipeline import build_dataset
    from sarjepa_dist.train.batches import iter_train_batches

    before = tree_reading()
    ds = build_dataset(cfg.data, cfg.gradient, need=("x", "gx"), training=True, epoch=epoch, tracker=tracker)
    chips = sum(int(b["amplitude"].shape[0])
                for b in iter_train_batches(ds.iterator(), cfg.data, epoch=epoch, drop_last=True, shuffle=False))
    return tree_delta(before, tree_reading(), chips)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chips", type=int, default=12000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--shard-mib", type=float, default=8.0)
    ap.add_argument("--config", default=str(ROOT / "jobs" / "pretrain.yaml"))
    ap.add_argument("--data", default=None, help="a shard dataset to reuse (written there when missing)")
    ap.add_argument("--epochs", type=int, default=3, help="interleaved rounds of every part")
    ap.add_argument("--consumer-cpus", type=float, default=1.0,
                    help="logical CPUs held for the consumer, as in bench_input_path.py (0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "input_path_breakdown.json"))
    args = ap.parse_args(argv)

    import ray
    import torch

    tmp = tempfile.TemporaryDirectory(prefix="bench-breakdown-") if args.data is None else None
    data = args.data or str(Path(tmp.name) / "shards")
    if not Path(data, shards.MANIFEST_NAME).exists():
        write_archive(data, args.chips, args.size, seed=args.size, shard_mib=args.shard_mib)
    cfg = load_config(args.config, overrides=[f"data.path={data}", "data.transform_placement=device"])
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__,
                    "torch": torch.__version__, "load_avg_start": load()},
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "params": vars(args) | {"data": data}, "epochs": []}
    parts = ["bare_process", "bare_task", "task_in_ray", "task_in_ray_put", "pipeline_no_consumer", "pipeline",
             "pipeline_no_shuffle"]
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
        quiet_ray_data()
        consumer_cpus = hold_consumer_cpus(args.consumer_cpus)  # noqa: F841  (held while it lives)
        from sarjepa_dist.data.badrows import BadRowTracker

        tracker = BadRowTracker(f"bench-breakdown-{uuid.uuid4().hex[:8]}")
        ray_round(cfg, cfg.gradient, 1000, 2, tracker)  # warm-up: workers started, torch imported there
        in_ray_task(cfg, 1000, keep_puts=False)
        torch.set_num_threads(1)  # the bare loops and the consumer: one thread, as in bench_input_path
        for e in range(1, args.epochs + 1):
            row = {"epoch": e,
                   "bare_process": in_this_process(bare_process, cfg, e),
                   "bare_task": in_this_process(bare_task, cfg, e),
                   "task_in_ray": in_ray_task(cfg, e, keep_puts=False),
                   "task_in_ray_put": in_ray_task(cfg, e, keep_puts=True),
                   "pipeline_no_consumer": pipeline_no_consumer(cfg, e, tracker),
                   "pipeline": pipeline(cfg, e, tracker),
                   "pipeline_no_shuffle": pipeline_no_shuffle(cfg, e, tracker)}
            results["epochs"].append(row)
            print(f"epoch {e}: " + "; ".join(f"{p} {row[p]['us_per_chip']}" for p in parts), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if tmp is not None:
            tmp.cleanup()

    med = statistics.median
    rows = results["epochs"]

    def us_row(row: dict[str, Any], part: str, kind: str | None = None, but: tuple[str, ...] = ()) -> float:
        return sum(v for k, v in row[part]["us_per_chip"].items() if (kind is None or k == kind) and k not in but)

    def us(part: str, kind: str | None = None) -> float:
        return med(us_row(r, part, kind) for r in rows)

    def diff(a: tuple, b: tuple) -> float:
        """Median over epochs of (part a) - (part b), each ``(part, kind or None)``."""
        return med(us_row(r, *a) - us_row(r, *b) for r in rows)

    totals = {p: round(us(p), 1) for p in parts}
    breakdown = {
        "bare _process_batch (the baseline)": us("bare_process"),
        "read + validate": diff(("bare_task",), ("bare_process",)),
        "a Ray worker process's own share (task_in_ray - bare_task)": diff(("task_in_ray",), ("bare_task",)),
        "the object store's put (task_in_ray_put - task_in_ray)": diff(("task_in_ray_put",), ("task_in_ray",)),
        "Ray Data in its workers (pipeline_no_consumer workers - task_in_ray_put)":
            diff(("pipeline_no_consumer", "ray-worker"), ("task_in_ray_put",)),
        "the executor and dataset build (driver, no consumer)": us("pipeline_no_consumer", "driver"),
        "the consumer: shuffle buffer, batches, collation (driver)":
            diff(("pipeline", "driver"), ("pipeline_no_consumer", "driver")),
        "  of which the shuffle buffer against Ray's plain batching (pipeline - pipeline_no_shuffle, driver)":
            diff(("pipeline", "driver"), ("pipeline_no_shuffle", "driver")),
        "Ray's daemons (raylet, GCS, monitors) in the pipeline":
            med(us_row(r, "pipeline", None, but=("ray-worker", "driver")) for r in rows),
    }
    summary = {"us_per_chip_medians": totals,
               "breakdown_us_per_chip": {k: round(v, 1) for k, v in breakdown.items()},
               "faults_per_chip_medians": {p: {k: med(r[p]["faults_per_chip"].get(k, 0) for r in rows)
                                               for k in rows[0][p]["faults_per_chip"]} for p in parts},
               "ratio_pipeline_vs_bare_process": round(us("bare_process") / us("pipeline"), 3)}
    results["summary"] = summary
    results["machine"]["load_avg_end"] = load()
    print(f"\nmedians of {len(rows)} epochs of {rows[0]['pipeline']['chips']} chips, µs of CPU a chip:")
    for name, v in summary["breakdown_us_per_chip"].items():
        print(f"  {v:7.1f}  {name}")
    print(f"  {us('pipeline'):7.1f}  the whole pipeline (ratio to bare _process_batch: "
          f"{summary['ratio_pipeline_vs_bare_process']})")
    print(f"  minor page faults a chip: {summary['faults_per_chip_medians']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
