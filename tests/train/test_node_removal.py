"""A node is removed mid-run (``ray.cluster_utils.Cluster.remove_node``, its raylet and every process
on it killed, as a preempted machine goes): the run restarts on the spare node from the latest
checkpoint (``FailureConfig``), loses at most one checkpoint interval, ends at the exact step count,
and every epoch reads each chip exactly once across the ranks (by chip id).

Layout: a head node (driver, Train controller, Ray Data) and three worker nodes of one ``node_slot``
each for two train workers; the node of rank 1 goes, the third node takes its place.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
import ray.cloudpickle

from _figures import record_figure
from _train_helpers import (RecordChips, assert_exactly_once, assert_finite_losses, read_records,
                            simulated_cluster, tiny_config, write_chip_dataset)
from sarjepa_dist.train.loop import StepView

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.faults]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels to the workers by value

BATCH, WORKERS = 8, 2
CHIPS = 96  # 4 shards of 24; 48 per rank: 6 steps an epoch
STEPS_PER_EPOCH = CHIPS // (BATCH * WORKERS)
REMOVE_AFTER_STEP = STEPS_PER_EPOCH + 2  # two steps into epoch 1, after the checkpoint at its start


@dataclass(frozen=True)
class AwaitRemoval:
    """Step hook: after step ``step``, rank ``rank`` writes its node id to ``marker`` and waits there
    (up to ``timeout_s``) for the test to remove its node, so the node goes at a known step."""

    step: int
    rank: int
    marker: str
    timeout_s: float = 120.0

    def __call__(self, view: StepView) -> None:
        if view.step != self.step or view.rank != self.rank or os.path.exists(self.marker):
            return
        with open(self.marker + ".tmp", "w") as f:
            f.write(ray.get_runtime_context().get_node_id())
        os.replace(self.marker + ".tmp", self.marker)
        time.sleep(self.timeout_s)  # the node is removed under this worker
        raise RuntimeError(f"node of rank {view.rank} was not removed within {self.timeout_s} s")


def _remove_node_when_marked(cluster: Any, marker: str, fit: threading.Thread,
                             timeout_s: float = 300) -> tuple[str, float]:
    """Wait for ``marker`` (a node id), then remove that node; returns its id and the time it went."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(marker):
        assert fit.is_alive() and time.monotonic() < deadline, "the run never reached the removal step"
        time.sleep(0.5)
    with open(marker) as f:
        node_id = f.read().strip()
    [node] = [n for n in cluster.list_all_nodes() if n.node_id == node_id]
    assert node is not cluster.head_node, "the worker to remove shares the driver's node"
    cluster.remove_node(node, allow_graceful=False)
    return node_id, time.time()


def test_run_survives_a_removed_node(tmp_path):
    from sarjepa_dist.train.runner import run_pretrain

    root = str(tmp_path / "chips")
    write_chip_dataset(root, per_class=CHIPS // 4, num_bad=0, shard_chips=CHIPS // 4)
    records, marker = tmp_path / "records", str(tmp_path / "remove-node")
    records.mkdir()
    with simulated_cluster(worker_nodes=3, worker_cpus=1) as cluster:
        cfg = tiny_config(root, str(tmp_path / "runs"), "node-removed", ray={"address": cluster.address},
                          data={"batch_size": BATCH},
                          train={"steps": 2 * STEPS_PER_EPOCH, "num_workers": WORKERS,
                                 "checkpoint_every": STEPS_PER_EPOCH, "log_every": 3, "max_failures": 1})
        hooks = [RecordChips(str(records)), AwaitRemoval(REMOVE_AFTER_STEP, rank=1, marker=marker)]
        box: dict[str, Any] = {}
        fit = threading.Thread(target=_fit, args=(run_pretrain, cfg, hooks, box), daemon=True)
        fit.start()
        started = time.monotonic()
        removed, removed_at = _remove_node_when_marked(cluster, marker, fit)  # Cluster.remove_node: main thread
        fit.join(timeout=400)
        assert not fit.is_alive(), "the run did not finish after the node was removed"
        wall = time.monotonic() - started
    assert "error" not in box, box.get("error")
    result = box["result"]

    assert result.final_step == 2 * STEPS_PER_EPOCH
    assert_finite_losses(result.metrics_history)
    resumed = [h["resumed_from_step"] for h in result.metrics_history if h["resumed_from_step"] != -1]
    assert resumed and resumed[0] == STEPS_PER_EPOCH  # the latest checkpoint before the removal
    assert REMOVE_AFTER_STEP - resumed[0] <= cfg.train.checkpoint_every  # at most one interval lost
    assert [h["step"] for h in result.metrics_history] == [3, 6, 9, 12]  # no step reported twice
    last = result.metrics_history[-1]
    assert last["world_size"] == WORKERS and last["ranks_in_sync"]
    assert removed not in last["worker_nodes"] and len(set(last["worker_nodes"])) == WORKERS

    rows = read_records(str(records))
    all_chips = {f"c{i:05d}" for i in range(CHIPS)}
    for epoch, group in _finishing_group_by_epoch(rows).items():
        assert len(group) == WORKERS * STEPS_PER_EPOCH, f"epoch {epoch}: {len(group)} batches"
        assert_exactly_once(epoch, group, all_chips, batch=BATCH)
    assert any(r["node"] == removed for r in rows if r["epoch"] == 1)  # the removed node did train epoch 1
    final_group = _finishing_group_by_epoch(rows)[1]
    assert all(r["node"] != removed for r in final_group)
    record_figure(f"node of rank 1 removed after step {REMOVE_AFTER_STEP} (2 workers, 3 worker nodes)",
                  final_step=result.final_step, resumed_from_step=resumed[0],
                  steps_lost=REMOVE_AFTER_STEP - resumed[0], chips_read_twice_per_epoch=0,
                  recovery_s=round(min(r["t"] for r in final_group) - removed_at, 1), wall_s=round(wall, 1),
                  test="tests/train/test_node_removal.py")


def _finishing_group_by_epoch(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Per epoch, the records of the worker processes that recorded its last step (the group that
    finished it; a group lost with the node leaves records of steps that were redone)."""
    by_epoch: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_epoch[r["epoch"]].append(r)
    out = {}
    for epoch, rs in sorted(by_epoch.items()):
        last_step = max(r["step"] for r in rs)
        pids = {r["pid"] for r in rs if r["step"] == last_step}
        out[epoch] = [r for r in rs if r["pid"] in pids]
    return out


def _fit(run_pretrain, cfg, hooks, box):
    try:
        box["result"] = run_pretrain(cfg, resources_per_worker={"node_slot": 1.0}, step_hooks=hooks)
    except Exception as exc:  # reported by the test thread
        box["error"] = repr(exc)
