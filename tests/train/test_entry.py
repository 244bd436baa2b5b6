"""The worker's entry point: light to import, and the first epoch streams before the loop is imported."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from sarjepa_dist import storage
from sarjepa_dist.config import config_from_dict
from sarjepa_dist.train.entry import decode_step_hooks, encode_step_hooks, start_loop


@pytest.fixture(autouse=True)
def _keep_storage_settings(monkeypatch):
    """start_loop configures this process's store, as a worker's should; later tests keep theirs."""
    monkeypatch.setattr(storage, "_settings_override", storage._settings_override)


class _FakeShard:
    """A DataIterator stand-in: ``iter_batches`` yields two blocks as Arrow tables (what the
    training iterator asks for: whole blocks, which it shuffles itself) and records the call."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.kwargs: dict = {}

    def iter_batches(self, **kwargs):
        self.kwargs = kwargs
        self.started.set()
        for i in range(2):
            chips = np.full((2, 1, 8, 8), float(i), dtype=np.float32)
            yield pa.table({"chip_id": [f"c{i}a", f"c{i}b"], "label": pa.array([0, 1], pa.int64()),
                            "amplitude": pa.FixedShapeTensorArray.from_numpy_ndarray(chips)})


class _FakeSession:
    rank, world_size, device = 0, 1, torch.device("cpu")

    def __init__(self, shard, checkpoint=None):
        self.shard, self.checkpoint = shard, checkpoint

    def first_dataset(self):
        return self.shard

    def restored_checkpoint(self):
        return self.checkpoint


def _loop_config(epoch: int = 0) -> dict:
    cfg = config_from_dict({"data": {"batch_size": 2, "shuffle_buffer": 4}})
    return {"config": cfg.to_dict(), "run": {"trainer_dataset_epoch": epoch}}


def test_importing_the_entry_point_leaves_the_model_code_unimported():
    code = ("import sys, torch, ray.train.torch\n"
            "import sarjepa_dist.train.entry\n"
            "heavy = [m for m in ('timm', 'sarjepa_dist.train.loop', 'sarjepa_dist.model', 'sarjepa_dist.engine')"
            " if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the entry point imports {out.stdout.strip()}"


def test_a_fresh_run_starts_its_first_epoch_before_the_loop():
    shard = _FakeShard()
    start = start_loop(_loop_config(), _FakeSession(shard))
    assert start.trainer_shard is shard and start.checkpoint is None
    assert start.cfg.data.batch_size == 2 and start.cfg.data.shuffle_buffer == 4
    assert start.first_stream is not None
    assert shard.started.wait(30), "the first epoch's stream did not start"
    assert shard.kwargs["batch_size"] is None and shard.kwargs["batch_format"] == "pyarrow"
    batches = list(start.first_stream)
    assert [len(b["chip_id"]) for b in batches] == [2, 2]
    rows = {cid: b["amplitude"][j] for b in batches for j, cid in enumerate(b["chip_id"])}
    assert sorted(rows) == ["c0a", "c0b", "c1a", "c1b"]
    assert all(torch.equal(chip, torch.full((1, 8, 8), float(cid[1]))) for cid, chip in rows.items())


def test_a_resumed_run_or_a_later_epoch_leaves_the_stream_to_the_loop():
    shard = _FakeShard()
    resumed = start_loop(_loop_config(), _FakeSession(shard, checkpoint=object()))
    assert resumed.first_stream is None and resumed.checkpoint is not None
    later = start_loop(_loop_config(epoch=3), _FakeSession(shard))
    assert later.first_stream is None
    assert not shard.started.is_set()


def test_step_hooks_travel_as_bytes_and_come_back_whole():
    blob = encode_step_hooks([max, {"every": 3}])
    assert isinstance(blob, bytes)
    assert decode_step_hooks(blob) == [max, {"every": 3}]
    assert decode_step_hooks(None) == [] and decode_step_hooks(encode_step_hooks([])) == []
