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
        # Ray Train's index of the trial's checkpoints: written once a checkpoint is registered
        snapshot = "resume-*/checkpoint_manager_snapshot.json"
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
