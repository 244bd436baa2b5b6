"""``run_pretrain``: the Ray shell around the per-worker loop (a Train V2 ``TorchTrainer``).

The driver does four things and no training: connect to Ray, read the dataset manifest (its id is
the lineage every checkpoint carries), build the Ray Data pipeline, and hand both to a
``TorchTrainer`` whose workers run :func:`sarjepa_dist.train.loop.train_loop_per_worker`.

Resume and restarts are Ray Train's, configured here:

* the run lives at ``<train.storage_path>/<train.name>`` (local or ``s3://``); Train V2 keeps a
  checkpoint index there, so **relaunching with the same name** finds it and starts every worker
  from the latest checkpoint (``ray.train.get_checkpoint()``), step and schedules included;
* ``FailureConfig(max_failures)`` restarts a failed worker group from that same checkpoint
  within one launch;
* ``CheckpointConfig(num_to_keep)`` prunes old checkpoints (the latest is never pruned).

What a run leaves behind, under ``<storage_path>/<name>/``: ``checkpoint_<step>_<id>/`` folders
(``model.io`` layout plus ``metrics_history.jsonl``), ``tensorboard/`` event files and Ray's own
run records. Each report (every ``log_every`` steps, and at every checkpoint) carries: ``step``,
``epoch``, ``loss`` (interval mean over steps and ranks), ``lr``, ``wd``, ``tau``, ``grad_norm``,
``chips_per_s`` (global), ``ms_per_step``, ``data_wait_fraction`` (mean over ranks; ``_max`` the
worst rank), ``std_target`` / ``eff_rank_target`` / ``std_pred`` / ``eff_rank_pred`` (collapse
figures on a 16-chip subsample), ``bad_rows_total`` / ``bad_rows_seen`` / ``bad_rows/<reason>``
(this launch's pipeline, all epochs), ``chips_seen`` and ``resumed_from_step``; checkpoint
reports add ``checkpoint_id``, ``param_sha256`` (+ ``_per_rank``), ``ranks_in_sync`` and
``worker_nodes``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from sarjepa_dist import storage
from sarjepa_dist.config import Config, ConfigError
from sarjepa_dist.train.cluster import ray_init, worker_env
from sarjepa_dist.train.loop import RunInfo, train_loop_per_worker

__all__ = ["PretrainResult", "run_pretrain", "run_uri"]

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


def _required_inputs(cfg: Config) -> tuple[str, ...]:
    """The model inputs a config needs, so the pipeline computes nothing else."""
    from sarjepa_dist.model.jepa import required_inputs

    return tuple(required_inputs(cfg.model))


def run_pretrain(cfg: Config, *, callbacks: Sequence[Any] | None = None,
                 resources_per_worker: dict[str, float] | None = None,
                 placement_strategy: str = "PACK") -> PretrainResult:
    """Pretrain (or resume) the run ``cfg.train.name``; returns where it is and how it went.

    ``callbacks``: Ray Train ``UserCallback``s (e.g. Tune's ``TuneReportCallback``).
    ``resources_per_worker``: extra resources each worker requests beside ``CPU``/``GPU`` (e.g. a
    custom per-node resource to place one worker per node). ``placement_strategy``: Ray's
    placement-group strategy for the worker group (``PACK``, ``SPREAD``, ``STRICT_SPREAD``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sarjepa_dist.data.pipeline import build_dataset
    from sarjepa_dist.data.shards import read_manifest

    cfg.validate()
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give the shard dataset to pretrain on (local path or s3://)")
    # The manifest is read before Ray starts, so a wrong data.path fails in a second, not after start-up.
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    manifest = read_manifest(cfg.data.path)
    ray_init(cfg.ray, cfg.storage)
    need = _required_inputs(cfg)
    tracker_name = cfg.train.name
    dataset = build_dataset(cfg.data, cfg.gradient, need=need, training=True, epoch=0, run_name=tracker_name)

    fs, fs_path = storage.resolve(cfg.train.storage_path)
    uri = run_uri(cfg)
    info = RunInfo(name=cfg.train.name, run_uri=uri, dataset_id=manifest.dataset_id,
                   dataset_path=cfg.data.path, bad_rows_run_name=tracker_name, need=need,
                   trainer_dataset_epoch=0)
    resources: dict[str, float] = {"CPU": float(cfg.train.cpus_per_worker)}
    if cfg.train.use_gpu:
        resources["GPU"] = 1.0
    resources.update(resources_per_worker or {})

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run": asdict(info)},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources, placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=cfg.train.name,
            storage_path=fs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks or []),
            # Endpoint, region and SARJEPA_* switches for the train workers. Credentials travel in
            # the job's runtime_env (cluster.ray_init) or the nodes' own environment: Train V2
            # publishes worker_runtime_env in its run state, so no secret goes in here.
            worker_runtime_env={"env_vars": worker_env(secrets=False)},
        ),
        datasets={"train": dataset},
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
