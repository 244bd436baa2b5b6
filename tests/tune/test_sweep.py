"""A real sweep on a local Ray cluster, interrupted mid-way and relaunched (the ASHA sweep and its
outputs are tested through the pipeline: tests/tune/test_pipeline_run.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sarjepa_dist.config import load_config

from _tune_helpers import tiny_sweep_config, write_labelled_chips

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_an_interrupted_sweep_resumes_from_its_storage_path(tmp_path):
    """A sweep stopped mid-trial (Ctrl-C) and relaunched finishes every trial; the interrupted trial
    continues from its own checkpoint instead of starting over."""
    from sarjepa_dist.train.history import read_history
    from sarjepa_dist.train.export import find_checkpoint

    data = write_labelled_chips(str(tmp_path / "chips"))
    runs = str(tmp_path / "runs")
    cfg = tiny_sweep_config(data, runs, "resume", train={"steps": 24},
                            tune={"search": {"train.seed": {"grid": [0]}}, "scheduler": "none"})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "sarjepa_dist.cli", "sweep", "--config", str(config)], env=env)
    try:
        deadline = time.time() + 240
        # the trial's first checkpoint, in its Tune folder (meta.json is the last file written)
        snapshot = "resume/*/checkpoint_*/meta.json"
        while not list(Path(runs).glob(snapshot)) and time.time() < deadline:
            time.sleep(0.5)
        assert list(Path(runs).glob(snapshot)), "no trial checkpointed"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    interrupted = json.loads((Path(runs) / "resume" / "sweep.json").read_text())["trials"]
    assert interrupted[0]["steps"] < 24, "the first launch was stopped mid-trial"
    from sarjepa_dist.tune import run_sweep

    result = run_sweep(load_config(config))
    assert [r["stopped"] for r in result.rows] == ["completed"]
    resumed = [h for h in (read_history(find_checkpoint(r["run"]).uri) for r in result.rows)
               if any(row.get("resumed_from_step", -1) > 0 for row in h)]
    assert resumed, "the interrupted trial restarted from step 0"


def test_a_trial_can_run_a_torch_trainer_and_keeps_its_run_under_train_storage_path(ray_local, tmp_path):
    """``tune.trial_executor: torch-trainer`` (what ``auto`` picks for a multi-worker trial): the
    trial drives a Train V2 TorchTrainer whose reports, the probe's among them, reach Tune."""
    from sarjepa_dist.train.export import find_checkpoint
    from sarjepa_dist.tune import run_sweep

    data = write_labelled_chips(str(tmp_path / "chips"), per_class=8)
    runs = str(tmp_path / "runs")
    cfg = tiny_sweep_config(data, runs, "trainer", train={"steps": 8},
                            tune={"search": {"train.seed": {"grid": [0]}}, "scheduler": "none",
                                  "trial_executor": "torch-trainer"})
    result = run_sweep(cfg)
    [row] = result.rows
    assert row["stopped"] == "completed" and row["steps"] == 8 and row["probe_knn"] is not None
    assert row["run"] == os.path.join(runs, f"trainer-{row['trial_id']}")
    assert list(Path(row["run"]).glob("checkpoint_manager_snapshot.json")), "Ray Train's checkpoint index"
    assert find_checkpoint(row["run"]).step == 8
