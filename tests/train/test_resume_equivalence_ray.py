"""Resume-equivalence through Ray Train: a ``run_pretrain`` (one worker, CPU) whose worker is
SIGKILLed after step 8 resumes mid-epoch from a checkpoint (step 6, two batches into epoch 1, or
step 3 when Train had not yet registered the checkpoint of step 6: its controller polls the
workers' reports, and a report made just before a SIGKILL can be lost with the worker) and ends
with the parameters of an uninterrupted run (max abs difference <= 1e-6), having seen the same
chips in the same order, with the same lr and tau, at every step after the resume.

``data.preserve_order`` makes Ray Data emit blocks in input order: without it an epoch's chip order
depends on which read task finishes first (the resume restores how many batches of the epoch were
seen, not which chips). The Ray-free version of this check is test_resume_equivalence.py.
"""

from __future__ import annotations

import os

import pytest

from safetensors.torch import load_file

from _figures import record_figure
from _train_helpers import FailOnce, RecordChips, read_records, tiny_config, write_chip_dataset
from sarjepa_dist import storage

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.faults]

CHIPS, SHARD_CHIPS, BATCH = 32, 16, 8  # two shards (two read tasks racing), four steps an epoch
STEPS, CHECKPOINT_EVERY, FAULT_STEP = 10, 3, 8  # checkpoints at 3, 6, 9, 10: mid-epoch all but the last


def _run(root: str, runs: str, name: str, records: str, *faults):
    from sarjepa_dist.train.runner import run_pretrain

    os.makedirs(records)
    cfg = tiny_config(root, runs, name, data={"batch_size": BATCH, "shuffle_buffer": 16, "preserve_order": True},
                      train={"steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY, "log_every": CHECKPOINT_EVERY,
                             "max_failures": 1})
    result = run_pretrain(cfg, step_hooks=[RecordChips(records), *faults])
    weights = load_file(os.path.join(storage.resolve(result.latest_checkpoint_uri)[1], "model.safetensors"))
    return result, weights, read_records(records)


def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(train_ray, tmp_path):
    root, runs = str(tmp_path / "chips"), str(tmp_path / "runs")
    write_chip_dataset(root, per_class=CHIPS // 4, num_bad=0, shard_chips=SHARD_CHIPS)
    full, full_weights, full_rows = _run(root, runs, "uninterrupted", str(tmp_path / "rec-full"))
    marker = str(tmp_path / "killed")
    resumed, resumed_weights, resumed_rows = _run(root, runs, "killed", str(tmp_path / "rec-killed"),
                                                  FailOnce(step=FAULT_STEP, marker=marker, sigkill=True))
    assert os.path.exists(marker), "the fault was not injected"
    assert full.final_step == resumed.final_step == STEPS
    restarts = [h["resumed_from_step"] for h in resumed.metrics_history if h["resumed_from_step"] != -1]
    assert restarts and len(set(restarts)) == 1 and restarts[0] in (3, 6), restarts

    # the same chips, in the same order, at every step (the killed attempt's and the resumed one's)
    after_resume = [r for r in resumed_rows if r["pid"] == resumed_rows[-1]["pid"]]
    assert [r["step"] for r in after_resume] == list(range(restarts[0] + 1, STEPS + 1))
    by_step = {r["step"]: (r["epoch"], r["chips"]) for r in full_rows}
    assert len(by_step) == STEPS
    for r in resumed_rows:
        assert (r["epoch"], r["chips"]) == by_step[r["step"]], f"step {r['step']}: other chips than uninterrupted"

    # the same schedules at every report after the resume, and the same final parameters
    keys = ("step", "epoch", "lr", "tau", "wd")
    assert [{k: h[k] for k in keys} for h in resumed.metrics_history] == \
        [{k: h[k] for k in keys} for h in full.metrics_history]
    assert full_weights.keys() == resumed_weights.keys()
    worst = max((full_weights[k].double() - resumed_weights[k].double()).abs().max().item() for k in full_weights)
    assert worst <= 1e-6, f"max abs parameter difference {worst:g} after resuming at step {restarts[0]}"
    record_figure(f"sigkill at step {FAULT_STEP}, resumed mid-epoch: same parameters as uninterrupted",
                  final_step=resumed.final_step, resumed_from_step=restarts[0], steps_lost=FAULT_STEP - restarts[0],
                  max_abs_param_diff=worst, same_chips_after_resume=True,
                  recovery_s=round(after_resume[0]["t"] - os.path.getmtime(marker), 1),
                  test="tests/train/test_resume_equivalence_ray.py")
