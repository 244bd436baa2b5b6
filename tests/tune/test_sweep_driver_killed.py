"""A sweep whose driver process is SIGKILLed (no chance to save anything on the way out) while its
second trial runs: relaunched with the same name, it finishes the remaining trial from that trial's
own checkpoint and does not run the finished one again."""

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

from _figures import record_figure
from _tune_helpers import tiny_sweep_config, write_labelled_chips
from sarjepa_dist.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.faults]

def _checkpointed_trials(runs: Path, name: str) -> list[Path]:
    """The sweep's trial folders (one-worker trials train in the trial's process; Tune keeps their
    checkpoints in <tune.storage_path>/<tune.name>/<trial id>/) holding a complete checkpoint."""
    return sorted({p.parent.parent for p in runs.glob(f"{name}/*/checkpoint_*/meta.json")})


def _checkpoints(trial: Path) -> list[tuple[str, int]]:
    """(folder, step) of each complete checkpoint of a trial."""
    return sorted((p.parent.name, json.loads(p.read_text())["step"]) for p in trial.glob("checkpoint_*/meta.json"))


@pytest.mark.timeout(600)
def test_a_sweep_whose_driver_is_killed_resumes_without_rerunning_finished_trials(tmp_path):
    from sarjepa_dist.train.history import read_history
    from sarjepa_dist.train.export import find_checkpoint
    from sarjepa_dist.tune import run_sweep

    data = write_labelled_chips(str(tmp_path / "chips"))
    runs = tmp_path / "runs"
    cfg = tiny_sweep_config(data, str(runs), "killed", train={"steps": 12},
                            tune={"search": {"train.seed": {"grid": [0, 1]}}, "scheduler": "none",
                                  "max_concurrent_trials": 1})
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, "-m", "sarjepa_dist.cli", "sweep", "--config", str(config)],
                              env=env, start_new_session=True)
    try:
        deadline = time.time() + 400
        # one trial at a time: a second trial with a checkpoint means the first one finished
        while len(_checkpointed_trials(runs, "killed")) < 2 and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)
        assert len(_checkpointed_trials(runs, "killed")) == 2, "the second trial never checkpointed"
        assert driver.poll() is None, "the sweep ended before the driver could be killed"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        time.sleep(5)  # Ray's reaper takes the killed driver's local cluster down
    trials = _checkpointed_trials(runs, "killed")
    before = {t: _checkpoints(t) for t in trials}
    [finished] = [t for t, saved in before.items() if any(step == 12 for _, step in saved)]
    [unfinished] = [t for t in trials if t != finished]

    started = time.monotonic()
    result = run_sweep(load_config(config))
    relaunch_s = time.monotonic() - started
    assert [r["stopped"] for r in result.rows] == ["completed", "completed"]
    assert _checkpoints(finished) == before[finished], "the finished trial ran again"
    history = read_history(find_checkpoint(str(unfinished)).uri)
    assert history[-1]["step"] == 12
    resumed_from = [row["resumed_from_step"] for row in history if row.get("resumed_from_step", -1) > 0]
    assert resumed_from, "the killed trial restarted from step 0"
    record_figure("sweep driver SIGKILLed during trial 2 of 2, relaunched", trials_completed=2,
                  finished_trials_rerun=0, resumed_from_step=resumed_from[0], relaunch_wall_s=round(relaunch_s, 1),
                  test="tests/tune/test_sweep_driver_killed.py")
