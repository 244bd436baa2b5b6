"""``sarjepa pipeline`` end to end on a tiny budget: a 4-trial ASHA sweep on the (scripted) probe
with a trial that fails, is retried and is reported with its error; the sweep's outputs; the best
point pretrained for ``pipeline.steps``; the few-shot report, with the lineage from the dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from sarjepa_dist import storage
from sarjepa_dist.config import load_config

from _tune_helpers import FailTrial, ScriptedProbe, tiny_sweep_config, write_labelled_chips

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_pipeline_runs_an_asha_sweep_then_the_best_point_then_a_fewshot_report(ray_local, tmp_path):
    from sarjepa_dist.pipeline import run_pipeline

    data = write_labelled_chips(str(tmp_path / "chips"))
    runs = str(tmp_path / "runs")
    # as written: the scripted probe's ranking meets ASHA in a known order
    cfg = tiny_sweep_config(data, runs, "asha", tune={"search": {"train.seed": {"grid": [0, 1, 2, 3]}},
                                                      "max_concurrent_trials": 2, "grid_order": "as-written"},
                            pipeline={"steps": 8, "out": str(tmp_path / "out")})
    failures = tmp_path / "failures"
    hooks = [ScriptedProbe(), FailTrial(seed=3, step=1, record=str(failures))]
    result = run_pipeline(cfg, step_hooks=hooks)
    sweep = result.sweep

    by_seed = {r["params"]["train.seed"]: r for r in sweep.rows}
    assert sorted(by_seed) == [0, 1, 2, 3], "every trial is in the table, the failed one too"
    assert by_seed[0]["stopped"] == "completed" and by_seed[0]["steps"] == 12
    assert sweep.best is by_seed[0] and sweep.rows[0] is by_seed[0]
    early = [s for s in (1, 2) if by_seed[s]["stopped"] == "stopped early by ASHA"]
    assert early and all(by_seed[s]["steps"] < 12 for s in early)
    assert failures.read_text().count("failed") == 2, "tried once, retried tune.max_failures = 1 time"
    assert by_seed[3]["stopped"] == "error" and "injected trial failure" in by_seed[3]["error"]
    assert sweep.rows[-1] is by_seed[3], "a trial without a probe figure ranks last"
    assert by_seed[0]["curve"][-1] == [12, pytest.approx(0.9)]

    for name in ("sweep.json", "sweep.md", "sweep.csv", "sweep.png", "best.yaml"):
        assert storage.exists(sweep.outputs[name]), name
    md = storage.read_text(sweep.outputs["sweep.md"])
    assert "stopped early by ASHA" in md and "injected trial failure" in md.splitlines()[-1]
    assert storage.read_text(sweep.outputs["sweep.csv"]).count("\n") == 5
    assert "stopped" in sweep.table_text.splitlines()[0]

    # best.yaml is a pretrain config as it stands: the best point under a fresh run name
    best = load_config(sweep.outputs["best.yaml"])
    assert best.train.seed == 0 and best.train.name == "asha-best"
    assert best.to_dict()["model"] == cfg.to_dict()["model"]
    assert "tune" not in yaml.safe_load(Path(sweep.outputs["best.yaml"]).read_text())

    # the full run is that config for pipeline.steps; the report compares it with random init
    assert result.best_config.train.steps == 8 and result.best_config.train.name == "asha-best"
    assert storage.exists(storage.join(result.checkpoint, "meta.json"))
    record = json.loads(storage.read_text(result.record_uri))
    report = json.loads(storage.read_text(storage.join(os.path.dirname(result.report_uri), "results.json")))
    dataset_id = record["dataset"]["dataset_id"]
    assert dataset_id == json.loads(storage.read_text(sweep.table_uri))["dataset_id"]
    assert record["pretrain"]["steps"] == 8 and record["sweep"]["best_trial"] == by_seed[0]["trial_id"]
    encoders = {e["name"]: e for e in report["encoders"]}
    assert "random-init" in encoders and len(encoders) == 2
    pretrained = next(e for e in report["encoders"] if e["name"] != "random-init")
    assert pretrained["lineage"]["dataset_id"] == dataset_id and pretrained["lineage"]["step"] == 8
