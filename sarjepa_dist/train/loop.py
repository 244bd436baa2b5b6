"""The per-worker training loop that Ray Train runs on every rank (entered by
``entry.train_loop_per_worker``, which starts the first epoch's stream before importing this module).

A thin shell around the pure-torch step (``engine.train_step``), in the shape of Ray Train's
``TorchTrainer`` examples: set up (model, optimiser, the checkpoint Ray hands back), then for each
epoch, for each batch: step, run the step hooks, and every ``train.log_every`` steps report
(checkpointing every ``train.checkpoint_every`` steps and at the end). Each rule the loop keeps is
stated beside the lines that keep it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sarjepa_dist import storage
from sarjepa_dist.config import Config
from sarjepa_dist.data.badrows import BadRowTracker
from sarjepa_dist.engine import StepMetrics, build_method, make_inputs_on_device, train_step
from sarjepa_dist.masks import MaskBatch, mask_generator
from sarjepa_dist.model.collapse import collapse_stats
from sarjepa_dist.model.io import load_checkpoint_dir, save_checkpoint_dir, saved_config_section
from sarjepa_dist.optim import Schedules, build_optimizer
from sarjepa_dist.train.history import HISTORY_FILE
from sarjepa_dist.train.batches import EpochStream, epoch_shard, epoch_stream
from sarjepa_dist.train.entry import LoopStart, decode_step_hooks
from sarjepa_dist.train.metrics import IntervalMeter, TensorBoardLogger, format_progress
from sarjepa_dist.train.session import LoopSession

__all__ = ["RunInfo", "LoopState", "StepView", "StepHook", "run_loop", "param_checksum"]

_log = logging.getLogger(__name__)
# The console progress line. A logger, not print(): Train V2 tees print() into both stdout and the
# root logger, so a print shows up twice in the driver's console.
_progress = logging.getLogger("sarjepa_dist.train.progress")

COLLAPSE_SUBSAMPLE = 16  # chips of the current batch used for the collapse figures
BAD_ROWS_FILE = "bad_rows.json"  # the run's bad-row tally (badrows.BadRowTracker.state), per checkpoint


@dataclass
class RunInfo:
    """What the driver knows about the run and the workers need (travels in train_loop_config)."""

    name: str
    run_uri: str  # <storage_path>/<name>: where Ray keeps checkpoints; TensorBoard goes beside them
    dataset_id: str
    dataset_path: str
    bad_rows_run_name: str | None = None  # BadRowTracker name (None: no tracker)
    epoch_rows: int = 0  # chips in the dataset (the manifest's count; 0: unknown)
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


@dataclass(frozen=True)
class StepView:
    """What a step hook sees after an optimiser step: ``step`` steps are done on this rank."""

    step: int
    rank: int
    world_size: int
    model: torch.nn.Module  # this rank's replica, unwrapped (no DDP, not compiled)
    cfg: Config
    epoch: int = 0
    chip_ids: tuple[str, ...] = ()  # the chips of the step's batch on this rank


# Called on every rank after every step (a hook picks its own steps and ranks, and a hook that
# runs collectives must run them on every rank). What it returns is merged into this rank's next
# report; only rank 0's report reaches Ray's results. A hook that raises fails the worker, which
# Ray restarts from the latest checkpoint (train.max_failures).
StepHook = Callable[[StepView], Mapping[str, Any] | None]


@dataclass
class _Fetched:
    """One batch that every rank has, with the timings the interval meter needs."""

    batch: dict[str, Any]
    global_chips: int  # chips in this step over all ranks
    started: float  # perf_counter() before asking for the batch
    wait_s: float  # time blocked on the pipeline


def param_checksum(module: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in state-dict order: equal iff the weights are bitwise equal."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """What ``train_step`` autocasts to on ``device`` under ``train.precision``/``train.amp``."""
    name = cfg.train.autocast_dtype(device.type)
    return getattr(torch, name) if name else None


def _batch_size(inputs: dict[str, torch.Tensor]) -> int:
    return int(next(iter(inputs.values())).shape[0])


class _Collectives:
    """Control-plane collectives on a CPU (gloo) group, so they never stall the CUDA stream; no-ops
    in a one-rank run."""

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


class _Trainer:
    """One rank's training: ``__init__`` sets up, ``run`` is the loop."""

    def __init__(self, loop_config: dict[str, Any], session: LoopSession, start: LoopStart):
        # ``start`` (entry.start_loop) asked for the dataset and started a fresh run's first epoch
        # before this module was imported, so that Ray Data's coordinator and first read tasks
        # (seconds to start on a small machine) start while the model is built. A resumed run
        # starts its epoch in ``run``.
        self.first_stream: EpochStream | None = start.first_stream
        try:
            self.cfg: Config = start.cfg
            self.info = RunInfo(**loop_config["run"])
            self.hooks: list[StepHook] = decode_step_hooks(loop_config.get("step_hooks"))
            self.session = session
            self.rank, self.world, self.device = session.rank, session.world_size, session.device
            self.total = self.cfg.train.steps
            self.trainer_shard = start.trainer_shard
            self._set_up(start.checkpoint)
        except BaseException:
            if self.first_stream is not None:
                self.first_stream.close()
            raise

    def _set_up(self, checkpoint: Any) -> None:
        session = self.session
        self.coll = _Collectives(self.world)
        # Node of every rank: locality hints when this loop splits a later epoch's dataset.
        self.node_ids: list[str] = self.coll.gather(session.node_id())

        self._build_method()
        self.state = LoopState(world_size=self.world, schedules=self.schedules.state_dict())
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.saved_bad_rows: dict[str, Any] | None = None  # the bad-row tally of the checkpoint resumed
        self._restore(checkpoint)
        # Per-rank RNG streams for anything outside the mask generator (e.g. drop-path).
        torch.manual_seed(self.cfg.train.seed * 1_000_003 + self.rank * 7919 + self.state.step)
        self.forward_net = self._wrap_model()
        self.hook_metrics: dict[str, Any] = {}  # returned by step hooks since the last report

        # Rank 0 keeps the run's telemetry: the bad-row tally and the TensorBoard event files.
        self.tracker = None
        if self.info.bad_rows_run_name and self.rank == 0:
            self.tracker = BadRowTracker(self.info.bad_rows_run_name)
            if self.saved_bad_rows is not None:  # the run's tally survives restarts and relaunches
                self.tracker.restore(self.saved_bad_rows)
        self.tb = TensorBoardLogger(self.info.run_uri) if self.rank == 0 else None

    def _build_method(self) -> None:
        """Model, mask sampler, optimiser and schedules."""
        cfg = self.cfg
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts outside bf16 autocast
        # Identical init on every rank (DDP broadcasts rank 0's weights too, but identical
        # construction also makes a one-rank run and a restarted run repeatable).
        torch.manual_seed(cfg.train.seed)
        self.model, self.sampler = build_method(cfg)
        self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedules = Schedules(cfg.optim, self.total,
                                   lr_scale=cfg.optim.scale_for(cfg.data.batch_size * self.world))
        self.autocast = autocast_dtype(cfg, self.device)

    def _wrap_model(self) -> torch.nn.Module | None:
        """What the step runs forward through: DDP over the ranks, compiled if asked (None: the model)."""
        net = None
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.train.compile:
            net = torch.compile(net if net is not None else self.model)
        return net

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[dict[str, Any]]:
        # The epoch the driver built the trainer's dataset for streams from Ray Train's split of it
        # (datasets={"train": ds}, split with equal=True like every later epoch).
        trainer_shard = self.trainer_shard
        self.meter = IntervalMeter()
        self.model.train()
        # the next epoch's stream, started during the epoch before (the first one: in __init__)
        upcoming, self.first_stream = self.first_stream, None
        try:
            # Epochs until the step budget is spent; a resumed run starts in its saved epoch.
            for epoch in itertools.count(self.state.epoch):
                if self.state.step >= self.total:
                    break
                # Resume is by step: skip the batches of the saved epoch that were consumed before
                # (Ray Data's streaming order is not bit-reproducible, so this restores how much of
                # the epoch was seen, not which chips).
                skip = self.state.batches_in_epoch if epoch == self.state.epoch else 0
                self.state.epoch, self.state.batches_in_epoch = epoch, skip
                stream, upcoming = upcoming or self._epoch_stream(epoch, trainer_shard), None
                for fetched in itertools.islice(self._agreed_batches(stream), skip, None):
                    step_metrics, inputs, masks = self._step(fetched)
                    if upcoming is None and self._run_outlasts_epoch():
                        # every rank decides alike (the same step, the same counts): epoch_shard is a collective
                        upcoming = self._epoch_stream(epoch + 1, trainer_shard)
                    self._run_hooks(fetched)
                    if self._report_due():
                        self._report(step_metrics, inputs, masks)
                    if self.state.step >= self.total:
                        break
        finally:
            if upcoming is not None:
                upcoming.close()
            if self.tb is not None:
                self.tb.close()
        return self.history

    # ------------------------------------------------------------------ data

    def _epoch_stream(self, epoch: int, trainer_shard: Any) -> EpochStream:
        """This rank's batches of ``epoch``, the first one already on its way."""
        return epoch_stream(self._epoch_shard(epoch, trainer_shard), self.cfg.data, epoch=epoch, device=self.device,
                            rank=self.rank)

    def _run_outlasts_epoch(self) -> bool:
        """Whether steps remain after this epoch, by the dataset's chip count (unknown: no)."""
        per_epoch = self.info.epoch_rows // (self.cfg.data.batch_size * self.world)
        epoch_start = self.state.step - self.state.batches_in_epoch
        return per_epoch > 0 and epoch_start + per_epoch < self.total

    def _epoch_shard(self, epoch: int, trainer_shard: Any) -> Any:
        """This rank's ``DataIterator`` for ``epoch``."""
        if epoch == self.info.trainer_dataset_epoch and trainer_shard is not None:
            return trainer_shard
        # A fresh dataset per epoch: the pipeline bakes the epoch into the augmentation seeds and the
        # file order, so re-iterating one dataset would repeat every crop and flip.
        return epoch_shard(self.cfg.data, self.cfg.gradient, epoch=epoch, rank=self.rank, world=self.world,
                           need=self.info.need, run_name=self.info.bad_rows_run_name,
                           locality_hints=self.node_ids, group=self.coll.group)

    def _agreed_batches(self, stream: EpochStream) -> Iterator[_Fetched]:
        """This rank's batches of one epoch, as long as every rank has one."""
        batches = iter(stream)
        got_any = False
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            wait_s = time.perf_counter() - started
            local_chips = 0 if batch is None else len(batch["chip_id"])
            # Ranks agree on every step with this tiny all-reduce: if one rank's shard runs out a
            # batch early, every rank ends the epoch here instead of deadlocking in DDP's all-reduce.
            have, chips = self.coll.sum([0.0 if batch is None else 1.0, float(local_chips)])
            if have < self.world:
                break
            got_any = True
            yield _Fetched(batch, int(chips), started, wait_s)
        if not got_any:
            raise RuntimeError(
                f"epoch {self.state.epoch} gave no batches on some rank: the dataset at "
                f"{storage.redact(self.info.dataset_path)} has fewer good chips than "
                f"data.batch_size ({self.cfg.data.batch_size}) x train.num_workers ({self.world})")

    # ------------------------------------------------------------------ one step

    def _step(self, fetched: _Fetched) -> tuple[StepMetrics, dict[str, torch.Tensor], MaskBatch]:
        cfg = self.cfg
        inputs = make_inputs_on_device(fetched.batch, cfg.data, cfg.gradient, self.info.need, self.device)
        # Masks are a function of (seed, rank, step), so a resumed run draws the masks it would have.
        gen = mask_generator(cfg.train.seed, self.rank, self.state.step)
        masks = self.sampler.sample(_batch_size(inputs), gen).to(self.device)
        step_metrics = train_step(self.model, self.optimizer, self.schedules, inputs, masks, self.state.step,
                                  grad_clip=cfg.optim.grad_clip, autocast_dtype=self.autocast,
                                  ddp_model=self.forward_net, keep_outputs=self._outputs_to_keep())
        self.state.step += 1
        self.state.batches_in_epoch += 1
        self.state.chips_seen += fetched.global_chips
        # The loss stays a device tensor until a report (no per-step host sync on GPU).
        self.meter.add(wait_s=fetched.wait_s, step_s=time.perf_counter() - fetched.started,
                       chips=fetched.global_chips, loss=step_metrics.loss)
        return step_metrics, inputs, masks

    def _run_hooks(self, fetched: _Fetched) -> None:
        view = StepView(step=self.state.step, rank=self.rank, world_size=self.world, model=self.model,
                        cfg=self.cfg, epoch=self.state.epoch, chip_ids=tuple(fetched.batch["chip_id"]))
        for hook in self.hooks:
            self.hook_metrics.update(hook(view) or {})

    # ------------------------------------------------------------------ reports and checkpoints

    def _checkpoint_due(self, step: int | None = None) -> bool:
        step = self.state.step if step is None else step
        return step % self.cfg.train.checkpoint_every == 0 or step >= self.total

    def _report_due(self, step: int | None = None) -> bool:
        step = self.state.step if step is None else step
        return step % self.cfg.train.log_every == 0 or self._checkpoint_due(step)

    def _outputs_to_keep(self) -> int:
        """Chips whose step outputs the next report's collapse figures reuse (0: none). Without
        drop-path the training forward is the eval forward, so a report step's own embeddings serve
        and a report costs no extra forward; with drop-path the report runs an eval forward."""
        if self.rank != 0 or self.cfg.model.drop_path > 0 or not self._report_due(self.state.step + 1):
            return 0
        return COLLAPSE_SUBSAMPLE

    def _report(self, step_metrics: StepMetrics, inputs: dict[str, torch.Tensor], masks: MaskBatch) -> None:
        checkpoint_due = self._checkpoint_due()
        metrics = self._metrics(step_metrics, inputs, masks, checkpoint_due)
        if self.rank != 0:
            # Every rank reports at the same steps: Train V2 synchronises a report across ranks (rank
            # 0 broadcasts the checkpoint folder name), so a rank that skipped one would hang the rest.
            self.session.report(metrics)
            return
        checkpoint_id = f"checkpoint_{self.state.step:08d}_{uuid.uuid4().hex[:6]}" if checkpoint_due else None
        if checkpoint_id is not None:
            metrics["checkpoint_id"] = checkpoint_id
        self.history.append(dict(metrics))  # before saving: a checkpoint holds its own report
        self.tb.log(metrics, self.state.step)
        with self._staged_checkpoint(checkpoint_id) as checkpoint_dir:
            _progress.info("[sarjepa] %s%s", format_progress(metrics, self.total),
                           f" | checkpoint {checkpoint_id}" if checkpoint_id else "")
            # Ray copies the checkpoint folder to storage and only then records it in the run's
            # checkpoint index; the other ranks' reports (no checkpoint) merge into this one.
            try:
                self.session.report(metrics, checkpoint_dir, checkpoint_id)
            except OSError as exc:  # the store stayed unreachable through every retry
                raise storage.StorageError(
                    f"{storage.redact(self.info.run_uri)}: cannot save checkpoint {checkpoint_id} of step "
                    f"{self.state.step}: {storage.redact(str(exc))}; the run's latest checkpoint is the one "
                    "before it (retries: SARJEPA_S3_RETRY_ATTEMPTS)") from exc

    def _metrics(self, step_metrics: StepMetrics, inputs: dict[str, torch.Tensor], masks: MaskBatch,
                 checkpoint_due: bool) -> dict[str, Any]:
        """One report's figures; the cross-rank ones are collectives, run on every rank in this order."""
        metrics = self._interval_metrics(step_metrics)
        if checkpoint_due:
            metrics.update(self._replica_metrics())
        if self.rank == 0:  # rank 0's own figures (only its report reaches Ray's results)
            metrics.update(self._collapse(step_metrics, inputs, masks))
            metrics.update(self._bad_row_metrics())
        metrics.update(self.hook_metrics)
        self.hook_metrics = {}
        return metrics

    def _interval_metrics(self, step_metrics: StepMetrics) -> dict[str, Any]:
        """The last step's figures and the interval's since the last report (loss and wait over ranks)."""
        last = step_metrics.to_dict()
        interval = self.meter.flush()
        loss_sum, wait_sum = self.coll.sum([interval["loss_mean"], interval["data_wait_fraction"]])
        wait_max = max(self.coll.gather(interval["data_wait_fraction"]))
        return {
            "step": self.state.step,
            "total_steps": self.total,
            "epoch": self.state.epoch,
            "loss": loss_sum / self.world,
            "loss_last": last["loss"],
            "lr": last["lr"],
            "wd": last["wd"],
            "tau": last["tau"],
            "grad_norm": last["grad_norm"],
            "chips_per_s": interval["chips_per_s"],
            "chips_per_s_wall": interval["chips_per_s_wall"],  # reports and checkpoints included
            "ms_per_step": interval["ms_per_step"],
            "data_wait_fraction": wait_sum / self.world,
            "data_wait_fraction_max": wait_max,
            "chips_seen": self.state.chips_seen,
            "world_size": self.world,
            "transform_placement": self.cfg.data.transform_placement,
            "resumed_from_step": -1 if self.resumed_from is None else self.resumed_from,
        }

    def _replica_metrics(self) -> dict[str, Any]:
        """Every rank's weight hash (DDP must keep the replicas bitwise equal) and node, gathered
        into every report because only rank 0's reaches Ray's results."""
        sums = self.coll.gather(param_checksum(self.model))
        return {"param_sha256": sums[0], "param_sha256_per_rank": sums, "ranks_in_sync": len(set(sums)) == 1,
                "worker_nodes": list(self.node_ids)}

    @torch.no_grad()
    def _collapse(self, step_metrics: StepMetrics, inputs: dict[str, torch.Tensor],
                  masks: MaskBatch) -> dict[str, float]:
        """std / effective rank of target and predicted embeddings on a few chips of the last batch:
        the step's own (``_outputs_to_keep``) or, with drop-path, an eval-mode forward."""
        out = step_metrics.outputs
        if out is None:
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

    def _bad_row_metrics(self) -> dict[str, Any]:
        """The run's bad-row tally (all epochs, all launches); stops the run past data.max_bad_fraction."""
        if self.tracker is None:
            return {}
        data = self.cfg.data
        snap = self.tracker.check(data.max_bad_fraction, min_seen=10 * data.batch_size)
        metrics: dict[str, Any] = {"bad_rows_total": sum(snap["counts"].values()), "bad_rows_seen": snap["seen"],
                                   "bad_shards_quarantined": len(snap["quarantined"])}
        for reason, n in sorted(snap["counts"].items()):
            metrics[f"bad_rows/{reason}"] = n
        self.tracker.warn_new(snap)
        return metrics

    @contextmanager
    def _staged_checkpoint(self, checkpoint_id: str | None) -> Iterator[str | None]:
        """Rank 0's checkpoint folder for one report, or None.

        A crash never corrupts a checkpoint: the folder is written complete in a local temporary
        directory, which lives until the session's report has copied it to storage.
        """
        if checkpoint_id is None:
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="sarjepa-ckpt-", ignore_cleanup_errors=True) as staging:
            folder = os.path.join(staging, checkpoint_id)
            self._write_checkpoint(folder, checkpoint_id)
            self.tb.sync()  # the TensorBoard events reach storage with every checkpoint
            yield folder

    def _write_checkpoint(self, directory: str, checkpoint_id: str) -> dict[str, Any]:
        meta = {
            "run_name": self.info.name,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "checkpoint_id": checkpoint_id,
            "dataset_id": self.info.dataset_id,
            "dataset_path": storage.redact(self.info.dataset_path),
            "world_size": self.world,
            "run_uri": storage.redact(self.info.run_uri),
            "torch_version": torch.__version__,
        }
        probed = [row for row in self.history if "probe_step" in row]
        if probed:  # the latest online-probe figures, so `inspect CHECKPOINT` shows how good it was
            meta["probe"] = {k: v for k, v in probed[-1].items() if k.startswith("probe_")}
        extra = {HISTORY_FILE: "".join(json.dumps(row, default=str) + "\n" for row in self.history)}
        if self.tracker is not None:
            # Epochs before the current one are never read again after a resume: keep their totals only.
            extra[BAD_ROWS_FILE] = json.dumps(self.tracker.state(close_before=self.state.epoch))
        return save_checkpoint_dir(directory, self.model, self.optimizer, asdict(self.state),
                                   storage.redact_tree(self.cfg.to_dict()), meta, extra_files=extra)

    def _restore(self, checkpoint: Any) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            # before the weights: another method's weights can have the same shapes and load silently
            saved_model = saved_config_section(d, "model")
            if saved_model is not None:
                self.cfg.model.check_resumes(saved_model, where=f"checkpoint {checkpoint.path}")
            # RNG: not restored from rng.pt (that is rank 0's state); every rank reseeds from
            # (seed, rank, step) after this, which is as repeatable and right for every rank.
            state, meta = load_checkpoint_dir(d, self.model, self.optimizer, restore_rng=False,
                                              map_location=self.device)
            hist_path = os.path.join(d, HISTORY_FILE)
            if os.path.exists(hist_path):
                with open(hist_path) as f:
                    self.history = [json.loads(line) for line in f if line.strip()]
            bad_rows_path = os.path.join(d, BAD_ROWS_FILE)
            if os.path.exists(bad_rows_path):
                with open(bad_rows_path) as f:
                    self.saved_bad_rows = json.load(f)
        # Resume is by step: the schedules, the EMA ramp and the mask generator are functions of
        # the global step, so every curve continues exactly from the saved one.
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


def run_loop(loop_config: dict[str, Any], session: LoopSession, start: LoopStart) -> list[dict[str, Any]]:
    """One rank's training from what ``entry.start_loop`` began (the entry point is
    ``entry.train_loop_per_worker``). Returns rank 0's metrics history."""
    return _Trainer(loop_config, session, start).run()
