"""THE multi-node test: two DDP workers (gloo) on a two-node local Ray cluster, chips and checkpoints
on the S3 endpoint, then a relaunch under the same name that resumes from the saved step.

Each worker node carries one unit of a custom ``node_slot`` resource and each worker asks for one,
so the two ranks land on different nodes (checked through the node ids the loop reports). The
shards are of unequal sizes; a step hook records every batch's chip ids, so each complete epoch is
checked to read every good chip at most once, over both ranks, and never a bad one.
"""

from __future__ import annotations


import pytest

from _train_helpers import (
    NUM_BAD, RecordChips, assert_exactly_once, assert_finite_losses, bad_chip_ids, final_attempt_by_epoch,
    read_json, read_records, simulated_cluster, tiny_config, write_chip_dataset,
)
from sarjepa_dist import storage

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3]

@pytest.fixture(scope="module")
def two_node_cluster(s3_endpoint):
    """A head node (1 CPU, for Ray Data) and two worker nodes (2 CPUs and one node_slot each)."""
    with simulated_cluster(worker_nodes=2, worker_cpus=2) as cluster:
        yield cluster


SHARD_SIZES = (10, 30, 50, 70)  # 160 chips, 2 of them NaN: 79 good rows per rank, 9 batches of 8


def test_two_node_ddp_from_s3_with_resume(two_node_cluster, s3_bucket, tmp_path):
    from sarjepa_dist.train.runner import run_pretrain

    data_uri = storage.join(s3_bucket, "data", "chips")
    manifest = write_chip_dataset(data_uri, shard_sizes=SHARD_SIZES)
    good_chips = {f"c{i:05d}" for i in range(manifest.num_chips)} - set(bad_chip_ids(manifest.num_chips))
    runs_uri = storage.join(s3_bucket, "runs")
    sections = dict(ray={"address": two_node_cluster.address},
                    train={"steps": 24, "checkpoint_every": 8, "log_every": 4, "num_workers": 2,
                           "cpus_per_worker": 0.5, "num_to_keep": 2})
    cfg = tiny_config(data_uri, runs_uri, "multinode", **sections)
    node_slot = {"node_slot": 1.0}

    # ---- first launch: 24 steps = epochs 0, 1 (9 batches per rank each) and part of epoch 2
    records = [tmp_path / "records-first", tmp_path / "records-second"]
    for folder in records:
        folder.mkdir()
    first = run_pretrain(cfg, resources_per_worker=node_slot, step_hooks=[RecordChips(str(records[0]))])
    assert first.final_step == 24
    assert first.dataset_id == manifest.dataset_id
    assert first.latest_checkpoint_uri and first.latest_checkpoint_uri.startswith("s3://")
    history = first.metrics_history
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20, 24]
    assert_finite_losses(history)
    last = history[-1]
    assert last["world_size"] == 2 and last["epoch"] >= 2
    assert len(set(last["worker_nodes"])) == 2, "the two ranks must run on different nodes"
    # DDP kept the replicas bitwise identical at every checkpoint
    for h in history:
        if "param_sha256_per_rank" in h:
            assert len(h["param_sha256_per_rank"]) == 2 and h["ranks_in_sync"], h["param_sha256_per_rank"]
    assert last["bad_rows_total"] >= NUM_BAD  # all of epoch 0 was read, NaN chips included
    assert last["bad_rows/nan_or_inf"] >= NUM_BAD
    assert last["chips_seen"] == 24 * 2 * cfg.data.batch_size
    # by chip id, in the real loop: epochs 0 and 1 are complete, each good chip at most once per
    # epoch over both ranks (drop_last leaves out 79 - 72 = 7 per rank), epoch 2 is 6 steps in
    rows = read_records(str(records[0]))
    assert len(rows) == 24 * 2 and sum(len(r["chips"]) for r in rows) == last["chips_seen"]
    epochs = final_attempt_by_epoch(rows)
    assert sorted(epochs) == [0, 1, 2] and [len(epochs[e]) for e in (0, 1, 2)] == [18, 18, 12]
    batch = cfg.data.batch_size
    for epoch in (0, 1):
        assert_exactly_once(epoch, epochs[epoch], good_chips, batch=batch, missed=2 * 7)
    assert_exactly_once(2, epochs[2], good_chips, batch=batch, missed=len(good_chips) - 12 * batch)

    state = read_json(storage.join(first.latest_checkpoint_uri, "state.json"))
    meta = read_json(storage.join(first.latest_checkpoint_uri, "meta.json"))
    assert state["step"] == 24 and state["world_size"] == 2
    assert meta["dataset_id"] == manifest.dataset_id and meta["run_name"] == "multinode"
    assert meta["checkpoint_id"] == first.latest_checkpoint_uri.rstrip("/").split("/")[-1]
    tb = storage.list_files(storage.join(first.storage_path, "tensorboard"))
    assert tb and all("tfevents" in f for f in tb)

    # ---- relaunch with the same name and more steps: resumes at 24, schedules continue
    cfg2 = tiny_config(data_uri, runs_uri, "multinode",
                       **{**sections, "train": {**sections["train"], "steps": 36}})
    second = run_pretrain(cfg2, resources_per_worker=node_slot, step_hooks=[RecordChips(str(records[1]))])
    assert second.final_step == 36
    new_rows = [h for h in second.metrics_history if h.get("resumed_from_step", -1) == 24]
    assert new_rows, "no report came from the resumed run"
    assert new_rows[0]["step"] > 24
    assert [h["step"] for h in second.metrics_history] == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert_finite_losses(second.metrics_history)
    assert second.metrics_history[-1]["ranks_in_sync"]
    state2 = read_json(storage.join(second.latest_checkpoint_uri, "state.json"))
    assert state2["step"] == 36 and state2["schedules"]["total_steps"] == 36
    assert second.latest_checkpoint_uri != first.latest_checkpoint_uri
    # the resumed launch finishes epoch 2 (steps 25-27) and runs all of epoch 3 (steps 28-36)
    resumed = final_attempt_by_epoch(read_records(str(records[1])))
    assert sorted(resumed) == [2, 3] and [len(resumed[e]) for e in (2, 3)] == [6, 18]
    assert sorted({r["step"] for r in resumed[2]}) == [25, 26, 27]
    assert_exactly_once(3, resumed[3], good_chips, batch=batch, missed=2 * 7)
    # num_to_keep = 2: only the two newest checkpoints remain in the bucket
    ckpts = [d for d in storage.list_dirs(second.storage_path) if d.rstrip("/").split("/")[-1].startswith("checkpoint_0")]
    assert len(ckpts) == 2, ckpts
