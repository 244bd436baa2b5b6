"""Pretraining through an S3 outage. Chips and checkpoints live on the moto endpoint behind an
``OutageProxy`` (tests/_s3_proxy.py); a step hook marks the step, the test takes the store down for
``OUTAGE_S`` seconds, the hook lets the step go on:

* the store stalls every connection while the checkpoint of step 4 uploads, then refuses every
  connection while epoch 1 opens the manifest and streams its shards: the run rides both out on
  the configured retries (``storage.S3_RETRY_ATTEMPTS``, no worker restart), ends at the exact
  step, no shard is quarantined, and every checkpoint loads with its sha256 verified;
* with a retry budget of two attempts (SARJEPA_S3_RETRY_ATTEMPTS=2) an outage during the upload
  fails the run with a storage error, well inside the test's timeout; the checkpoint the run
  reports as its latest is the previous one, and it loads and verifies.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.cloudpickle

from _figures import record_figure
from _s3_proxy import OutageProxy
from _train_helpers import tiny_config, write_chip_dataset
from sarjepa_dist import storage
from sarjepa_dist.train.loop import StepView

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, pytest.mark.faults]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels to the workers by value

OUTAGE_S = float(os.environ.get("SARJEPA_TEST_OUTAGE_S", 15))  # the issue's ~15 s
STEPS, CHECKPOINT_EVERY = 8, 4  # 40 chips in 2 shards, batch 8: epoch 1 starts after step 5


@dataclass(frozen=True)
class AwaitOutage:
    """Step hook: after each step in ``steps`` (rank 0), create ``<folder>/step-<n>`` and wait (up to
    ``timeout_s``) for the test to answer with ``step-<n>.on``: the store is down from here."""

    steps: tuple[int, ...]
    folder: str
    timeout_s: float = 60.0

    def __call__(self, view: StepView) -> None:
        if view.rank != 0 or view.step not in self.steps:
            return
        mark = os.path.join(self.folder, f"step-{view.step}")
        if os.path.exists(mark):  # this step was reached before
            return
        Path(mark).touch()
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(mark + ".on") and time.monotonic() < deadline:
            time.sleep(0.1)


def _take_down_on_marks(proxy: OutageProxy, folder: Path, plan: dict[int, tuple[str, float]],
                        stop: threading.Event) -> threading.Thread:
    """For each step of ``plan`` (step -> (mode, seconds)), once its mark appears: an outage."""

    def watch() -> None:
        pending = dict(plan)
        while pending and not stop.is_set():
            for step, (mode, seconds) in list(pending.items()):
                if (folder / f"step-{step}").exists():
                    proxy.outage(seconds, mode=mode)
                    (folder / f"step-{step}.on").touch()
                    del pending[step]
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def store_behind_proxy(s3_endpoint, s3_bucket, monkeypatch):
    """A Ray cluster whose every S3 call, like this process's, goes through an ``OutageProxy``."""
    import ray

    with OutageProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setattr(storage, "_settings_override", None)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            root = f"{s3_bucket}/chips"
            write_chip_dataset(root, per_class=10, num_bad=0, shard_chips=20)
            yield proxy, root, f"{s3_bucket}/runs"
        finally:
            ray.shutdown()


def _config(root: str, runs: str, name: str):
    return tiny_config(root, runs, name, train={"steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY,
                                                "log_every": 2, "max_failures": 0})


def _load_verified(checkpoint_uri: str, cfg, tmp_path: Path) -> dict:
    """Download a checkpoint and load it (every file checked against its sha256 in meta.json)."""
    from sarjepa_dist.engine import build_method
    from sarjepa_dist.model.io import load_checkpoint_dir
    from sarjepa_dist.optim import build_optimizer

    local = storage.download_dir(checkpoint_uri, tmp_path / Path(checkpoint_uri).name)
    model, _ = build_method(cfg)
    state, _ = load_checkpoint_dir(local, model, build_optimizer(model, cfg.optim))
    return state


@pytest.mark.timeout(600)
def test_pretraining_rides_out_an_outage_during_upload_and_streaming(store_behind_proxy, tmp_path):
    from sarjepa_dist.train.export import find_checkpoint
    from sarjepa_dist.train.runner import run_pretrain

    proxy, root, runs = store_behind_proxy
    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = _config(root, runs, "outage")
    stop = threading.Event()
    _take_down_on_marks(proxy, marks, {CHECKPOINT_EVERY: ("stall", OUTAGE_S), 5: ("refuse", OUTAGE_S)}, stop)
    started = time.monotonic()
    try:
        result = run_pretrain(cfg, step_hooks=[AwaitOutage((CHECKPOINT_EVERY, 5), str(marks))])
    finally:
        stop.set()
        proxy.set_mode("up")
    assert (marks / "step-5.on").exists(), "the second outage never started"
    assert proxy.counts["stalled"] > 0 and proxy.counts["refused"] > 0, proxy.counts  # both met traffic
    assert result.final_step == STEPS
    assert all(h["resumed_from_step"] == -1 for h in result.metrics_history)  # retries alone, no restart
    last = result.metrics_history[-1]
    assert last["bad_shards_quarantined"] == 0 and last["bad_rows_total"] == 0  # an outage is no bad data
    for step in (CHECKPOINT_EVERY, STEPS):
        [uri] = [d for d in storage.list_dirs(result.storage_path) if Path(d).name.startswith(f"checkpoint_{step:08d}_")]
        assert _load_verified(uri, cfg, tmp_path)["step"] == step
    assert find_checkpoint(result.storage_path).step == STEPS
    record_figure(f"S3 down {OUTAGE_S:.0f} s during a checkpoint upload (stalled), then {OUTAGE_S:.0f} s "
                  "while the next epoch streams (refused)", final_step=result.final_step, steps_lost=0,
                  restarts=0, shards_quarantined=0, outage_s=2 * OUTAGE_S, wall_s=round(time.monotonic() - started, 1),
                  connections_stalled=proxy.counts["stalled"], connections_refused=proxy.counts["refused"],
                  test="tests/train/test_s3_outage_pretrain.py")


@pytest.mark.timeout(600)
def test_an_outage_past_the_retry_budget_fails_with_a_storage_error(store_behind_proxy, tmp_path, monkeypatch):
    from sarjepa_dist.cli import expected_failure
    from sarjepa_dist.train.export import find_checkpoint
    from sarjepa_dist.train.runner import run_pretrain

    proxy, root, runs = store_behind_proxy
    monkeypatch.setenv("SARJEPA_S3_RETRY_ATTEMPTS", "2")  # the workers' filesystems and the pickled one
    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = _config(root, runs, "outage-over-budget")
    stop = threading.Event()
    _take_down_on_marks(proxy, marks, {2 * CHECKPOINT_EVERY - 1: ("refuse", 3600)}, stop)
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as info:
            run_pretrain(cfg, step_hooks=[AwaitOutage((2 * CHECKPOINT_EVERY - 1,), str(marks))])
    finally:
        stop.set()
        proxy.set_mode("up")
    failure = expected_failure(info.value)
    assert isinstance(failure, storage.StorageError), f"not a storage error: {info.value!r}"
    # the first write of the checkpoint step fails: the TensorBoard upload or the checkpoint's own
    assert storage.join(runs, cfg.train.name) in str(failure) and "cannot" in str(failure), failure
    failed_after = time.monotonic() - started
    latest = find_checkpoint(storage.join(runs, cfg.train.name))
    assert latest.step == CHECKPOINT_EVERY  # the checkpoint whose upload failed is not taken
    assert _load_verified(latest.uri, cfg, tmp_path)["step"] == CHECKPOINT_EVERY
    record_figure("S3 down for good from step 7, retry budget 2 attempts", survived=False, failed_clearly=True,
                  error=storage.redact(str(failure))[:200], failed_after_s=round(failed_after, 1),
                  latest_checkpoint_step=latest.step, latest_checkpoint_verifies=True,
                  test="tests/train/test_s3_outage_pretrain.py")
