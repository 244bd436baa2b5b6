"""The per-worker training loop that Ray Train runs on every rank (``train_loop_per_worker``).

It is a thin shell around the pure-torch step (``engine.train_step``): it builds the model with
one seed on every rank, restores the latest checkpoint Ray hands it, streams this rank's shard of
the Ray Data pipeline, and reports metrics (every ``log_every`` steps) and checkpoints (every
``checkpoint_every`` steps and at the end).

Rules the loop keeps, and why:

* **Every rank calls ``ray.train.report`` at the same steps.** Train V2 synchronises a report
  across ranks (the checkpoint folder name is broadcast from rank 0), so a rank that skipped one
  would hang the others. Only rank 0 passes a checkpoint; the others pass ``checkpoint=None``,
  which the controller merges into rank 0's. Only rank 0's metrics reach ``Result.metrics``, so
  figures from the other ranks (e.g. their parameter hashes) are gathered into rank 0's report.
* **A crash never corrupts a checkpoint.** Rank 0 writes a complete folder in a local temporary
  directory first; ``ray.train.report`` copies it to storage and only then records it in the run's
  checkpoint index, so a half-uploaded folder is never resumed from.
* **Ranks agree on every step.** Before each step the ranks all-reduce "I have a batch" (one tiny
  collective on a CPU gloo group, so it never stalls the CUDA stream). If one rank's shard runs out
  a batch early, every rank ends the epoch together instead of deadlocking in DDP's all-reduce.
* **A fresh dataset per epoch.** The pipeline bakes the epoch into a dataset (augmentation seeds
  and file order), so re-iterating one dataset would repeat every crop and flip each epoch. The
  epoch a launch starts in streams from the dataset the driver passed to the trainer
  (``datasets={"train": ds}``, split by Ray Train with ``equal=True``); every later epoch is
  built here by rank 0 with ``build_dataset(epoch=e)`` and split the same way
  (``streaming_split(world, equal=True)`` with the ranks' nodes as locality hints), and the
  split iterators are broadcast to the ranks.
* **Resume is by step.** Schedules, the EMA ramp and the mask generator are functions of the
  global step (masks: ``mask_generator(seed, rank, step)``), so resuming at a saved step
  continues every curve exactly; the data position (epoch, batches consumed in it) is restored
  by skipping that many batches of the resumed epoch (Ray Data's streaming order is not
  bit-reproducible across runs, so this restores *how much* of the epoch was seen, not which
  chips).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from sarjepa_dist import storage
from sarjepa_dist.config import Config, config_from_dict

__all__ = ["RunInfo", "LoopState", "train_loop_per_worker", "param_checksum", "FAULT_STEP_ENV", "FAULT_MARKER_ENV"]

_log = logging.getLogger(__name__)
# The console progress line. A logger, not print(): Train V2 tees print() into both stdout and the
# root logger, so a print shows up twice in the driver's console.
_progress = logging.getLogger("sarjepa_dist.train.progress")

HISTORY_FILE = "metrics_history.jsonl"
# Fault injection for tests of the failure path: raise once at this step on rank
# SARJEPA_FAULT_RANK (default 0), creating the marker file so the restarted worker carries on.
FAULT_STEP_ENV = "SARJEPA_FAULT_AT_STEP"
FAULT_MARKER_ENV = "SARJEPA_FAULT_MARKER"
FAULT_RANK_ENV = "SARJEPA_FAULT_RANK"
COLLAPSE_SUBSAMPLE = 16  # chips of the current batch used for the collapse figures


class InjectedFault(RuntimeError):
    """Raised by the fault-injection hook (tests of FailureConfig restarts)."""


@dataclass
class RunInfo:
    """What the driver knows about the run and the workers need (travels in train_loop_config)."""

    name: str
    run_uri: str  # <storage_path>/<name>: where Ray keeps checkpoints; TensorBoard goes beside them
    dataset_id: str
    dataset_path: str
    bad_rows_run_name: str | None = None  # BadRowTracker name (None: no tracker)
    need: tuple[str, ...] = ("x", "gx")  # model inputs the pipeline computes
    trainer_dataset_epoch: int = 0  # the epoch the trainer's dataset (datasets={"train": ds}) was built for


@dataclass
class LoopState:
    """The loop's position, saved as ``state.json`` in every checkpoint."""

    step: int = 0  # optimiser steps done (the next step to run has this index)
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of ``epoch`` already consumed
    chips_seen: int = 0  # global, over all ranks
    world_size: int = 1
    schedules: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoopState":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# --------------------------------------------------------------------------- small helpers


def param_checksum(module: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in state-dict order: equal iff the weights are bitwise equal."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _maybe_inject_fault(step: int, rank: int) -> None:
    at = os.environ.get(FAULT_STEP_ENV)
    marker = os.environ.get(FAULT_MARKER_ENV)
    if not at or not marker or int(at) != step or rank != int(os.environ.get(FAULT_RANK_ENV, "0")):
        return
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"fault injected at step {step} on rank {rank}\n")
    raise InjectedFault(f"injected fault at step {step} on rank {rank} ({FAULT_STEP_ENV})")


def _batch_size(inputs: dict[str, torch.Tensor]) -> int:
    return int(next(iter(inputs.values())).shape[0])


class _Collectives:
    """Control-plane collectives on a CPU (gloo) group; no-ops in a one-rank run."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.group = None
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        self.active = world_size > 1 and dist.is_available() and dist.is_initialized()

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


# --------------------------------------------------------------------------- the loop


class _Trainer:
    """State of one rank's training; ``run`` is the loop. Split into methods so each concern reads alone."""

    def __init__(self, loop_config: dict[str, Any]):
        import ray
        import ray.train
        import ray.train.torch

        self.cfg: Config = config_from_dict(loop_config["config"])
        self.info = RunInfo(**loop_config["run"])
        cfg = self.cfg
        storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts outside bf16 autocast
        self.total = cfg.train.steps
        self.coll = _Collectives(self.world)
        # Node of every rank: locality hints when this loop splits a later epoch's dataset.
        self.node_ids: list[str] = self.coll.gather(ray.get_runtime_context().get_node_id())

        from sarjepa_dist.engine import build_method
        from sarjepa_dist.optim import Schedules, build_optimizer

        # Identical init on every rank (DDP broadcasts rank 0's weights too, but identical
        # construction also makes a one-rank run and a restarted run repeatable).
        torch.manual_seed(cfg.train.seed)
        self.model, self.sampler = build_method(cfg)
        self.model.to(self.device)
        self.need = self.model.required_inputs()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedules = Schedules(cfg.optim, self.total,
                                   lr_scale=cfg.optim.scale_for(cfg.data.batch_size * self.world))
        self.state = LoopState(world_size=self.world, schedules=self.schedules.state_dict())
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self._restore(ray.train.get_checkpoint())
        # Per-rank RNG streams for anything outside the mask generator (e.g. drop-path).
        torch.manual_seed(cfg.train.seed * 1_000_003 + self.rank * 7919 + self.state.step)

        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
        self.forward_net = self.ddp
        if cfg.train.compile:
            self.forward_net = torch.compile(self.ddp if self.ddp is not None else self.model)
        self.autocast = torch.bfloat16 if (cfg.train.amp and self.device.type == "cuda") else None

        self.tracker = None
        if self.info.bad_rows_run_name and self.rank == 0:
            from sarjepa_dist.data.badrows import BadRowTracker

            self.tracker = BadRowTracker(self.info.bad_rows_run_name)
        self.tb = None
        self._tb_staging: str | None = None
        if self.rank == 0:
            from sarjepa_dist.train.metrics import TensorBoardLogger

            if storage.is_s3(self.info.run_uri):
                self._tb_staging = tempfile.mkdtemp(prefix="sarjepa-tb-")
            self.tb = TensorBoardLogger(self.info.run_uri, self._tb_staging)

    # ------------------------------------------------------------------ checkpoints

    def _restore(self, checkpoint: Any) -> None:
        if checkpoint is None:
            return
        from sarjepa_dist.model.io import load_checkpoint_dir

        with checkpoint.as_directory() as d:
            # RNG: not restored from rng.pt (that is rank 0's state); every rank reseeds from
            # (seed, rank, step) below, which is as repeatable and right for every rank.
            state, meta = load_checkpoint_dir(d, self.model, self.optimizer, restore_rng=False,
                                              map_location=self.device)
            hist_path = os.path.join(d, HISTORY_FILE)
            if os.path.exists(hist_path):
                with open(hist_path) as f:
                    self.history = [json.loads(line) for line in f if line.strip()]
        self.state = LoopState.from_dict(state)
        self.schedules.load_state_dict(self.state.schedules or self.schedules.state_dict())
        self.state.schedules = self.schedules.state_dict()
        if self.state.world_size != self.world:
            _log.warning("checkpoint was written by %d workers, this run has %d; the data position "
                         "(batches consumed per rank) is approximate", self.state.world_size, self.world)
            self.state.world_size = self.world
        self.resumed_from = self.state.step
        if self.rank == 0:
            _progress.info("[sarjepa] resuming %s from checkpoint %s at step %d (epoch %d, %d batches into it)",
                           self.info.name, meta.get("checkpoint_id"), self.state.step, self.state.epoch,
                           self.state.batches_in_epoch)

    def _write_checkpoint(self, directory: str, checkpoint_id: str) -> dict[str, Any]:
        from sarjepa_dist.model.io import save_checkpoint_dir

        meta = {
            "run_name": self.info.name,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "checkpoint_id": checkpoint_id,
            "dataset_id": self.info.dataset_id,
            "dataset_path": storage.redact(self.info.dataset_path),
            "world_size": self.world,
            "run_uri": self.info.run_uri,
            "torch_version": torch.__version__,
        }
        written = save_checkpoint_dir(directory, self.model, self.optimizer, asdict(self.state),
                                      self.cfg.to_dict(), meta)
        with open(os.path.join(directory, HISTORY_FILE), "w") as f:
            for row in self.history:
                f.write(json.dumps(row, default=str) + "\n")
        return written

    # ------------------------------------------------------------------ data

    def _epoch_shard(self, epoch: int, trainer_shard: Any) -> Any:
        """This rank's ``DataIterator`` for ``epoch`` (see the module docstring: a dataset per epoch)."""
        if epoch == self.info.trainer_dataset_epoch and trainer_shard is not None:
            return trainer_shard
        from sarjepa_dist.data.pipeline import build_dataset

        splits: list[Any] = [None]
        if self.rank == 0:
            ds = build_dataset(self.cfg.data, self.cfg.gradient, need=self.info.need, training=True,
                               epoch=epoch, run_name=self.info.bad_rows_run_name)
            if self.world == 1:
                splits = [[ds.iterator()]]
            else:
                splits = [ds.streaming_split(self.world, equal=True, locality_hints=self.node_ids)]
        if self.world > 1:
            dist.broadcast_object_list(splits, src=0, group=self.coll.group)
        return splits[0][self.rank]

    def _batches(self, shard: Any) -> Iterator[dict[str, Any]]:
        from sarjepa_dist.data.pipeline import iter_train_batches

        return iter(iter_train_batches(shard, self.cfg.data, epoch=self.state.epoch, device=self.device,
                                       rank=self.rank))

    # ------------------------------------------------------------------ reporting

    @torch.no_grad()
    def _collapse(self, inputs: dict[str, torch.Tensor], masks: Any) -> dict[str, float]:
        """std / effective rank of target and predicted embeddings on a few chips (eval mode: no drop-path)."""
        from sarjepa_dist.masks import MaskBatch
        from sarjepa_dist.model.collapse import collapse_stats

        n = min(COLLAPSE_SUBSAMPLE, _batch_size(inputs))
        sub = {k: v[:n] for k, v in inputs.items()}
        sub_masks = MaskBatch(masks.context[:n], masks.targets[:n])
        was_training = self.model.training
        self.model.eval()
        try:
            ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()
            with ctx:
                out = self.model(sub, sub_masks)
        finally:
            self.model.train(was_training)
        tgt, pred = collapse_stats(out["target"]), collapse_stats(out["pred"])
        return {"std_target": tgt["std"], "eff_rank_target": tgt["effective_rank"],
                "std_pred": pred["std"], "eff_rank_pred": pred["effective_rank"]}

    def _report(self, step_metrics: dict[str, float], interval: dict[str, float],
                inputs: dict[str, torch.Tensor], masks: Any, checkpoint_due: bool) -> None:
        import ray.train

        cfg = self.cfg
        # Cross-rank figures (every rank takes part in these collectives).
        loss_mean, wait_mean, wait_max = self._reduce_interval(interval)
        metrics: dict[str, Any] = {
            "step": self.state.step,
            "total_steps": self.total,
            "epoch": self.state.epoch,
            "loss": loss_mean,
            "loss_last": step_metrics["loss"],
            "lr": step_metrics["lr"],
            "wd": step_metrics["wd"],
            "tau": step_metrics["tau"],
            "grad_norm": step_metrics["grad_norm"],
            "chips_per_s": interval["chips_per_s"],
            "chips_per_s_wall": interval["chips_per_s_wall"],  # reports and checkpoints included
            "ms_per_step": interval["ms_per_step"],
            "data_wait_fraction": wait_mean,
            "data_wait_fraction_max": wait_max,
            "chips_seen": self.state.chips_seen,
            "world_size": self.world,
            "transform_placement": cfg.data.transform_placement,
            "resumed_from_step": -1 if self.resumed_from is None else self.resumed_from,
        }
        if checkpoint_due or self.state.step >= self.total:
            sums = self.coll.gather(param_checksum(self.model))
            metrics["param_sha256"] = sums[0]
            metrics["param_sha256_per_rank"] = sums
            metrics["ranks_in_sync"] = len(set(sums)) == 1
            metrics["worker_nodes"] = list(self.node_ids)
        if self.rank == 0:
            metrics.update(self._collapse(inputs, masks))
            if self.tracker is not None:
                snap = self.tracker.check(cfg.data.max_bad_fraction, min_seen=10 * cfg.data.batch_size)
                bad = sum(snap["counts"].values())
                metrics["bad_rows_total"] = bad
                metrics["bad_rows_seen"] = snap["seen"]
                for reason, n in sorted(snap["counts"].items()):
                    metrics[f"bad_rows/{reason}"] = n
                self.tracker.warn_new(snap)

        checkpoint = checkpoint_id = tmp = None
        try:
            if self.rank == 0:
                if checkpoint_due:
                    checkpoint_id = f"checkpoint_{self.state.step:08d}_{uuid.uuid4().hex[:6]}"
                    metrics["checkpoint_id"] = checkpoint_id
                self.history.append(dict(metrics))  # before saving: a checkpoint holds its own report
                if self.tb is not None:
                    self.tb.log(metrics, self.state.step)
                if checkpoint_id is not None:
                    tmp = tempfile.mkdtemp(prefix="sarjepa-ckpt-")
                    ckpt_dir = os.path.join(tmp, checkpoint_id)
                    self._write_checkpoint(ckpt_dir, checkpoint_id)
                    checkpoint = ray.train.Checkpoint.from_directory(ckpt_dir)
                    if self.tb is not None:
                        self.tb.sync()
                from sarjepa_dist.train.metrics import format_progress

                _progress.info("[sarjepa] %s%s", format_progress(metrics, self.total),
                               f" | checkpoint {checkpoint_id}" if checkpoint_id else "")
            # Every rank reports (Train V2 synchronises reports); only rank 0 attaches a checkpoint,
            # which Ray copies to storage before recording it as the run's latest.
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_id)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _reduce_interval(self, interval: dict[str, float]) -> tuple[float, float, float]:
        """(loss mean over ranks, data-wait fraction mean over ranks, worst rank's data-wait fraction)."""
        wait = interval["data_wait_fraction"]
        loss_sum, wait_sum = self.coll.sum([interval["loss_mean"], wait])
        wait_max = max(self.coll.gather(wait))
        return loss_sum / self.world, wait_sum / self.world, wait_max

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict[str, Any]]:
        import ray.train

        from sarjepa_dist.engine import make_inputs_on_device, train_step
        from sarjepa_dist.masks import mask_generator
        from sarjepa_dist.train.metrics import IntervalMeter

        cfg = self.cfg
        trainer_shard = ray.train.get_dataset_shard("train")
        meter = IntervalMeter()
        self.model.train()
        try:
            while self.state.step < self.total:
                skip = self.state.batches_in_epoch
                it = self._batches(self._epoch_shard(self.state.epoch, trainer_shard))
                got_any = False
                while self.state.step < self.total:
                    t0 = time.perf_counter()
                    batch = next(it, None)
                    wait_s = time.perf_counter() - t0
                    local_n = 0 if batch is None else int(len(next(iter(batch.values()))))
                    have, chips = self.coll.sum([1.0 if batch is not None else 0.0, float(local_n)])
                    if have < self.world:
                        break  # some rank's shard is exhausted: every rank ends the epoch here
                    got_any = True
                    if skip > 0:  # resuming inside an epoch: fast-forward over what was consumed
                        skip -= 1
                        continue
                    inputs = make_inputs_on_device(batch, cfg.data, cfg.gradient, self.need, self.device)
                    gen = mask_generator(cfg.train.seed, self.rank, self.state.step)
                    masks = self.sampler.sample(_batch_size(inputs), gen).to(self.device)
                    sm = train_step(self.model, self.optimizer, self.schedules, inputs, masks, self.state.step,
                                    grad_clip=cfg.optim.grad_clip, autocast_dtype=self.autocast,
                                    ddp_model=self.forward_net)
                    self.state.step += 1
                    self.state.batches_in_epoch += 1
                    self.state.chips_seen += int(chips)
                    # The loss stays a device tensor until a report (no per-step host sync on GPU).
                    meter.add(wait_s=wait_s, step_s=time.perf_counter() - t0, chips=int(chips), loss=sm.loss)
                    _maybe_inject_fault(self.state.step, self.rank)

                    step = self.state.step
                    ckpt_due = step % cfg.train.checkpoint_every == 0 or step >= self.total
                    if step % cfg.train.log_every == 0 or ckpt_due:
                        self._report(sm.to_dict(), meter.flush(), inputs, masks, ckpt_due)
                if self.state.step >= self.total:
                    break
                if not got_any:
                    raise RuntimeError(
                        f"epoch {self.state.epoch} gave no batches on some rank: the dataset at "
                        f"{storage.redact(self.info.dataset_path)} has fewer good chips than "
                        f"data.batch_size ({cfg.data.batch_size}) x train.num_workers ({self.world})")
                self.state.epoch += 1
                self.state.batches_in_epoch = 0
        finally:
            if self.tb is not None:
                self.tb.close()
            if self._tb_staging is not None:
                shutil.rmtree(self._tb_staging, ignore_errors=True)
        return self.history


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray Train entry point. Returns rank 0's metrics history (Ray puts it in ``Result.return_value``)."""
    return _Trainer(loop_config).run()
