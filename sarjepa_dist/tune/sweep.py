"""``run_sweep``: the Tuner over the search space, its scheduler and search algorithm, and the outputs.

Trials run concurrently up to ``tune.max_concurrent_trials``; a one-worker trial trains in its own
process (``train.cpus_per_worker`` CPUs; see ``trial.py``), a multi-worker one runs a TorchTrainer
(its driver claims 0.01 CPU, its workers and Ray Data the rest). ASHA stops trials on the online probe
(``tune.metric``, reported every ``probe.every`` steps), never on the JEPA loss: losses are not
comparable across mask settings and a collapsing run has the lowest. Under ASHA a grid's points
start in a seeded random order (``sweep_param_space``). ``tune.scheduler: hyperband`` halves
synchronously instead (``tune/halving.py``): trials pause at each rung and the best resume. A failed trial is retried
``tune.max_failures`` times from its own checkpoint, then reported with its error. Relaunching a
sweep with the same ``tune.name`` and ``tune.storage_path`` resumes it: finished trials are kept,
unfinished and failed ones continue from their checkpoints (not under hyperband: refused).
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from sarjepa_dist import storage
from sarjepa_dist.cluster import ray_session
from sarjepa_dist.config import Config, ConfigError, with_absolute_paths
from sarjepa_dist.data.shards import read_manifest
from sarjepa_dist.train.loop import StepHook
from sarjepa_dist.train.probe_hook import check_probe_data
from sarjepa_dist.tune.halving import (ActiveTrials, GatedSearch, GatedVariants, SyncHalving, check_halving,
                                        require_state_api)
from sarjepa_dist.tune.results import rank_rows, table_cells, format_text, trial_row, write_sweep_outputs
from sarjepa_dist.tune.space import apply_point, check_search_alg, check_space, param_space, point_of, sweep_axes
from sarjepa_dist.tune.trial import in_trial_process, run_trial, trial_run_uri, tune_withholds_credentials

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    name: str
    root: str  # <tune.storage_path>/<tune.name>: Tune's experiment and the outputs below
    table_uri: str  # sweep.json
    outputs: dict[str, str]  # sweep.json/.md/.csv/.png and best.yaml -> URI
    rows: list[dict[str, Any]]  # ranked best first
    best: dict[str, Any] | None
    best_config: dict[str, Any] | None  # the best trial's config tree (train.name: <tune.name>-best)
    table_text: str  # the ranked table as printed


def check_sweep(cfg: Config) -> list:
    """Everything a sweep can be refused for, before Ray starts; returns its axes."""
    if cfg.probe.every <= 0:
        raise ConfigError("probe.every = 0: a sweep stops and ranks trials by the online probe; set "
                          "probe.every (steps between probes) and a labelled probe.data")
    method = cfg.tune.metric[len("probe_"):]
    if method not in cfg.probe.methods:
        raise ConfigError(f"tune.metric = {cfg.tune.metric!r} is not reported: probe.methods = "
                          f"{cfg.probe.methods}; use probe_{cfg.probe.methods[0]} or add {method!r}")
    grace = cfg.tune.grace_period or cfg.probe.every
    if cfg.tune.scheduler == "asha" and grace > cfg.train.steps:
        raise ConfigError(f"tune.grace_period = {grace} (default: probe.every) exceeds train.steps = "
                          f"{cfg.train.steps}: ASHA could never stop a trial; lower it")
    if cfg.tune.scheduler == "hyperband" and cfg.probe.every % cfg.train.checkpoint_every:
        raise ConfigError(f"tune.scheduler = hyperband pauses trials at probes and resumes them from the "
                          f"checkpoint there: train.checkpoint_every = {cfg.train.checkpoint_every} must divide "
                          f"probe.every = {cfg.probe.every}")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give the shard dataset the trials pretrain on (local path or s3://)")
    if cfg.tune.trial_executor == "trial-process" and cfg.train.num_workers != 1:
        raise ConfigError(f"tune.trial_executor = trial-process runs one worker in the trial's own process, but "
                          f"train.num_workers = {cfg.train.num_workers}; set tune.trial_executor: torch-trainer "
                          f"(or auto) for multi-worker trials")
    axes = sweep_axes(cfg.tune)
    check_space(axes, cfg)
    check_search_alg(axes, cfg.tune)
    if cfg.tune.scheduler == "hyperband":
        check_halving(trial_count(axes, cfg.tune), cfg.train.steps, cfg.tune.reduction_factor, cfg.probe.every)
    return axes


def trial_count(axes: list, tc: Any) -> int:
    """How many trials the sweep runs: each grid combination ``num_samples`` times."""
    return math.prod(len(a.args) for a in axes if a.sampler == "grid") * tc.num_samples


def run_sweep(cfg: Config, *, step_hooks: Sequence[StepHook] = ()) -> SweepResult:
    """Run (or resume) the sweep ``cfg.tune.name``; ``step_hooks`` join every trial's train loop."""
    axes = check_sweep(cfg)
    # trials run in Tune's trial directories: their datasets and run folders must not be relative
    cfg = with_absolute_paths(cfg, ("data.path", "probe.data", "train.storage_path"))
    # The datasets are read before Ray starts: a wrong path fails now, not once in every trial.
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    manifest = read_manifest(cfg.data.path)
    check_probe_data(cfg)
    base_tree = cfg.to_dict()
    root = storage.join(cfg.tune.storage_path, cfg.tune.name)
    if cfg.tune.scheduler == "hyperband":
        _refuse_hyperband_resume(cfg)
    # ASHA acts on results that carry the probe; reports before the first probe lack it, which
    # Tune's strict metric check would otherwise call a bug.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    with ray_session(cfg.ray, cfg.storage), tune_withholds_credentials():
        if cfg.tune.scheduler == "hyperband":
            require_state_api()
        grid = _tuner(cfg, axes, base_tree, step_hooks).fit()
    rows = rank_rows([_row(res, cfg) for res in grid], cfg.tune.metric, cfg.tune.mode)
    best = next((r for r in rows if r.get(cfg.tune.metric) is not None), None)
    best_tree = None
    if best is not None:
        best_tree = apply_point(base_tree, best["params"])
        best_tree["train"]["name"] = cfg.pipeline.name or f"{cfg.tune.name}-best"
    keys = [a.key for a in axes]
    summary = {"name": cfg.tune.name, "metric": cfg.tune.metric, "mode": cfg.tune.mode,
               "scheduler": cfg.tune.scheduler, "search_alg": cfg.tune.search_alg,
               "axes": {a.key: {a.sampler: list(a.args)} for a in axes}, "dataset_id": manifest.dataset_id,
               "dataset": cfg.data.path, "trials": rows, "best": best, "base_config": base_tree}
    outputs = write_sweep_outputs(root, summary, keys, best_tree)
    return SweepResult(cfg.tune.name, root, outputs["sweep.json"], outputs, rows, best, best_tree,
                       format_text(table_cells(rows, keys, cfg.tune.metric)))


def _tuner(cfg: Config, axes: list, base_tree: dict[str, Any], step_hooks: Sequence[StepHook]) -> tune.Tuner:
    """A Tuner over the search space, or the sweep of the same name restored from storage."""
    fs, path = storage.resolve(cfg.tune.storage_path)
    space = sweep_param_space(cfg, axes)
    trainable = tune.with_parameters(run_trial, sweep_name=cfg.tune.name, base=base_tree,
                                     step_hooks=list(step_hooks))
    trainable = tune.with_resources(trainable, _trial_resources(cfg))
    experiment_path = f"{path}/{cfg.tune.name}"
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        log.info("resuming sweep %s from %s", cfg.tune.name, storage.redact(experiment_path))
        return tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=fs,
                                  param_space=space)
    tc = cfg.tune
    # Tune applies this limit to a Searcher (Optuna) only; the variant generator takes it itself.
    # Under hyperband the searcher and scheduler share the limit on running trials (halving.py).
    limit = tc.max_concurrent_trials if tc.search_alg == "optuna" and tc.scheduler != "hyperband" else None
    active = ActiveTrials(tc.max_concurrent_trials, trial_count(axes, tc)) if tc.scheduler == "hyperband" else None
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(num_samples=tc.num_samples, max_concurrent_trials=limit,
                                    search_alg=_search_alg(cfg, active), scheduler=_scheduler(cfg, active),
                                    trial_dirname_creator=_trial_dirname,
                                    metric=tc.metric, mode=tc.mode,
                                    # a finished trial's process (torch, timm and the loop imported)
                                    # takes the next trial; all trials ask for the same resources
                                    reuse_actors=in_trial_process(cfg)),
        run_config=tune.RunConfig(name=tc.name, storage_path=path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                                  # in-process trials' checkpoints (a TorchTrainer's keep their own)
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
                                  # every result of every trial (the learning curves), even where
                                  # TUNE_DISABLE_AUTO_CALLBACK_LOGGERS turns Tune's own loggers off
                                  callbacks=[JsonLoggerCallback()]),
    )


def _refuse_hyperband_resume(cfg: Config) -> None:
    """Tune restores a sweep's unfinished trials as pending, and pending trials start at once: a
    relaunched hyperband sweep would start every paused trial together, past
    ``tune.max_concurrent_trials`` (and past the CPUs Ray Data needs beside them)."""
    fs, path = storage.resolve(cfg.tune.storage_path)
    if tune.Tuner.can_restore(f"{path}/{cfg.tune.name}", storage_filesystem=fs):
        raise ConfigError(
            f"tune.name = {cfg.tune.name!r}: {storage.redact(storage.join(cfg.tune.storage_path, cfg.tune.name))} "
            "already holds this sweep, and a hyperband sweep cannot be resumed (Tune would restart all its "
            "paused trials at once); give a new tune.name, or use tune.scheduler: asha for sweeps you may "
            "need to resume")


def sweep_param_space(cfg: Config, axes: list) -> dict[str, Any]:
    """The Tuner's param_space. Under ASHA with ``tune.grid_order: shuffled`` a grid's points start
    in a seeded random order: asynchronous rungs compare each trial with the trials that reached
    them first, so in nested order one corner of the grid would set every cutoff. Without
    ``tune.seed`` the order is fixed by the sweep's name, so a relaunch (resume) sees the same."""
    tc = cfg.tune
    seed = tc.seed if tc.seed is not None else zlib.crc32(tc.name.encode())
    return param_space(axes, shuffle_seed=seed, shuffle=tc.scheduler == "asha" and tc.grid_order == "shuffled")


def _trial_resources(cfg: Config) -> dict[str, float]:
    if in_trial_process(cfg):  # the trial is the one training worker
        return {"CPU": float(cfg.train.cpus_per_worker), **({"GPU": 1.0} if cfg.train.use_gpu else {})}
    # The trial driver itself is light; its TorchTrainer workers and Ray Data claim the CPUs.
    return {"CPU": 0.01}


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _scheduler(cfg: Config, active: ActiveTrials | None = None) -> ASHAScheduler | SyncHalving | None:
    if cfg.tune.scheduler == "hyperband":
        assert active is not None
        return SyncHalving(total_steps=cfg.train.steps, reduction_factor=int(cfg.tune.reduction_factor),
                           active=active)
    if cfg.tune.scheduler != "asha":
        return None
    # time is the trial's optimiser step (every report carries it), so rungs are step counts
    return ASHAScheduler(time_attr="step", max_t=cfg.train.steps,
                         grace_period=cfg.tune.grace_period or cfg.probe.every,
                         reduction_factor=cfg.tune.reduction_factor)


def _search_alg(cfg: Config, active: ActiveTrials | None = None) -> Any:
    if cfg.tune.search_alg == "optuna":
        try:
            import optuna  # noqa: F401 - only to say what is missing
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:
            raise ConfigError("tune.search_alg = optuna needs the optuna package: "
                              "pip install 'sarjepa-dist[optuna]'") from exc
        searcher = OptunaSearch(seed=cfg.tune.seed)  # TPE, Optuna's default sampler
        return searcher if active is None else GatedSearch(searcher, active)
    if active is not None:
        return GatedVariants(active, random_state=cfg.tune.seed)
    return BasicVariantGenerator(max_concurrent=cfg.tune.max_concurrent_trials, random_state=cfg.tune.seed)


def _row(res: Any, cfg: Config) -> dict[str, Any]:
    trial_id = os.path.basename(res.path.rstrip("/"))  # _trial_dirname: the trial id
    history = [] if res.metrics_dataframe is None else res.metrics_dataframe.to_dict("records")
    if not history and res.metrics:
        history = [res.metrics]
    error = None if res.error is None else (str(res.error).strip().splitlines() or ["error"])[-1][:300]
    return trial_row(trial_id, trial_run_uri(cfg, trial_id), point_of(res.config), history, error, cfg.tune.metric,
                     cfg.train.steps, cfg.tune.scheduler)
