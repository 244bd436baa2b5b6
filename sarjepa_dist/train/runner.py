"""``run_pretrain``: the Ray shell around the per-worker loop (a Train V2 ``TorchTrainer``).

The driver does four things and no training: connect to Ray, read the dataset manifest (its id is
the lineage every checkpoint carries), build the Ray Data pipeline, and hand both to a
``TorchTrainer`` whose workers run :func:`sarjepa_dist.train.entry.ray_train_fn`.

Resume and restarts are Ray Train's, configured here:

* the run lives at ``<train.storage_path>/<train.name>`` (local or ``s3://``); Train V2 keeps a
  checkpoint index there, so **relaunching with the same name** finds it and starts every worker
  from the latest checkpoint (``ray.train.get_checkpoint()``), step and schedules included;
* ``FailureConfig(max_failures)`` restarts a failed worker group from that same checkpoint
  within one launch;
* ``CheckpointConfig(num_to_keep)`` prunes old checkpoints (the latest is never pruned).

What a run leaves behind, under ``<storage_path>/<name>/``: ``checkpoint_<step>_<id>/`` folders
(``model.io`` layout plus ``metrics_history.jsonl``), ``tensorboard/`` event files and Ray's own
run records. Each report (every ``log_every`` steps, and at every checkpoint) carries:

* the step: ``step``, ``total_steps``, ``epoch``, ``chips_seen``, ``world_size``,
  ``transform_placement``, ``resumed_from_step`` (-1: not resumed);
* the last step's ``loss_last``, ``lr``, ``wd``, ``tau``, ``grad_norm``;
* the interval since the last report: ``loss`` (mean over steps and ranks), ``chips_per_s``
  (global, step time only), ``chips_per_s_wall`` (reports and checkpoints included),
  ``ms_per_step``, ``data_wait_fraction`` (mean over ranks; ``data_wait_fraction_max`` the worst
  rank);
* rank 0's figures: ``std_target`` / ``eff_rank_target`` / ``std_pred`` / ``eff_rank_pred``
  (collapse figures on a 16-chip subsample) and ``bad_rows_total`` / ``bad_rows_seen`` /
  ``bad_rows/<reason>`` / ``bad_shards_quarantined`` (the run's tally: all epochs, every launch;
  it is saved in each checkpoint as ``bad_rows.json``);
* at a checkpoint (the last step included): ``checkpoint_id``, ``param_sha256``,
  ``param_sha256_per_rank``, ``ranks_in_sync`` and ``worker_nodes``;
* with ``probe.every > 0``, from the online probe's last run: ``probe_knn`` / ``probe_linear``
  (K-shot accuracy, ``probe.methods``), ``probe_feat_std``, ``probe_eff_rank``, ``probe_step``,
  ``probe_seconds`` (``train/probe_hook.py``);
* whatever the ``step_hooks`` returned since the last report.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from sarjepa_dist import storage
from sarjepa_dist.config import Config, ConfigError, with_absolute_paths
from sarjepa_dist.cluster import ray_init, ray_train_log_level, worker_env
from sarjepa_dist.data.pipeline import build_dataset, ingest_options, warm_read_workers
from sarjepa_dist.data.shards import read_manifest
from sarjepa_dist.model.jepa import required_inputs
from sarjepa_dist.train.entry import encode_step_hooks, ray_train_fn
from sarjepa_dist.train.loop import RunInfo, StepHook
from sarjepa_dist.train.probe_hook import OnlineProbe, check_probe_data

__all__ = ["PreparedRun", "PretrainResult", "prepare_run", "run_pretrain", "run_uri"]

_log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    name: str
    storage_path: str  # the run's folder: <train.storage_path>/<train.name>
    latest_checkpoint_uri: str | None  # local path or s3:// URI of the newest checkpoint
    final_step: int
    metrics_history: list[dict[str, Any]] = field(default_factory=list)  # every report of rank 0, resumes included
    dataset_id: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # the latest checkpoint's report


def run_uri(cfg: Config) -> str:
    """Where a run's checkpoints, TensorBoard events and Ray's records live."""
    return storage.join(cfg.train.storage_path, cfg.train.name)


def run_pretrain(cfg: Config, *, callbacks: Sequence[Any] | None = None,
                 resources_per_worker: dict[str, float] | None = None,
                 placement_strategy: str = "PACK", step_hooks: Sequence[StepHook] = ()) -> PretrainResult:
    """Pretrain (or resume) the run ``cfg.train.name``; returns where it is and how it went.

    ``cfg`` is a validated config (``load_config`` / ``config_from_dict`` validate it).
    ``callbacks``: Ray Train ``UserCallback``s (e.g. Tune's ``TuneReportCallback``).
    ``resources_per_worker``: extra resources each worker requests beside ``CPU``/``GPU`` (e.g. a
    custom per-node resource to place one worker per node). ``placement_strategy``: Ray's
    placement-group strategy for the worker group (``PACK``, ``SPREAD``, ``STRICT_SPREAD``).
    ``step_hooks``: callables each worker runs after every step (see ``loop.StepHook``); they
    travel to the workers pickled, so they must be picklable.
    """
    run = prepare_run(cfg, step_hooks)
    cfg, manifest, info = run.cfg, run.manifest, run.info
    uri = info.run_uri
    warm_read_workers(cfg.train.num_workers * cfg.train.cpus_per_worker, env_vars=_train_controller_env())
    trainer = TorchTrainer(
        ray_train_fn,
        train_loop_config=run.loop_config(),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=_scaling_config(cfg, resources_per_worker, placement_strategy),
        run_config=_run_config(cfg, callbacks),
        datasets={"train": run.dataset},
        dataset_config=DataConfig(execution_options=ingest_options(cfg.data)) if cfg.data.preserve_order else None,
    )
    _log.info("pretraining %s: %d worker(s), %d steps, storage %s", cfg.train.name, cfg.train.num_workers,
              cfg.train.steps, storage.redact(uri))
    result = trainer.fit()

    latest = None
    if result.checkpoint is not None:
        latest = storage.to_uri(result.checkpoint.filesystem, result.checkpoint.path)
    metrics = dict(result.metrics or {})
    history = list(result.return_value or [])
    final_step = int(history[-1]["step"]) if history else int(metrics.get("step", 0))
    return PretrainResult(name=cfg.train.name, storage_path=uri, latest_checkpoint_uri=latest,
                          final_step=final_step, metrics_history=history, dataset_id=manifest.dataset_id,
                          metrics=metrics)


@dataclass
class PreparedRun:
    """What the driver hands the loop: the config (paths made absolute), the dataset it built for
    the first epoch, the run's facts and the step hooks (the online probe first)."""

    cfg: Config
    manifest: Any
    dataset: Any  # ray.data.Dataset of epoch RunInfo.trainer_dataset_epoch
    info: RunInfo
    step_hooks: list[StepHook]

    def loop_config(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "run": asdict(self.info),
                "step_hooks": encode_step_hooks(self.step_hooks)}


def prepare_run(cfg: Config, step_hooks: Sequence[StepHook] = (), *, run_uri_override: str | None = None) -> PreparedRun:
    """Read the manifests, connect to Ray and build the first epoch's dataset (``run_pretrain`` and
    a sweep's in-process trial). ``run_uri_override``: where checkpoints and TensorBoard go, when
    not ``<train.storage_path>/<train.name>`` (a trial's Tune folder)."""
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give the shard dataset to pretrain on (local path or s3://)")
    cfg = with_absolute_paths(cfg)  # the workers read the probe's chips in their own working directory
    # The manifests are read before Ray starts, so a wrong path fails in a second, not after start-up.
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    manifest = read_manifest(cfg.data.path)
    hooks = list(step_hooks)
    if cfg.probe.every > 0:
        check_probe_data(cfg)
        hooks = [OnlineProbe(cfg), *hooks]
    ray_init(cfg.ray, cfg.storage)
    need = required_inputs(cfg.model)
    tracker_name = cfg.train.name
    dataset = build_dataset(cfg.data, cfg.gradient, need=need, training=True, epoch=0, run_name=tracker_name,
                            manifest=manifest)
    info = RunInfo(name=cfg.train.name, run_uri=run_uri_override or run_uri(cfg), dataset_id=manifest.dataset_id,
                   dataset_path=cfg.data.path, bad_rows_run_name=tracker_name, need=need,
                   trainer_dataset_epoch=0, epoch_rows=manifest.num_chips)
    return PreparedRun(cfg, manifest, dataset, info, hooks)


def _train_controller_env() -> dict[str, str]:
    """The env_vars Ray Train V2 gives its controller actor, whose runtime environment the
    trainer's Ray Data tasks inherit (what ``TorchTrainer.fit`` sets; empty if Ray moved it)."""
    try:
        from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
        from ray.train.v2._internal.constants import (
            DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE, get_env_vars_to_propagate,
        )
    except ImportError:
        return {}
    env = get_env_vars_to_propagate()
    env.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return env


def _scaling_config(cfg: Config, resources_per_worker: dict[str, float] | None,
                    placement_strategy: str) -> ScalingConfig:
    resources: dict[str, float] = {"CPU": float(cfg.train.cpus_per_worker)}
    if cfg.train.use_gpu:
        resources["GPU"] = 1.0
    resources.update(resources_per_worker or {})
    train = cfg.train
    workers = train.num_workers if train.min_workers is None else (train.min_workers, train.num_workers)
    return ScalingConfig(num_workers=workers, use_gpu=train.use_gpu, resources_per_worker=resources,
                         placement_strategy=placement_strategy,
                         elastic_resize_monitor_interval_s=train.elastic_resize_interval_s)


def _run_config(cfg: Config, callbacks: Sequence[Any] | None) -> RunConfig:
    filesystem, storage_path = storage.resolve(cfg.train.storage_path)
    return RunConfig(
        name=cfg.train.name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(callbacks or []),
        logging_config=LoggingConfig(log_level=ray_train_log_level()),
        # Endpoint, region and SARJEPA_* switches for the train workers. Credentials travel in
        # the job's runtime_env (cluster.ray_init) or the nodes' own environment: Train V2
        # publishes worker_runtime_env in its run state, so no secret goes in here.
        worker_runtime_env={"env_vars": worker_env(secrets=False)},
    )
