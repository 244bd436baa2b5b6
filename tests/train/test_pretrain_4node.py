"""Four ranks on four simulated nodes (``ray.cluster_utils.Cluster``, gloo), through the real training
loop: every epoch each chip goes to exactly one rank, once, and every rank takes the same number of
batches, although the shards are of unequal sizes. Then elastic training (Train V2's
``ScalingConfig(num_workers=(min, max))``, ``train.min_workers``): a run starts on three nodes, a
fourth joins between epochs, the group grows to four ranks from the latest checkpoint, and every
epoch is still exactly-once.

The chip ids come from a step hook (``StepView.chip_ids``), written by every rank to a shared folder.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import ray.cloudpickle

from _train_helpers import (
    RecordChips, add_worker_node, assert_exactly_once, assert_finite_losses, final_attempt_by_epoch, read_records,
    simulated_cluster, tiny_config, write_chip_dataset,
)
from sarjepa_dist import storage
from sarjepa_dist.train.loop import StepView

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks travel to the workers by value

SHARD_SIZES = (12, 36, 60, 84)  # 192 chips: 48 per rank over 4 ranks, 64 over 3; 6 or 8 batches of 8
BATCH = 8


@dataclass(frozen=True)
class HoldUntilWorld:
    """Step hook: once past ``after_step``, a group smaller than ``world`` waits (up to ``timeout_s``)
    for Train to resize it, so the resize lands at a known place instead of racing the run's end."""

    world: int
    after_step: int
    timeout_s: float = 120.0

    def __call__(self, view: StepView) -> None:
        deadline = time.monotonic() + self.timeout_s
        while view.world_size < self.world and view.step > self.after_step and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def three_node_cluster():
    """A head node (1 CPU, for Ray Data) and three worker nodes with one ``node_slot`` each."""
    with simulated_cluster(worker_nodes=3, worker_cpus=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("four-node-data") / "chips")
    manifest = write_chip_dataset(root, per_class=sum(SHARD_SIZES) // 4, seed=3, num_bad=0, shard_sizes=SHARD_SIZES)
    return root, manifest


def test_elastic_node_joins_between_epochs(three_node_cluster, dataset, tmp_path):
    """3 ranks for epoch 0 (8 steps), a fourth node joins, 4 ranks for epoch 1 (6 steps)."""
    from sarjepa_dist.train.runner import run_pretrain, run_uri

    root, manifest = dataset
    records = tmp_path / "records"
    records.mkdir()
    cfg = tiny_config(root, str(tmp_path / "runs"), "elastic", ray={"address": three_node_cluster.address},
                      data={"batch_size": BATCH},
                      train={"steps": 8 + 6, "num_workers": 4, "min_workers": 3,
                             "elastic_resize_interval_s": 1.0, "checkpoint_every": 8, "log_every": 4})
    hooks = [RecordChips(str(records)), HoldUntilWorld(world=4, after_step=8)]
    box: dict[str, Any] = {}
    fit = threading.Thread(target=lambda: box.update(result=_run(run_pretrain, cfg, hooks, box)), daemon=True)
    fit.start()
    # the fourth node joins once epoch 0's checkpoint exists (Cluster.add_node needs the main thread)
    deadline = time.monotonic() + 180
    while not _has_checkpoint(run_uri(cfg)) and fit.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    add_worker_node(three_node_cluster)
    fit.join(timeout=240)
    assert not fit.is_alive(), "the elastic run did not finish"
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.final_step == 14
    assert_finite_losses(result.metrics_history)
    assert result.metrics_history[-1]["world_size"] == 4 and result.metrics_history[-1]["ranks_in_sync"]

    epochs = final_attempt_by_epoch(read_records(str(records)))
    all_chips = {f"c{i:05d}" for i in range(manifest.num_chips)}
    assert sorted(epochs) == [0, 1]
    assert [epochs[e][0]["world"] for e in (0, 1)] == [3, 4]
    for epoch, rows in epochs.items():
        assert_exactly_once(epoch, rows, all_chips, batch=BATCH)
    assert len({r["node"] for r in epochs[1]}) == 4


def test_four_ranks_on_four_nodes_read_every_chip_once_per_epoch(three_node_cluster, dataset, tmp_path):
    from sarjepa_dist.train.runner import run_pretrain

    import ray

    if sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("node_slot")) < 4:
        add_worker_node(three_node_cluster)
        three_node_cluster.wait_for_nodes()
    root, manifest = dataset
    records = tmp_path / "records"
    records.mkdir()
    cfg = tiny_config(root, str(tmp_path / "runs"), "four-node", ray={"address": three_node_cluster.address},
                      data={"batch_size": BATCH},
                      train={"steps": 2 * 6, "num_workers": 4, "checkpoint_every": 6, "log_every": 6})
    result = run_pretrain(cfg, resources_per_worker={"node_slot": 1.0}, step_hooks=[RecordChips(str(records))])
    assert result.final_step == 12
    assert_finite_losses(result.metrics_history)
    last = result.metrics_history[-1]
    assert last["world_size"] == 4 and len(set(last["worker_nodes"])) == 4 and last["ranks_in_sync"]

    rows = read_records(str(records))
    epochs = final_attempt_by_epoch(rows)
    assert sorted(epochs) == [0, 1]
    assert all(len(rs) == len([r for r in rows if r["epoch"] == e]) for e, rs in epochs.items())  # no restarts
    all_chips = {f"c{i:05d}" for i in range(manifest.num_chips)}
    for epoch, rs in epochs.items():
        assert len(rs) == 4 * 6
        assert_exactly_once(epoch, rs, all_chips, batch=BATCH)


def _run(run_pretrain, cfg, hooks, box):
    try:
        return run_pretrain(cfg, resources_per_worker={"node_slot": 1.0}, step_hooks=hooks)
    except Exception as exc:  # reported by the test thread
        box["error"] = repr(exc)
        return None


def _has_checkpoint(uri: str) -> bool:
    try:
        return any(d.rstrip("/").split("/")[-1].startswith("checkpoint_") for d in storage.list_dirs(uri))
    except (OSError, FileNotFoundError):
        return False
