"""Ray Tune sweeps over masking/block scales and EMA momentum, ranked by few-shot accuracy.

A Tune trial is a driver function that runs one pretraining (a TorchTrainer, Train V2) with
``TuneReportCallback`` streaming its metrics to Tune, then scores the trial's EMA encoder with a
short few-shot probe. JEPA losses are not comparable across mask settings (the task itself
changes), so trials are ranked by few-shot accuracy on a labelled set, never by loss.
Relaunching a sweep with the same ``tune.name`` and ``tune.storage_path`` resumes it.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from sarjepa_dist import storage
from sarjepa_dist.cluster import ray_session
from sarjepa_dist.config import Config, ConfigError, config_from_dict, dotted_tree, merge_tree
from sarjepa_dist.data.shards import read_manifest
from sarjepa_dist.fewshot.runner import quick_score
from sarjepa_dist.train.runner import run_pretrain

log = logging.getLogger(__name__)

DEFAULT_GRID = {
    "mask.target_scale": [[0.1, 0.15], [0.15, 0.2]],
    "optim.ema": [[0.99, 1.0], [0.996, 1.0]],
}


@dataclass
class SweepResult:
    name: str
    table_uri: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None


def grid_points(grid: dict[str, list[Any]], base: Config) -> list[dict[str, Any]]:
    """Every combination of the grid axes, each validated against the base config up front."""
    axes = sorted(grid.items())
    points = []
    for values in itertools.product(*[v for _, v in axes]):
        point = {k: v for (k, _), v in zip(axes, values)}
        try:
            config_from_dict(merge_tree(base.to_dict(), dotted_tree(point)))
        except ConfigError as exc:
            raise ConfigError(f"tune.grid point {point} is invalid: {exc}") from exc
        points.append(point)
    return points


def trial_config(base_tree: dict[str, Any], point: dict[str, Any], trial_name: str) -> Config:
    tree = merge_tree(copy.deepcopy(base_tree), dotted_tree(point))
    tree.setdefault("train", {})["name"] = trial_name
    return config_from_dict(tree)


def _trial_name(sweep: str, point: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return "-".join(fmt(x) for x in v) if isinstance(v, (list, tuple)) else f"{v}"

    return f"{sweep}--" + "--".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in sorted(point.items()))


def _run_trial(params: dict[str, Any]) -> None:
    """Tune trial: pretrain with this point's settings, then few-shot score the EMA encoder."""
    point = params["point"]
    cfg = trial_config(params["base"], point, params["trial_name"])
    result = run_pretrain(cfg, callbacks=[TuneReportCallback()])
    score = quick_score(result.latest_checkpoint_uri, cfg)
    tune.report({
        "fewshot_acc": score["accuracy"],
        "fewshot_method": score["method"],
        "fewshot_shots": score["shots"],
        "final_loss": result.metrics_history[-1].get("loss") if result.metrics_history else None,
        "final_step": result.final_step,
        "checkpoint_uri": result.latest_checkpoint_uri,
        "dataset_id": result.dataset_id,
        **{f"param/{k}": json.dumps(v) for k, v in point.items()},
    })


def run_sweep(cfg: Config) -> SweepResult:
    grid = cfg.tune.grid or DEFAULT_GRID
    points = grid_points(grid, cfg)
    if not cfg.fewshot.data:
        raise ConfigError("fewshot.data is empty: a sweep ranks trials by few-shot accuracy on a labelled "
                          "dataset; set fewshot.data (it may be the pretraining data when it is labelled)")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give the shard dataset the trials pretrain on (local path or s3://)")
    # Both datasets are read before Ray starts: a wrong path fails now, not once in every trial.
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    read_manifest(cfg.data.path)
    read_manifest(cfg.fewshot.data)
    base_tree = cfg.to_dict()
    with ray_session(cfg.ray, cfg.storage):
        rows = [_trial_row(res) for res in _tuner(cfg, points, base_tree).fit()]
    scored = [r for r in rows if r.get("fewshot_acc") is not None]
    best = (max if cfg.tune.mode == "max" else min)(scored, key=lambda r: r["fewshot_acc"]) if scored else None
    sweep_root = storage.join(cfg.tune.storage_path, cfg.tune.name)
    table_uri = storage.join(sweep_root, "sweep.json")
    storage.write_text(table_uri, json.dumps({
        "name": cfg.tune.name, "metric": cfg.tune.metric, "mode": cfg.tune.mode, "grid": grid,
        "trials": rows, "best": best, "base_config": base_tree,
    }, indent=2, default=str))
    storage.write_text(storage.join(sweep_root, "sweep.md"), format_table(rows, grid))
    return SweepResult(cfg.tune.name, table_uri, rows, best)


def _tuner(cfg: Config, points: list[dict[str, Any]], base_tree: dict[str, Any]) -> tune.Tuner:
    """A Tuner over the grid points, or the sweep of the same name restored from storage."""
    fs, path = storage.resolve(cfg.tune.storage_path)
    # Only the grid point goes in param_space (Tune prints and records it); the base config rides
    # along as a trainable parameter.
    param_space = {"point": tune.grid_search(points)}
    trainable = tune.with_parameters(_run_trial_wrapper, sweep_name=cfg.tune.name, base=base_tree)
    # The trial driver itself is light; its TorchTrainer workers and Ray Data claim the CPUs.
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    experiment_path = f"{path}/{cfg.tune.name}"
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        log.info("resuming sweep %s", cfg.tune.name)
        return tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=fs,
                                  param_space=param_space)
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=cfg.tune.max_concurrent_trials),
        run_config=tune.RunConfig(name=cfg.tune.name, storage_path=path, storage_filesystem=fs),
    )


def _trial_row(res: Any) -> dict[str, Any]:
    """One row of the sweep table: the trial's grid point, its score and outcome."""
    m = res.metrics or {}
    row = {k[len("param/"):]: json.loads(v) for k, v in m.items() if k.startswith("param/")}
    row.update({k: m.get(k) for k in ("fewshot_acc", "fewshot_method", "fewshot_shots", "final_loss",
                                       "final_step", "checkpoint_uri", "dataset_id")})
    row["error"] = None if res.error is None else str(res.error).splitlines()[0][:300]
    return row


def _run_trial_wrapper(params: dict[str, Any], sweep_name: str, base: dict[str, Any]) -> None:
    _run_trial({"point": params["point"], "base": base, "trial_name": _trial_name(sweep_name, params["point"])})


def format_table(rows: list[dict[str, Any]], grid: dict[str, Any]) -> str:
    keys = sorted(grid)
    head = "| " + " | ".join(keys + ["few-shot acc", "final loss", "step", "checkpoint"]) + " |"
    sep = "|" + "---|" * (len(keys) + 4)
    lines = [head, sep]
    for r in sorted(rows, key=lambda r: -(r.get("fewshot_acc") or -1)):
        acc = "error" if r.get("fewshot_acc") is None else f"{100 * r['fewshot_acc']:.1f}%"
        loss = "" if r.get("final_loss") is None else f"{r['final_loss']:.4f}"
        lines.append("| " + " | ".join([json.dumps(r.get(k)) for k in keys]
                                       + [acc, loss, str(r.get("final_step")), str(r.get("checkpoint_uri"))]) + " |")
    return "\n".join(lines) + "\n"
