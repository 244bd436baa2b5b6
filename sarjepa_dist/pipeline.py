"""``sarjepa pipeline``: sweep → full pretraining with the best point → few-shot report.

One Ray session for the three stages. The sweep (``tune.*``, trials of ``train.steps``) writes its
table, plot and ``best.yaml``; the full run pretrains that configuration for ``pipeline.steps``
under ``pipeline.name`` (default ``<tune.name>-best``; its probe every ``pipeline.probe_every``
steps, default the sweep's ``probe.every``), so relaunching resumes it like any
pretraining; the few-shot report compares its latest checkpoint with ``pipeline.compare``.
``pipeline.json`` records the chain: dataset id → sweep and best trial → run and checkpoint →
report (each checkpoint and report also carries the dataset id itself).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from sarjepa_dist import storage
from sarjepa_dist.cluster import ray_session
from sarjepa_dist.config import Config, ConfigError, config_from_dict
from sarjepa_dist.errors import SarjepaError
from sarjepa_dist.fewshot.runner import prepare_split, run_fewshot
from sarjepa_dist.train.loop import StepHook
from sarjepa_dist.train.runner import run_pretrain
from sarjepa_dist.tune import SweepResult, check_sweep, run_sweep

log = logging.getLogger(__name__)


class NoBestTrial(SarjepaError):
    """Every trial of the sweep failed before its first probe: there is nothing to pretrain."""


@dataclass
class PipelineResult:
    sweep: SweepResult
    best_config: Config  # the full run's config
    checkpoint: str
    report_uri: str
    record_uri: str  # pipeline.json


def best_run_config(sweep: SweepResult, steps: int, probe_every: int | None) -> Config:
    if sweep.best_config is None:
        raise NoBestTrial(f"no trial of sweep {sweep.name} reported a probe figure; "
                          f"see {storage.redact(sweep.outputs['sweep.md'])} for their errors")
    tree = {**sweep.best_config, "train": {**sweep.best_config["train"], "steps": steps}}
    if probe_every is not None:
        tree["probe"] = {**tree["probe"], "every": probe_every}
    return config_from_dict(tree)


def run_pipeline(cfg: Config, *, step_hooks: Sequence[StepHook] = ()) -> PipelineResult:
    """Run (or resume) the chain; ``step_hooks`` join the sweep's trials (``run_sweep``)."""
    # Everything that can be refused is refused before the sweep spends its budget.
    check_sweep(cfg)
    if not cfg.fewshot.data:
        raise ConfigError("fewshot.data is empty: the pipeline ends in a few-shot report on a labelled "
                          "dataset; set fewshot.data (it may be the pretraining data when it is labelled)")
    storage.configure(cfg.storage.endpoint_url, cfg.storage.region)
    prepare_split(cfg)
    out = cfg.pipeline.out or cfg.fewshot.out
    with ray_session(cfg.ray, cfg.storage):
        sweep = run_sweep(cfg, step_hooks=step_hooks)
        full = best_run_config(sweep, cfg.pipeline.steps, cfg.pipeline.probe_every)
        log.info("pretraining the best point as %s for %d steps", full.train.name, full.train.steps)
        run = run_pretrain(full)
        tree = full.to_dict()
        tree["fewshot"] = {**tree["fewshot"], "encoders": [run.latest_checkpoint_uri, *cfg.pipeline.compare],
                           "out": cfg.fewshot.out}
        report = run_fewshot(config_from_dict(tree))
    record = _record(cfg, sweep, full, run, report.report_uri)
    record_uri = storage.join(out, "pipeline.json")
    storage.write_text(record_uri, json.dumps(record, indent=2, default=str))
    return PipelineResult(sweep, full, run.latest_checkpoint_uri, report.report_uri, record_uri)


def _record(cfg: Config, sweep: SweepResult, full: Config, run: Any, report_uri: str) -> dict[str, Any]:
    best = sweep.best or {}
    return {
        "dataset": {"path": cfg.data.path, "dataset_id": run.dataset_id},
        "sweep": {"name": sweep.name, "root": sweep.root, "table": sweep.outputs.get("sweep.md"),
                  "metric": cfg.tune.metric, "best_trial": best.get("trial_id"), "best_params": best.get("params"),
                  "best_probe": best.get(cfg.tune.metric), "best_config": sweep.outputs.get("best.yaml")},
        "pretrain": {"name": full.train.name, "run": run.storage_path, "steps": run.final_step,
                     "checkpoint": run.latest_checkpoint_uri},
        "fewshot": {"report": report_uri, "encoders": [run.latest_checkpoint_uri, *cfg.pipeline.compare]},
    }
