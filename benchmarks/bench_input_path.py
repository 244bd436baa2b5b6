"""What Ray Data costs on the input path: the pipeline as training consumes it vs its own batch
functions in a plain loop, on the same shards, in one run.

The figure (issue "An input path that can feed a GPU node"): training mode, device placement
(rows carry the augmented amplitude; ∇x is the device's), 128² chips, the data section of
``jobs/pretrain.yaml`` (img_size 128, batch 128, shuffle buffer 4096) unless overridden.

- bare, ``process``: ``pipeline._process_batch`` over the shards' rows, ``UDF_BATCH_ROWS`` at a
  time, one thread, no Ray (the shards are read and validated before the clock starts). This is
  the baseline the issue defines (its "3,591 chips/s"). It and the bare ``task`` loop run in a
  plain spawned process of the benchmark's pool, where Ray was never imported (``--bare-in
  driver``: in this process, also Ray's driver, as before session 30).
- bare, ``task``: what one Ray Data task does, in a plain loop: ``_read_one_shard`` (Parquet read
  + validation, no tracker) then ``_process_in_pieces``, shard after shard, one thread.
- bare, ``task`` in ``cores`` processes: the same loop in that many plain processes at once (no
  Ray; shards dealt round-robin): what the machine's cores give together when nothing but the work
  runs, i.e. how far the cores themselves scale.
- ray: ``build_dataset`` on a local ``ray.init(num_cpus=N)``, consumed by
  ``train.batches.iter_train_batches`` (the train loop's iterator: Ray's blocks through the seeded
  shuffle buffer of ``data/shuffle.py``, ``drop_last``, then the loop's numpy → torch collation) on
  the driver, as rank 0 of a one-worker run does. The epoch's dataset is built inside the timing.
  ``--consumer-cpus`` (default 1) logical CPUs are held for the whole session by an idle actor, as
  a Ray Train worker holds its ``train.cpus_per_worker``: in a training run Ray Data's tasks get
  the cluster's CPUs less the trainer's, so on 2 cores one task runs at a time beside the consumer.
  ``--consumer-cpus 0`` is the design before session 32: two tasks at once on the 2 cores while
  the consumer runs too (three busy processes on two cores, which a training run never schedules).

What "per core" means (2-core machine; the consumer and Ray's daemons share those cores):

- ``per CPU-second`` (the headline; its keys say ``steady``, ``ratio_steady_vs_*``, from before the
  marginal figure below existed, and are kept so that older result files compare): chips / CPU seconds that our whole process
  tree used during the round (the driver — build_dataset, Ray Data's executor, the consumer's
  shuffle buffer and collation — plus every Ray worker, raylet, GCS, ..., read from /proc),
  start-up included. A core busy with the pipeline delivers this many chips per second, whatever
  else the machine runs. The bare loops' figure is the same thing for one thread (their CPU time
  is their wall time on a quiet core).
- ``overall per core`` (wall clock): chips / (seconds from ``build_dataset`` to the last batch)
  / ``cores``, ``cores = min(num_cpus, os.cpu_count())``: the CPUs Ray may schedule tasks on. It
  includes start-up and any time the cores were taken by other work on the machine (the load
  average is stored with each round).
- ``after first batch``: chips / seconds between the first and the last batch, as earlier
  benchmarks reported "steady". Not a production rate: Ray Data keeps producing into the object
  store while the shuffle buffer fills, so most of an epoch can be ready by the first batch.

- ``marginal`` (``--steady-chips``, on by default; keys ``ray_marginal_*``, ``ratio_marginal_*``): each round also runs the Ray side over a second,
  larger archive (36,000 chips); the extra chips over the extra CPU seconds (and wall seconds) of
  that epoch against the ``--chips`` one is Ray's rate with an epoch's fixed costs (building the
  dataset, starting the executor, filling the shuffle buffer, draining the last batches) taken out:
  what a long epoch of a large archive runs at. The bare loops have no such fixed costs. The
  warm-up before the rounds reads both archives once, so that neither is read cold from disk
  (the bare loops' archive always was: they read it before the clock).

Rounds are interleaved (bare, ray, bare, ray, ...); medians are reported, and the ratios are
``Ray / bare`` of the medians from the same run (goal: >= 0.5 against bare ``_process_batch``).

Usage::

    flock /tmp/sarjepa-cpu.lock python benchmarks/bench_input_path.py            # 12,000 chips, 3 rounds
    python benchmarks/bench_input_path.py --chips 3000 --rounds 1 --out /tmp/x.json  # quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
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

from bench_pipeline import load, quiet_ray_data, write_archive  # noqa: E402

from sarjepa_dist.config import load_config  # noqa: E402
from sarjepa_dist.data import shards  # noqa: E402


# --------------------------------------------------------------------------- CPU time of our tree


def _tree_cpu() -> dict[int, tuple[str, float]]:
    """pid → (kind, utime + stime in s) for this process and every live descendant (Ray daemons and
    workers). ``kind``: driver, ray-worker (``ray::…`` titles and default_worker.py), raylet,
    gcs_server, or the process's short name."""
    tick = os.sysconf("SC_CLK_TCK")
    stat: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stat[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stat.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, tuple[str, float]] = {}
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if pid not in stat:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = ""
        exe = cmd.split(" ")[0].rsplit("/", 1)[-1]
        if pid == os.getpid():
            kind = "driver"
        elif exe in ("raylet", "gcs_server"):  # before the worker test: raylet's args name default_worker.py
            kind = exe
        elif cmd.startswith("ray::") or any(w.endswith("default_worker.py") for w in cmd.split(" ")[1:3]):
            kind = "ray-worker"
        else:
            kind = next((w.rsplit("/", 1)[-1] for w in cmd.split(" ")[1:3] if w.endswith(".py")), exe or "?")
        out[pid] = (kind, stat[pid][1])
    return out


def _new_processes(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, Any]:
    """Processes started between two ``_tree_cpu`` readings: how many of each kind, and their CPU s
    (a new worker's start, imports included, is charged to the epoch that started it)."""
    new = [(kind, cpu) for pid, (kind, cpu) in after.items() if pid not in before]
    return {"count": dict(sorted({k: sum(1 for kk, _ in new if kk == k) for k, _ in new}.items())),
            "cpu_s": round(sum(cpu for _, cpu in new), 2)}


def _cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per process kind between two ``_tree_cpu`` readings (new processes count whole)."""
    by_kind: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        d = cpu - before.get(pid, (kind, 0.0))[1]
        by_kind[kind] = round(by_kind.get(kind, 0.0) + d, 2)
    return dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------- the two sides


def make_spec(cfg, grad, epoch: int):
    from sarjepa_dist.data.pipeline import _Spec

    manifest = shards.read_manifest(cfg.data.path)
    return _Spec(data_cfg=cfg.data, gradient_cfg=grad, need=("x", "gx"), training=True, epoch=epoch,
                 expected_shape=tuple(int(s) for s in manifest.chip_shape), shard_prefix="")


def shard_paths(root: str) -> list[tuple[str, int]]:
    manifest = shards.read_manifest(root)
    return [(str(Path(root) / s.path), s.rows) for s in manifest.shards]


def bare_task(cfg, grad, epoch: int) -> dict[str, Any]:
    """Read + validate + process, shard after shard, one thread: one Ray Data task's work."""
    import pyarrow.fs as pafs

    from sarjepa_dist.data.pipeline import _process_in_pieces, _read_one_shard

    spec = make_spec(cfg, grad, epoch)
    fs = pafs.LocalFileSystem()
    chips = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for path, rows in shard_paths(cfg.data.path):
        for block in _read_one_shard(path, rows, spec=spec, filesystem=fs, tracker=None):
            for out in _process_in_pieces(block, spec=spec):
                chips += len(out["label"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"chips": chips, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "chips_per_s": round(chips / wall, 1),
            "chips_per_cpu_s": round(chips / cpu, 1) if cpu > 0 else None}


def bare_process(cfg, grad, epoch: int) -> dict[str, Any]:
    """``_process_batch`` alone over the shards' validated rows (read outside the clock), one thread."""
    import pyarrow.fs as pafs

    from sarjepa_dist.data.pipeline import _process_in_pieces, _read_one_shard

    spec = make_spec(cfg, grad, epoch)
    fs = pafs.LocalFileSystem()
    blocks = [b for path, rows in shard_paths(cfg.data.path)
              for b in _read_one_shard(path, rows, spec=spec, filesystem=fs, tracker=None)]
    chips = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for block in blocks:
        for out in _process_in_pieces(block, spec=spec):
            chips += len(out["label"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"chips": chips, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "chips_per_s": round(chips / wall, 1),
            "chips_per_cpu_s": round(chips / cpu, 1) if cpu > 0 else None}


def _bare_task_part(args: tuple[str, str, list[str], int, int, int]) -> tuple[int, float]:
    """Worker of ``bare_parallel``: the bare task loop over every ``step``-th shard from ``part``."""
    root_path, config, overrides, epoch, part, step = args
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, root_path)
    from sarjepa_dist.config import load_config as _load

    cfg = _load(config, overrides=overrides)
    import pyarrow.fs as pafs

    from sarjepa_dist.data.pipeline import _process_in_pieces, _read_one_shard

    spec = make_spec(cfg, cfg.gradient, epoch)
    fs = pafs.LocalFileSystem()
    chips, c0 = 0, time.process_time()
    for path, rows in shard_paths(cfg.data.path)[part::step]:
        for block in _read_one_shard(path, rows, spec=spec, filesystem=fs, tracker=None):
            for out in _process_in_pieces(block, spec=spec):
                chips += len(out["label"])
    return chips, time.process_time() - c0


def _bare_loops_in_child(args: tuple[str, str, list[str], int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Worker of ``--bare-in pool``: ``bare_process`` then ``bare_task`` in a plain process without Ray."""
    root_path, config, overrides, epoch = args
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, root_path)
    from sarjepa_dist.config import load_config as _load

    cfg = _load(config, overrides=overrides)
    process, task = bare_process(cfg, cfg.gradient, epoch), bare_task(cfg, cfg.gradient, epoch)
    for out in (process, task):
        out["in"] = "pool process" + (" (ray imported)" if "ray" in sys.modules else " (ray never imported)")
    return process, task


def bare_parallel(pool: Any, config: str, overrides: list[str], epoch: int, cores: int) -> dict[str, Any]:
    """The bare task loop in ``cores`` plain processes at once (no Ray), shards dealt round-robin:
    what the machine's cores give together, the best a pipeline on them could do."""
    t0 = time.perf_counter()
    parts = pool.map(_bare_task_part, [(str(ROOT), config, overrides, epoch, i, cores) for i in range(cores)])
    wall = time.perf_counter() - t0
    chips, cpu = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {"chips": chips, "processes": cores, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "chips_per_s": round(chips / wall, 1), "chips_per_s_per_core": round(chips / wall / cores, 1),
            "chips_per_cpu_s": round(chips / cpu, 1) if cpu > 0 else None}


def ray_round(cfg, grad, epoch: int, cores: int, tracker: Any, data_path: str | None = None) -> dict[str, Any]:
    """One epoch through ``iter_train_batches`` on the driver, as a one-worker training run consumes it.

    ``tracker``: the bad-row tally every round reports to, made once for the whole benchmark as a
    training run makes one for all its epochs (a fresh one per round would charge each epoch the
    start of its actor's process, ~0.4 CPU-s here, which a run pays once)."""
    from sarjepa_dist.data.pipeline import build_dataset
    from sarjepa_dist.train.batches import iter_train_batches

    quiet_ray_data()
    data = cfg.data if data_path is None else dataclasses.replace(cfg.data, path=data_path)
    load0 = load()
    cpu0 = _tree_cpu()
    t0 = time.perf_counter()
    seen0 = tracker.total_seen()
    ds = build_dataset(data, grad, need=("x", "gx"), training=True, epoch=epoch, tracker=tracker)
    it = iter_train_batches(ds.iterator(), data, epoch=epoch, device="cpu", drop_last=True, shuffle=True)
    arrivals: list[tuple[float, int]] = []  # (time, chips so far) after each batch
    chips = 0
    for batch in it:
        chips += int(batch["amplitude"].shape[0])
        arrivals.append((time.perf_counter(), chips))
    total = time.perf_counter() - t0
    cpu1 = _tree_cpu()
    cpu_by_kind = _cpu_delta(cpu0, cpu1)
    cpu = sum(cpu_by_kind.values())
    seen, bad = tracker.total_seen() - seen0, tracker.counts()
    (ta, ca), (tb, cb) = arrivals[0], arrivals[-1]
    after_first = (cb - ca) / (tb - ta) if tb > ta else None
    out = {"chips": chips, "batches": len(arrivals), "wall_s": round(total, 3),
           "first_batch_s": round(arrivals[0][0] - t0, 3),
           "chips_per_s": round(chips / total, 1),
           "chips_per_s_per_core": round(chips / total / cores, 1),
           "after_first_batch_chips_per_s": round(after_first, 1) if after_first else None,
           "tree_cpu_s": round(cpu, 2), "tree_cpu_s_by_process": cpu_by_kind,
           "new_processes": _new_processes(cpu0, cpu1),
           "chips_per_cpu_s": round(chips / cpu, 1) if cpu > 0 else None,
           "load_avg_start": load0, "load_avg_end": load()}
    out["tracker_rows_seen"], out["tracker_bad_rows"] = seen, bad
    return out


class _ConsumerCpus:
    """Idle; exists to hold logical CPUs for the consumer, as a Ray Train worker holds its own."""

    def ready(self) -> bool:
        return True


def hold_consumer_cpus(cpus: float) -> Any:
    """An actor holding ``cpus`` logical CPUs for the session (None for 0), so that Ray Data's
    tasks get the rest, as in a training run where the trainer holds ``train.cpus_per_worker``."""
    import ray

    if cpus <= 0:
        return None
    holder = ray.remote(num_cpus=cpus)(_ConsumerCpus).remote()
    ray.get(holder.ready.remote())
    return holder


def marginal(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """The steady rate: what the larger epoch's extra chips cost over the smaller one's, so that the
    fixed costs of an epoch (building the dataset, starting the executor, filling the shuffle
    buffer, the last batches' drain) cancel out."""
    chips = large["chips"] - small["chips"]
    cpu = large["tree_cpu_s"] - small["tree_cpu_s"]
    wall = large["wall_s"] - small["wall_s"]
    return {"chips": chips, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "chips_per_cpu_s": round(chips / cpu, 1) if cpu > 0 else None,
            "chips_per_s": round(chips / wall, 1) if wall > 0 else None}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chips", type=int, default=12000)
    ap.add_argument("--size", type=int, default=128, help="chip side in the shards")
    ap.add_argument("--config", default=str(ROOT / "jobs" / "pretrain.yaml"), help="its data section is used")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. data.batch_size=64")
    ap.add_argument("--data", default=None, help="a shard dataset to reuse (written there when missing)")
    ap.add_argument("--shard-mib", type=float, default=8.0)
    ap.add_argument("--chip-codec", default="auto", choices=["auto", "zstd", "lz4", "none"],
                    help="Parquet codec of the chip column when the shards are written here (auto: the "
                         "writer's own choice, shards.chip_compression; zstd, lz4: what it wrote before)")
    ap.add_argument("--steady-chips", type=int, default=36000,
                    help="also run the Ray side on an archive of this many chips each round: the steady rate is "
                         "the extra chips over the extra CPU seconds (0: off)")
    ap.add_argument("--bare-in", choices=["pool", "driver"], default="pool",
                    help="where the one-thread bare loops run: pool = a plain process of the benchmark's pool, "
                         "without Ray (default); driver = this process, which is also Ray's driver (the design "
                         "before session 30: there the read + process loop ran 3-8%% slower than in a plain Ray task)")
    ap.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--consumer-cpus", type=float, default=1.0,
                    help="logical CPUs held for the consumer, as a Train worker holds train.cpus_per_worker "
                         "(Ray Data's tasks get the rest; 0: none held, the design before session 32)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each side")
    ap.add_argument("--sides", nargs="+", default=["bare", "ray"], choices=["bare", "ray"],
                    help="what to run (both for the ratio; one side alone for profiling)")
    ap.add_argument("--label", default="", help="a note stored with the result (e.g. the commit)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "input_path.json"))
    args = ap.parse_args(argv)

    import ray
    import torch

    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.mkdtemp(prefix="bench-input-")
        data = str(Path(tmp) / "shards")
    cfg = load_config(args.config, overrides=[*args.overrides, f"data.path={data}", "data.transform_placement=device"])
    grad = cfg.gradient
    cores = min(args.num_cpus, os.cpu_count() or 1)
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__, "torch": torch.__version__, "load_avg_start": load()},
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "commit": commit, "label": args.label,
        "params": vars(args) | {"data": data, "cores": cores, "img_size": cfg.data.img_size,
                                "batch_size": cfg.data.batch_size, "shuffle_buffer": cfg.data.shuffle_buffer,
                                "augment": vars(cfg.data.augment)},
        "rounds": [],
    }
    try:
        if args.chip_codec != "auto":  # an A/B of the codec: the writer's policy replaced for this run
            shards.chip_compression = lambda dtype, sample=None: args.chip_codec
        if not Path(data, shards.MANIFEST_NAME).exists():
            gen_s = write_archive(data, args.chips, args.size, seed=args.size, shard_mib=args.shard_mib)
            print(f"wrote {args.chips} chips of {args.size}² in {gen_s:.1f}s to {data}", flush=True)
        steady_data = None
        if args.steady_chips:
            if args.steady_chips <= args.chips:
                raise SystemExit("--steady-chips must exceed --chips (or be 0)")
            steady_data = str(Path(data).parent / f"{Path(data).name}-steady{args.steady_chips}")
            if not Path(steady_data, shards.MANIFEST_NAME).exists():
                gen_s = write_archive(steady_data, args.steady_chips, args.size, seed=args.size + 1,
                                      shard_mib=args.shard_mib)
                print(f"wrote {args.steady_chips} chips of {args.size}² in {gen_s:.1f}s to {steady_data}", flush=True)
        manifest = shards.read_manifest(data)
        results["params"]["shards"] = len(manifest.shards)
        results["params"]["chips_in_archive"] = sum(s.rows for s in manifest.shards)

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
        consumer_cpus = hold_consumer_cpus(args.consumer_cpus)  # noqa: F841  (held while it lives)
        threads = torch.get_num_threads()
        import multiprocessing

        overrides = [*args.overrides, f"data.path={data}", "data.transform_placement=device"]
        pool = multiprocessing.get_context("spawn").Pool(cores) if "bare" in args.sides else None
        if pool is not None:  # start the processes and import torch there, outside any timing
            bare_parallel(pool, args.config, overrides, 1000, cores)
        # warm-up outside the timing: Ray Data workers started, torch imported in them
        from sarjepa_dist.data.badrows import BadRowTracker

        tracker = BadRowTracker(f"bench-input-{uuid.uuid4().hex[:8]}")  # the run's tally, as in training
        ray_round(cfg, grad, epoch=1000, cores=cores, tracker=tracker)
        if steady_data is not None:  # its files into the page cache too, as the bare loops' archive is
            ray_round(cfg, grad, epoch=1000, cores=cores, tracker=tracker, data_path=steady_data)
        torch.set_num_threads(1)
        if args.bare_in == "driver":
            bare_process(cfg, grad, epoch=1000)
        elif pool is not None:
            pool.apply(_bare_loops_in_child, ((str(ROOT), args.config, overrides, 1000),))
        for r in range(args.rounds):
            epoch = r + 1
            row: dict[str, Any] = {"epoch": epoch}
            if "bare" in args.sides:
                if args.bare_in == "driver":
                    torch.set_num_threads(1)  # the bare loops: one thread
                    row["bare_process"] = bare_process(cfg, grad, epoch)
                    row["bare_task"] = bare_task(cfg, grad, epoch)
                else:  # one thread, in a plain process of the pool (no Ray there)
                    row["bare_process"], row["bare_task"] = pool.apply(
                        _bare_loops_in_child, ((str(ROOT), args.config, overrides, epoch),))
                torch.set_num_threads(threads)  # the consumer as the driver would run it
                row["bare_parallel"] = bare_parallel(pool, args.config, overrides, epoch, cores)
                print(f"round {r + 1}: bare _process_batch {row['bare_process']['chips_per_s']:8.1f} chips/s | "
                      f"bare task {row['bare_task']['chips_per_s']:8.1f} | bare task in {cores} processes "
                      f"{row['bare_parallel']['chips_per_s']:8.1f} ({row['bare_parallel']['chips_per_cpu_s']} per CPU-s)",
                      flush=True)
            if "ray" in args.sides:
                ry = row["ray"] = ray_round(cfg, grad, epoch, cores, tracker)
                print(f"round {r + 1}: ray {ry['chips_per_s']:8.1f} chips/s overall ({ry['chips_per_s_per_core']}/core), "
                      f"{ry['chips_per_cpu_s']} per CPU-s; first batch "
                      f"{ry['first_batch_s']}s; load {ry['load_avg_start']}); CPU s by process "
                      f"{ry['tree_cpu_s_by_process']}; new processes {ry['new_processes']}", flush=True)
                if steady_data is not None:
                    big = row["ray_steady_archive"] = ray_round(cfg, grad, epoch, cores, tracker, data_path=steady_data)
                    m = row["ray_marginal"] = marginal(ry, big)
                    print(f"round {r + 1}: ray over {big['chips']} chips: {big['chips_per_cpu_s']} per CPU-s; "
                          f"the extra {m['chips']} chips: {m['chips_per_cpu_s']} per CPU-s, "
                          f"{m['chips_per_s']} chips/s; CPU s by process {big['tree_cpu_s_by_process']}", flush=True)
            results["rounds"].append(row)
    finally:
        if "pool" in locals() and pool is not None:
            pool.terminate()
        if ray.is_initialized():
            ray.shutdown()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    rs = results["rounds"]
    if set(args.sides) != {"bare", "ray"}:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"one side only: no ratio; saved {args.out}")
        return 0
    summary: dict[str, Any] = {"cores": cores}
    for base in ("bare_process", "bare_task"):
        summary[f"{base}_chips_per_s"] = med(x[base]["chips_per_s"] for x in rs)
        summary[f"{base}_chips_per_cpu_s"] = med(x[base]["chips_per_cpu_s"] for x in rs)
    for key in ("chips_per_s", "chips_per_s_per_core", "chips_per_cpu_s"):
        summary[f"bare_parallel_{key}"] = med(x["bare_parallel"][key] for x in rs)
    for key in ("chips_per_s", "chips_per_s_per_core", "chips_per_cpu_s", "after_first_batch_chips_per_s",
                "first_batch_s", "tree_cpu_s"):
        summary[f"ray_{key}"] = med(x["ray"][key] for x in rs)
    kinds = sorted({k for x in rs for k in x["ray"]["tree_cpu_s_by_process"]})
    summary["ray_cpu_s_by_process"] = {k: med(x["ray"]["tree_cpu_s_by_process"].get(k, 0.0) for x in rs)
                                       for k in kinds}
    for base in ("bare_process", "bare_task"):
        summary[f"ratio_steady_vs_{base}"] = round(summary["ray_chips_per_cpu_s"] / summary[f"{base}_chips_per_cpu_s"], 3)
        summary[f"ratio_overall_vs_{base}"] = round(summary["ray_chips_per_s_per_core"] / summary[f"{base}_chips_per_s"], 3)
    summary["ratio_steady_vs_bare_parallel"] = round(summary["ray_chips_per_cpu_s"] / summary["bare_parallel_chips_per_cpu_s"], 3)
    summary["ratio_overall_vs_bare_parallel"] = round(summary["ray_chips_per_s"] / summary["bare_parallel_chips_per_s"], 3)
    if all("ray_marginal" in x for x in rs):
        summary["ray_marginal_chips_per_cpu_s"] = med(x["ray_marginal"]["chips_per_cpu_s"] for x in rs)
        summary["ray_marginal_chips_per_s"] = med(x["ray_marginal"]["chips_per_s"] for x in rs)
        summary["ray_steady_archive_chips_per_cpu_s"] = med(x["ray_steady_archive"]["chips_per_cpu_s"] for x in rs)
        summary["ratio_marginal_vs_bare_process"] = round(
            summary["ray_marginal_chips_per_cpu_s"] / summary["bare_process_chips_per_cpu_s"], 3)
        summary["ratio_marginal_vs_bare_parallel"] = round(
            summary["ray_marginal_chips_per_cpu_s"] / summary["bare_parallel_chips_per_cpu_s"], 3)
        summary["ratio_marginal_wall_per_core_vs_bare_process"] = round(
            summary["ray_marginal_chips_per_s"] / cores / summary["bare_process_chips_per_s"], 3)
    summary["goal"] = "ratio_steady_vs_bare_process >= 0.5 (Ray chips per CPU-second / bare _process_batch's)"
    summary["goal_met"] = summary["ratio_steady_vs_bare_process"] >= 0.5
    results["summary"] = summary
    results["machine"]["load_avg_end"] = load()

    s = summary
    print(f"\nmedians of {len(rs)} interleaved rounds; {results['params']['chips_in_archive']} chips of "
          f"{args.size}² → {cfg.data.img_size}², batch {cfg.data.batch_size}, shuffle buffer "
          f"{cfg.data.shuffle_buffer}, Ray num_cpus={args.num_cpus} ({args.consumer_cpus:g} held for the consumer), cores = {cores}; load "
          f"{results['machine']['load_avg_start']} → {results['machine']['load_avg_end']}")
    print(f"  baseline  bare _process_batch, 1 thread : {s['bare_process_chips_per_s']:8.1f} chips/s, "
          f"{s['bare_process_chips_per_cpu_s']:8.1f} per CPU-s")
    print(f"  baseline  bare read+validate+process    : {s['bare_task_chips_per_s']:8.1f} chips/s, "
          f"{s['bare_task_chips_per_cpu_s']:8.1f} per CPU-s")
    print(f"  baseline  the same in {cores} processes at once: {s['bare_parallel_chips_per_s']:8.1f} chips/s "
          f"({s['bare_parallel_chips_per_s_per_core']:.1f} per core), {s['bare_parallel_chips_per_cpu_s']:8.1f} per CPU-s")
    print(f"  project   Ray Data → iter_train_batches : {s['ray_chips_per_s']:8.1f} chips/s overall "
          f"({s['ray_chips_per_s_per_core']:.1f} per core), {s['ray_chips_per_cpu_s']:8.1f} per CPU-s; "
          f"first batch {s['ray_first_batch_s']} s; {s['ray_after_first_batch_chips_per_s']} chips/s after it")
    print(f"            CPU s by process              : {s['ray_cpu_s_by_process']}")
    print(f"  ratio per CPU-s (whole epoch) vs bare _process_batch: {s['ratio_steady_vs_bare_process']:.3f} "
          f"(goal >= 0.5: {'met' if s['goal_met'] else 'NOT met'}); vs bare read+validate+process "
          f"{s['ratio_steady_vs_bare_task']:.3f}")
    print(f"  ratio overall (wall, per core)  vs bare _process_batch: {s['ratio_overall_vs_bare_process']:.3f}; "
          f"vs bare read+validate+process {s['ratio_overall_vs_bare_task']:.3f}")
    print(f"  Ray vs the bare task in {cores} processes: {s['ratio_steady_vs_bare_parallel']:.3f} per CPU-s, "
          f"{s['ratio_overall_vs_bare_parallel']:.3f} wall")
    if "ray_marginal_chips_per_cpu_s" in s:
        print(f"  marginal (fixed costs out: the {args.steady_chips}-chip epoch less the {args.chips}-chip one): Ray "
              f"{s['ray_marginal_chips_per_cpu_s']:8.1f} per CPU-s, {s['ray_marginal_chips_per_s']:8.1f} chips/s; "
              f"ratio vs bare _process_batch {s['ratio_marginal_vs_bare_process']:.3f} per CPU-s, "
              f"{s['ratio_marginal_wall_per_core_vs_bare_process']:.3f} wall per core; vs the bare task in "
              f"{cores} processes {s['ratio_marginal_vs_bare_parallel']:.3f} per CPU-s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
