"""Ray's overhead on a whole pretraining run: ``sarjepa pretrain`` against a bare loop of the same
train step, side by side in one run (goal: >= 0.95x the bare loop's chips/s).

    python benchmarks/bench_ray_overhead.py [--steps 150] [--chips 960] [--rounds 3] [--threads 1]
                                           [--out results/ray_overhead.json]

Both sides train the default step config (ViT-tiny/12, 64 px, patch 8, predictor 6x96, batch 32,
``ema-gradient``, ∇x on the device) for ``--steps`` steps over a dataset of ``--chips`` synthetic
chips, so a run crosses several epochs (``--chips`` / 32 steps each) and pays every epoch's
pipeline start. The train step runs on ``--threads`` torch threads on both sides.

- **Ray** (``run_pretrain``, one worker, ``train.cpus_per_worker`` = threads, on a local cluster of
  the machine's cores): Ray Data streams the chips from local shards (read, validate, augment,
  condition) while the worker trains. Its whole-run figure is chips / the loop's wall time from the
  first batch request to the last step (every report's interval added up: epoch starts, data
  waits, reports and checkpoints included; Ray's cluster and worker start-up excluded, given
  separately as ``fit_wall_s``).
- **bare**: the same model, optimiser, schedules, masks and ``engine.train_step`` in a plain loop
  in this process, over batches the pipeline's own functions (``_read_one_shard`` +
  ``_process_in_pieces``, epoch by epoch) prepared before the clock starts: the step alone, what
  a perfect input path would leave.
- **DataLoader-fed**: the same plain loop fed by a torch ``DataLoader`` whose one worker process
  streams the same functions from the shards while the loop trains (per-epoch file order, a local
  shuffle pool of ``data.shuffle_buffer`` rows, as Ray Data's path does; the clock starts at the
  first batch request, as on the Ray side): what any input path running beside the step costs on
  these cores, so that Ray's own share is the Ray side over this one.

Every side trains in a fresh process, as a run does: Ray's in its new Train worker, the bare and the
DataLoader-fed loops each in a new Python process started for the round (``--bare-process same``
runs them in this benchmark's process instead, the earlier design: from the second round on,
its step had already run hundreds of times there, while Ray's worker always starts cold, so the
first steps' slower kernels and allocations were charged to Ray alone). Process start-up and
imports are outside the clock on every side.

Rounds alternate the sides (bare, DataLoader-fed, Ray, bare, ...); the ratio is Ray's whole-run chips/s over
the bare loop's, per round and of the medians. To say where Ray's share goes, the Ray side is also
given after its first interval (the run's very first pipeline start left out; later epochs start
during the epoch before, ``train/batches.EpochStream``) and computing only (its waits left out:
what the pipeline's processes and Ray's own, on the other cores, cost the step itself). Results go to ``benchmarks/results/ray_overhead.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch.utils.data as tud

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

RESULTS = Path(__file__).resolve().parent / "results" / "ray_overhead.json"
GOAL = 0.95


def make_config(data: str, runs: str, name: str, args: argparse.Namespace) -> Any:
    from sarjepa_dist.config import config_from_dict

    return config_from_dict({
        "ray": {"num_cpus": os.cpu_count()},
        # defaults: 64 px, batch 32, device placement
        "data": {"path": data, **({} if args.shuffle_buffer is None else {"shuffle_buffer": args.shuffle_buffer})},
        "train": {"name": name, "storage_path": runs, "steps": args.steps, "log_every": args.log_every,
                  "checkpoint_every": args.steps, "num_workers": 1, "cpus_per_worker": args.threads},
    })


def _epoch_parts(cfg: Any, epoch: int) -> Iterator[dict[str, Any]]:
    """One epoch's processed rows, shard by shard in the epoch's file order, from the pipeline's
    own functions (``_read_one_shard`` + ``_process_in_pieces``)."""
    import numpy as np
    import pyarrow.fs as pafs

    from sarjepa_dist.data import shards
    from sarjepa_dist.data.pipeline import _process_in_pieces, _read_one_shard, _Spec, file_shuffle_seed
    from sarjepa_dist.model.jepa import required_inputs

    manifest = shards.read_manifest(cfg.data.path)
    fs = pafs.LocalFileSystem()
    spec = _Spec(data_cfg=cfg.data, gradient_cfg=cfg.gradient, need=required_inputs(cfg.model), training=True,
                 epoch=epoch, expected_shape=tuple(int(s) for s in manifest.chip_shape), shard_prefix="")
    order = np.random.default_rng(file_shuffle_seed(cfg.data.seed, epoch)).permutation(len(manifest.shards))
    for i in order:
        s = manifest.shards[i]
        for block in _read_one_shard(str(Path(cfg.data.path) / s.path), s.rows, spec=spec, filesystem=fs,
                                     tracker=None):
            yield from _process_in_pieces(block, spec=spec)


def _take(rows: dict[str, Any], idx: Any) -> dict[str, Any]:
    return {k: v[idx] for k, v in rows.items()}


def stream_batches(cfg: Any, steps: int) -> Iterator[dict[str, Any]]:
    """``steps`` batches of numpy rows, epoch after epoch, streamed as Ray Data's path does: shards
    processed one at a time into a local shuffle pool of ``data.shuffle_buffer`` rows, batches
    drawn from it, the epoch's last partial batch dropped."""
    import numpy as np

    bs, buffer = cfg.data.batch_size, cfg.data.shuffle_buffer
    made, epoch = 0, 0
    while made < steps:
        rng = np.random.default_rng(epoch)
        pool: dict[str, Any] | None = None
        for part in _epoch_parts(cfg, epoch):
            pool = part if pool is None else {k: np.concatenate([pool[k], part[k]]) for k in pool}
            n = len(pool["label"])
            while n >= buffer + bs and made < steps:
                pick = rng.choice(n, bs, replace=False)
                yield _take(pool, pick)
                made += 1
                keep = np.ones(n, dtype=bool)
                keep[pick] = False
                pool, n = _take(pool, keep), n - bs
        if pool is not None:
            rest = rng.permutation(len(pool["label"]))
            for i in range(0, len(rest) - bs + 1, bs):
                if made >= steps:
                    break
                yield _take(pool, rest[i:i + bs])
                made += 1
        epoch += 1


def bare_batches(cfg: Any, steps: int) -> list[dict[str, Any]]:
    """``steps`` batches as tensors, made before the clock starts (the bare side)."""
    from sarjepa_dist.train.batches import _to_torch

    return [_to_torch(b, "cpu") for b in stream_batches(cfg, steps)]


class _LoaderStream(tud.IterableDataset):
    """``stream_batches`` as a torch IterableDataset (one DataLoader worker runs it)."""

    def __init__(self, cfg: Any, steps: int):
        self.cfg, self.steps = cfg, steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return stream_batches(self.cfg, self.steps)


def _as_is(batch: Any) -> Any:
    return batch


def run_bare(cfg: Any, batches: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The same step in a plain loop: over ``batches`` made before the clock, or (None) fed by a
    torch DataLoader whose one worker process streams them from the shards while the loop trains
    (the clock then starts at the first batch request, as on the Ray side)."""
    import torch

    from sarjepa_dist.engine import build_method, make_inputs_on_device, train_step
    from sarjepa_dist.masks import mask_generator
    from sarjepa_dist.model.jepa import required_inputs
    from sarjepa_dist.optim import Schedules, build_optimizer
    from sarjepa_dist.train.batches import _to_torch

    steps = cfg.train.steps
    torch.manual_seed(cfg.train.seed)
    model, sampler = build_method(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    schedules = Schedules(cfg.optim, steps, lr_scale=cfg.optim.scale_for(cfg.data.batch_size))
    need = required_inputs(cfg.model)
    model.train()
    if batches is None:
        stream = _LoaderStream(cfg, steps)
        loader = tud.DataLoader(stream, batch_size=None, num_workers=1, collate_fn=_as_is, prefetch_factor=4)
        source: Iterator[dict[str, Any]] = (_to_torch(b, "cpu") for b in loader)
    else:
        source = iter(batches)
    t0 = time.perf_counter()
    wait = 0.0
    loss = None
    done = 0
    for step in range(steps):
        t = time.perf_counter()
        batch = next(source, None)
        wait += time.perf_counter() - t
        if batch is None:
            break
        inputs = make_inputs_on_device(batch, cfg.data, cfg.gradient, need, "cpu")
        masks = sampler.sample(len(batch["chip_id"]), mask_generator(cfg.train.seed, 0, step))
        loss = train_step(model, optimizer, schedules, inputs, masks, step, grad_clip=cfg.optim.grad_clip).loss
        done += 1
    wall = time.perf_counter() - t0
    chips = done * cfg.data.batch_size
    return {"steps": done, "wall_s": round(wall, 2), "chips_per_s": round(chips / wall, 2),
            "data_wait_fraction": round(wait / wall, 4),
            "final_loss": float(loss) if loss is not None else None}


def _side_in_child(cfg_dict: dict[str, Any], fed_by_loader: bool, threads: int, results: Any) -> None:
    """A loop side in a fresh process (the target of a spawned ``multiprocessing.Process``)."""
    import torch

    from sarjepa_dist.config import config_from_dict

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    try:
        batches = None if fed_by_loader else bare_batches(cfg, cfg.train.steps)
        results.put(run_bare(cfg, batches))
    except BaseException as exc:  # reported by the parent, which has no other way to see it
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def run_loop_side(cfg: Any, *, fed_by_loader: bool, threads: int, fresh_process: bool) -> dict[str, Any]:
    """The bare (``fed_by_loader=False``) or DataLoader-fed loop, in a new process or in this one."""
    import multiprocessing as mp

    if not fresh_process:
        return run_bare(cfg, None if fed_by_loader else bare_batches(cfg, cfg.train.steps))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_side_in_child, args=(cfg.to_dict(), fed_by_loader, threads, results),
                        name="bench-loop-side")
    child.start()
    try:
        out = results.get()
    finally:
        child.join()
    if "error" in out:
        raise RuntimeError(f"the {'DataLoader-fed' if fed_by_loader else 'bare'} loop failed in its process: "
                           f"{out['error']}")
    return out


def run_ray(cfg: Any) -> dict[str, Any]:
    from sarjepa_dist.train.runner import run_pretrain

    t0 = time.perf_counter()
    result = run_pretrain(cfg)
    fit_wall = time.perf_counter() - t0
    rows = [r for r in result.metrics_history if "chips_per_s_wall" in r]
    intervals = []
    last_seen = 0
    for r in rows:
        chips = r["chips_seen"] - last_seen
        last_seen = r["chips_seen"]
        step_s = chips / r["chips_per_s"] if r["chips_per_s"] else 0.0
        intervals.append({"step": r["step"], "epoch": r["epoch"], "chips": chips,
                          "wall_s": round(chips / r["chips_per_s_wall"], 3), "step_s": round(step_s, 3),
                          "wait_s": round(r["data_wait_fraction"] * step_s, 3)})

    def totals(part: list[dict[str, Any]]) -> dict[str, Any]:
        chips, wall = sum(i["chips"] for i in part), sum(i["wall_s"] for i in part)
        step_s, wait_s = sum(i["step_s"] for i in part), sum(i["wait_s"] for i in part)
        return {"chips": chips, "wall_s": round(wall, 2), "chips_per_s": round(chips / wall, 2) if wall else None,
                "data_wait_fraction": round(wait_s / step_s, 4) if step_s else None,
                # the train step alone (waits left out): what Ray's neighbours cost the step itself
                "chips_per_s_computing": round(chips / (step_s - wait_s), 2) if step_s > wait_s else None}

    whole = totals(intervals)
    return {"steps": result.final_step, **whole, "loop_wall_s": whole["wall_s"],
            "after_first_interval": totals(intervals[1:]),
            "epochs": (rows[-1]["epoch"] + 1) if rows else 0,
            "fit_wall_s": round(fit_wall, 2), "final_loss": rows[-1]["loss"] if rows else None,
            "intervals": intervals}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--chips", type=int, default=960, help="synthetic 64 px chips (an epoch is chips / 32 steps)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the train step, both sides")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--shuffle-buffer", type=int, default=None, help="data.shuffle_buffer (default: the config's)")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="RAY_worker_niceness for the local cluster (default: Ray's, 15 levels below the driver)")
    p.add_argument("--bare-process", choices=("fresh", "same"), default="fresh",
                   help="where the bare and DataLoader-fed loops run: a new process per round (as Ray's "
                        "worker is), or this benchmark's process (the earlier design)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    import ray
    import torch

    from sarjepa_dist.cluster import ray_session
    from sarjepa_dist.config import RayConfig
    from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset

    torch.set_num_threads(args.threads)
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-overhead-") as tmp:
        data = os.path.join(tmp, "chips")
        manifest = write_synthetic_dataset(data, SynthConfig(num_classes=10, per_class=-(-args.chips // 10), size=64),
                                           target_shard_mib=1.0)
        print(f"{manifest.num_chips} chips in {len(manifest.shards)} shards; "
              f"{manifest.num_chips // 32} steps an epoch", flush=True)
        with ray_session(RayConfig(num_cpus=os.cpu_count())):
            for r in range(args.rounds):
                cfg = make_config(data, os.path.join(tmp, "runs"), f"overhead-{r}", args)
                fresh = args.bare_process == "fresh"
                bare = run_loop_side(cfg, fed_by_loader=False, threads=args.threads, fresh_process=fresh)
                loader = run_loop_side(cfg, fed_by_loader=True, threads=args.threads, fresh_process=fresh)
                on_ray = run_ray(cfg)
                ratio = on_ray["chips_per_s"] / bare["chips_per_s"]
                rounds.append({"bare": bare, "loader": loader, "ray": on_ray, "ratio": round(ratio, 3),
                               "ratio_vs_loader": round(on_ray["chips_per_s"] / loader["chips_per_s"], 3),
                               "loader_ratio": round(loader["chips_per_s"] / bare["chips_per_s"], 3),
                               "load_avg": os.getloadavg()})
                after = on_ray["after_first_interval"]
                print(f"round {r + 1}: bare {bare['chips_per_s']:.1f} chips/s | DataLoader-fed "
                      f"{loader['chips_per_s']:.1f} chips/s (data wait {100 * loader['data_wait_fraction']:.2f}%) | Ray whole run "
                      f"{on_ray['chips_per_s']:.1f} chips/s (data wait {100 * on_ray['data_wait_fraction']:.2f}%, "
                      f"{100 * after['data_wait_fraction']:.2f}% after the first interval; computing "
                      f"{on_ray['chips_per_s_computing']:.1f} chips/s; {on_ray['epochs']} epochs; fit incl. "
                      f"start-up {on_ray['fit_wall_s']:.0f} s) | ratio {ratio:.3f}", flush=True)

    med_bare = statistics.median(r["bare"]["chips_per_s"] for r in rounds)
    med_ray = statistics.median(r["ray"]["chips_per_s"] for r in rounds)
    med_loader = statistics.median(r["loader"]["chips_per_s"] for r in rounds)
    summary = {"bare_chips_per_s_median": round(med_bare, 2), "ray_chips_per_s_median": round(med_ray, 2),
               "ratio_of_medians": round(med_ray / med_bare, 3),
               "ratios": [r["ratio"] for r in rounds],
               # the same step fed by a plain torch DataLoader (one worker process streaming the
               # pipeline's functions): what any concurrent input path costs on these cores
               "loader_chips_per_s_median": round(med_loader, 2),
               "loader_over_bare": round(med_loader / med_bare, 3),
               "ray_over_loader": round(med_ray / med_loader, 3),
               "ratios_vs_loader": [r["ratio_vs_loader"] for r in rounds],
               "ray_data_wait_fraction_median": statistics.median(r["ray"]["data_wait_fraction"] for r in rounds),
               "ray_data_wait_after_first_interval_median": statistics.median(
                   r["ray"]["after_first_interval"]["data_wait_fraction"] for r in rounds),
               # the step alone on Ray (waits left out) over the bare loop's: the neighbours' share
               "ratio_computing_median": statistics.median(
                   r["ray"]["chips_per_s_computing"] / r["bare"]["chips_per_s"] for r in rounds),
               "goal": f"ray / bare >= {GOAL} over a whole run; data wait <= 1% with epoch starts",
               "met": med_ray / med_bare >= GOAL}
    record = {"benchmark": "ray_overhead", "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "ray": ray.__version__},
              "settings": vars(args), "summary": summary, "rounds": rounds}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
