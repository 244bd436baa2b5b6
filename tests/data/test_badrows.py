"""Bad-row accounting: exact under task retries and resumes, persistent, and unreadable shards
quarantined by name and counted (no Ray: the tally's class and the reader run in-process)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.fs as pafs
import pytest

from sarjepa_dist import storage
from sarjepa_dist.config import DataConfig, GradientConfig
from sarjepa_dist.data import shards
from sarjepa_dist.data.badrows import BadDataError, TaskTallies, _BadRowCounter, block_key
from sarjepa_dist.data.pipeline import _read_one_shard, _read_shards, _Spec

SHAPE = (1, 16, 16)
ROWS_PER_SHARD = 40


def _chip(rng: np.random.Generator) -> np.ndarray:
    return (rng.random(SHAPE) + 0.1).astype(np.float32)


@pytest.fixture
def dataset(tmp_path):
    """Two shards of 40 chips (row groups of 8); chip c00007 of the first shard is NaN."""
    rng = np.random.default_rng(0)
    root = str(tmp_path / "ds")
    with shards.ShardWriter(root, command=["test"], row_group_rows=8,
                            target_shard_mib=ROWS_PER_SHARD * 1024 / 2**20) as w:
        for i in range(2 * ROWS_PER_SHARD):
            chip = _chip(rng)
            if i == 7:
                chip[0, 1, 1] = np.nan
            w.add(shards.ChipRecord(f"c{i:05d}", chip))
        manifest = w.commit()
    assert [s.rows for s in manifest.shards] == [ROWS_PER_SHARD, ROWS_PER_SHARD]
    return root, manifest


def _spec(root: str, epoch: int = 0) -> _Spec:
    cfg = DataConfig(path=root, img_size=16, channels=1)
    return _Spec(cfg, GradientConfig(radii=(2,)), ("x",), True, epoch, SHAPE, "")


def _read(root: str, manifest: shards.Manifest, tally: _BadRowCounter, epoch: int = 0,
          filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Read every shard like the pipeline's read tasks; the chip ids delivered."""
    ids: list[str] = []
    for info in manifest.shards:
        path = storage.join(root, info.path)
        for block in _read_one_shard(path, info.rows, spec=_spec(root, epoch),
                                     filesystem=filesystem or pafs.LocalFileSystem(), tracker=tally):
            ids += block.column("chip_id").to_pylist()
    return ids


def _corrupt_middle(path: str) -> None:
    """Flip bytes in the second half of a Parquet file: the first row groups still read."""
    data = bytearray(open(path, "rb").read())
    for pos in (len(data) // 2, len(data) * 3 // 4):
        for k in range(200):
            data[pos + k] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_retried_reads_are_counted_once(dataset):
    root, manifest = dataset
    tally = _BadRowCounter()
    first = _read(root, manifest, tally)
    again = _read(root, manifest, tally)  # a retried task re-sends the same keys
    assert first == again and len(first) == 79
    snap = tally.snapshot()
    assert snap["counts"] == {"nan_or_inf": 1} and snap["seen"] == 80
    assert snap["duplicates"] == 2  # both shards' blocks were re-reported and ignored
    _read(root, manifest, tally, epoch=1)  # another epoch is counted again
    assert tally.snapshot()["counts"] == {"nan_or_inf": 2} and tally.snapshot()["seen"] == 160


class _CountingTracker:
    """A tracker stand-in: the real tally behind it, and every call the read task makes to it."""

    def __init__(self):
        self.tally = _BadRowCounter()
        self.calls: list[int] = []  # tallies per call

    def report(self, *args, **kwargs):
        raise AssertionError("a read task must not wait on the tracker for each block")

    def report_many(self, reports):
        self.calls.append(len(reports))
        return self.tally.report_many(reports)


def test_a_read_task_sends_its_tallies_once_when_its_reading_ends(dataset, monkeypatch):
    from sarjepa_dist.data import pipeline

    monkeypatch.setattr(pipeline, "READ_BLOCK_ROWS", 8)  # 5 blocks a shard, so 10 tallies in the task
    root, manifest = dataset
    tracker = _CountingTracker()
    items = {"path": np.array([storage.join(root, s.path) for s in manifest.shards]),
             "rows": np.array([s.rows for s in manifest.shards])}
    blocks = _read_shards(items, spec=_spec(root), tracker=tracker)
    ids = list(next(blocks).column("chip_id").to_pylist())
    assert tracker.calls == []  # no wait on the actor while the task still reads
    for block in blocks:
        ids += block.column("chip_id").to_pylist()
    assert tracker.calls == [10] and len(ids) == 79
    assert tracker.tally.snapshot()["counts"] == {"nan_or_inf": 1} and tracker.tally.snapshot()["seen"] == 80

    # a retried task sends the same keys: nothing counted twice
    list(_read_shards(items, spec=_spec(root), tracker=tracker))
    assert tracker.calls == [10, 10] and tracker.tally.snapshot()["seen"] == 80
    assert tracker.tally.snapshot()["duplicates"] == 10

    # a task that stops early (a downstream error closes its generator) still sends what it read
    stopped = _read_shards(items, spec=_spec(root, epoch=1), tracker=tracker)
    next(stopped)
    stopped.close()
    assert tracker.calls == [10, 10, 1] and tracker.tally.snapshot()["seen"] == 88


def test_task_tallies_keep_what_a_report_says():
    tracker = _CountingTracker()
    tallies = TaskTallies(tracker)
    quarantined = {"shard": "s", "reason": "unreadable", "detail": "d", "rows": 3, "epoch": 2}
    tallies.report(8, {"nan_or_inf": 1}, [{"chip_id": "a"}], key="k1", epoch=2)
    tallies.report(3, {"unreadable": 3}, [], key="k2", epoch=2, quarantined=quarantined)
    assert tracker.calls == [] and tallies.flush() == 2 and tracker.calls == [2]
    assert tallies.flush() == 0 and tracker.calls == [2, 0]  # nothing pending: nothing new
    snap = tracker.tally.snapshot()
    assert snap["counts"] == {"nan_or_inf": 1, "unreadable": 3} and snap["seen"] == 11
    assert snap["quarantined"] == [quarantined] and snap["examples"] == [{"chip_id": "a"}]


def test_tally_survives_a_resume_exactly(dataset):
    root, manifest = dataset
    before = _BadRowCounter()
    _read(root, manifest, before, epoch=0)
    _read(root, manifest, before, epoch=1)
    saved = json.loads(json.dumps(before.state(close_before=1)))  # the checkpoint's copy, as JSON
    assert saved["closed_before"] == 1 and list(saved["blocks"]) == ["1"]  # epoch 0 folded to totals

    # a relaunch: a fresh tally restores the checkpoint, then re-reads the resumed epoch 1
    after = _BadRowCounter()
    after.restore(saved)
    _read(root, manifest, after, epoch=1)
    assert after.snapshot()["counts"] == {"nan_or_inf": 2} and after.snapshot()["seen"] == 160
    # a worker restart within a launch: the live tally (ahead of the checkpoint) merges it idempotently
    before.restore(saved)
    before.restore(saved)
    assert before.snapshot()["counts"] == {"nan_or_inf": 2} and before.snapshot()["seen"] == 160
    # a late report of a folded epoch is added (its keys are gone), never dropped
    before.report(8, {"all_zero": 1}, [], block_key(0, ["x"]), 0)
    assert before.snapshot()["counts"] == {"nan_or_inf": 2, "all_zero": 1}


def test_tally_restore_keeps_the_base_that_folded_more(dataset):
    root, manifest = dataset
    ahead = _BadRowCounter()
    for epoch in range(3):
        _read(root, manifest, ahead, epoch=epoch)
    old = ahead.state(close_before=1)  # saved while in epoch 1
    ahead.state(close_before=2)  # later, epoch 1 folded too
    ahead.restore(old)  # restoring the older checkpoint into the live tally changes nothing
    assert ahead.snapshot()["seen"] == 240 and ahead.snapshot()["counts"] == {"nan_or_inf": 3}


def test_corrupt_shard_mid_stream_is_quarantined_and_counted(dataset, monkeypatch):
    from sarjepa_dist.data import pipeline

    monkeypatch.setattr(pipeline, "READ_BLOCK_ROWS", 8)  # one block per row group: damage met mid-stream
    root, manifest = dataset
    bad_path = storage.join(root, manifest.shards[1].path)
    _corrupt_middle(bad_path)
    tally = _BadRowCounter()
    ids = _read(root, manifest, tally)
    snap = tally.snapshot()
    delivered_from_bad = [i for i in ids if int(i[1:]) >= ROWS_PER_SHARD]
    assert 0 < len(delivered_from_bad) < ROWS_PER_SHARD  # rows before the damage still arrive
    unreadable = snap["counts"]["unreadable"]
    assert 0 < unreadable < ROWS_PER_SHARD and snap["counts"]["nan_or_inf"] == 1
    # every row of the manifest is accounted for once: delivered, bad (the damage may also garble a
    # row that still decodes, e.g. into a negative amplitude) or unread
    assert snap["seen"] == 80 and len(ids) + sum(snap["counts"].values()) == 80
    (q,) = snap["quarantined"]
    assert q["shard"] == bad_path and q["rows"] == unreadable and "not a readable Parquet shard" in q["detail"]
    # a retry of the failed read reports the same quarantine key: still counted once
    _read(root, manifest, tally)
    assert tally.snapshot()["counts"] == snap["counts"] and len(tally.snapshot()["quarantined"]) == 1


@pytest.mark.parametrize("damage", ["truncated", "missing", "wrong_schema"])
def test_unreadable_shard_kinds(dataset, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, manifest = dataset
    path = storage.join(root, manifest.shards[0].path)
    if damage == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 3])
    elif damage == "missing":
        os.remove(path)
    else:  # a Parquet file without the chip columns
        pq.write_table(pa.table({"chip_id": ["a"] * 40, "other": list(range(40))}), path)
    tally = _BadRowCounter()
    ids = _read(root, manifest, tally)
    assert len(ids) == ROWS_PER_SHARD  # the other shard, whole
    snap = tally.snapshot()
    assert snap["counts"] == {"unreadable": ROWS_PER_SHARD} and snap["seen"] == 80
    (q,) = snap["quarantined"]
    assert q["shard"] == path
    expected = {"truncated": "not a readable Parquet shard", "missing": "file is missing",
                "wrong_schema": "not a readable Parquet shard"}[damage]
    assert expected in q["detail"], q["detail"]


def test_a_store_that_does_not_answer_is_a_storage_error_not_a_bad_shard(dataset):
    root, manifest = dataset

    class _Unreachable:  # the two calls the reader makes, failing like a refused connection
        def open_input_file(self, path):
            raise OSError("connection refused (test)")

        def get_file_info(self, path):
            raise OSError("connection refused (test)")

    tally = _BadRowCounter()
    with pytest.raises(storage.StorageError, match="storage does not answer"):
        _read(root, manifest, tally, filesystem=_Unreachable())
    assert tally.snapshot()["seen"] == 0 and not tally.snapshot()["quarantined"]


def test_bad_data_error_names_quarantined_shards():
    err = BadDataError({"unreadable": 40, "nan_or_inf": 1}, 80, 0.05,
                       [{"chip_id": None, "shard": "s3://b/ds/shard-00001.parquet", "reason": "unreadable",
                         "detail": "x"}],
                       [{"shard": "s3://b/ds/shard-00001.parquet", "reason": "unreadable",
                         "detail": "not a readable Parquet shard (ArrowInvalid: ...)", "rows": 40}])
    text = str(err)
    assert "41 of 80 rows are bad" in text and "s3://b/ds/shard-00001.parquet" in text
    assert "not a readable Parquet shard" in text and "data.max_bad_fraction" in text
    import pickle
    again = pickle.loads(pickle.dumps(err))  # Ray pickles it from the worker to the driver
    assert str(again) == text and again.quarantined == err.quarantined
