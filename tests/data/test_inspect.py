"""inspect_dataset re-reads a dataset: counts, shapes, value ranges, bad rows, quarantine, lineage."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from sarjepa_dist import storage
from sarjepa_dist.data.ingest import ingest_images
from sarjepa_dist.data.inspect import format_inspection, inspect_dataset
from sarjepa_dist.data.shards import ChipRecord, ShardWriter


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root: str) -> str:
    files = {
        "cat/0.png": _png(np.full((20, 20), 10, np.uint8)),
        "cat/1.png": _png(np.full((24, 20), 30, np.uint8)),
        "dog/0.png": _png(np.full((20, 22), 200, np.uint8)),
        "dog/broken.png": b"definitely not a png",
        "dog/zero.png": _png(np.zeros((20, 20), np.uint8)),
    }
    for rel, data in files.items():
        storage.write_bytes(storage.join(root, rel), data)
    return root


@pytest.fixture(params=["local", "s3"])
def dataset(request, tmp_path):
    if request.param == "local":
        base = str(tmp_path)
    else:
        base = request.getfixturevalue("s3_bucket")
    src = _tree(storage.join(base, "src"))
    dest = storage.join(base, "ds")
    ingest_images(src, dest, 16, max_bad_fraction=0.5, sensor="unit", command=["sarjepa", "ingest", "images"])
    return src, dest


def test_inspect_contents(dataset):
    src, dest = dataset
    info = inspect_dataset(dest)
    json.dumps(info)  # JSON-able throughout
    lin = info["lineage"]
    assert lin["source"] == src and lin["command"] == ["sarjepa", "ingest", "images"]
    assert lin["crop_policy"] == {"mode": "center", "size": 16, "padded": 0} and len(lin["dataset_id"]) == 64
    assert info["manifest"]["chip_shape"] == [1, 16, 16] and info["manifest"]["chip_dtype"] == "uint8"
    assert info["counts"]["per_class"] == {"cat": 2, "dog": 1}
    assert info["scan"]["complete"] and info["scan"]["rows_scanned"] == 3
    assert info["scan"]["shapes"] == {"1x16x16 uint8": 3}
    assert all(s["sha256_ok"] for s in info["scan"]["shards"])
    v = info["values"]
    assert (v["min"], v["max"]) == (10.0, 200.0)
    assert v["mean"] == pytest.approx((10 + 30 + 200) / 3)
    assert v["percentiles"]["p50"] == 30.0 and v["percentiles"]["p1"] == 10.0
    assert info["bad_rows"]["total"] == 0
    assert info["quarantine"]["total"] == 2
    assert info["quarantine"]["by_reason"] == {"all_zero": 1, "undecodable": 1}
    assert info["metadata"]["sensor"]["top_values"] == {"unit": 3}
    assert info["problems"] == []

    text = format_inspection(info)
    for needle in ("dataset_id", "cat", "dog", "1x16x16 uint8", "quarantine   2", "dog/broken.png",
                   "undecodable", "min 10", "max 200", "problems     none", "sarjepa ingest images"):
        assert needle in text, needle


def test_inspect_finds_bad_rows_and_tampering(tmp_path):
    root = str(tmp_path / "ds")
    with ShardWriter(root, class_names=["a", "b"], source="handmade", command=["t"],
                     target_shard_mib=2 * 4 * 4 * 4 / 2**20) as w:
        w.add(ChipRecord("ok1", np.full((1, 4, 4), 2.0, np.float32), label=0, class_name="a"))
        w.add(ChipRecord("ok2", np.full((1, 4, 4), 4.0, np.float32), label=1, class_name="b"))
        w.add(ChipRecord("nan", np.full((1, 4, 4), np.nan, np.float32), label=1, class_name="b"))
        w.add(ChipRecord("ok1", np.full((1, 4, 4), 1.0, np.float32), label=1, class_name="a"))  # dup, mismatch
        man = w.commit()
    info = inspect_dataset(root)
    assert info["bad_rows"]["by_reason"] == {"nan_or_inf": 1}
    assert info["bad_rows"]["examples"][0]["chip_id"] == "nan"
    assert info["scan"]["duplicate_chip_ids"] == 1 and info["scan"]["label_mismatches"] == 1
    assert (info["values"]["min"], info["values"]["max"]) == (1.0, 4.0)
    assert len(info["problems"]) == 3

    # max_rows: a partial scan, flagged as such, with no false row-count complaints
    part = inspect_dataset(root, max_rows=3)
    assert part["scan"]["rows_scanned"] == 3 and not part["scan"]["complete"]
    assert "partial" in format_inspection(part)

    shard = tmp_path / "ds" / man.shards[1].path
    shard.write_bytes(shard.read_bytes() + b"junk")
    info = inspect_dataset(root)
    assert info["scan"]["shards"][1]["sha256_ok"] is False
    assert any("sha256 differs" in p for p in info["problems"])
    assert "PROBLEMS" in format_inspection(info)


def test_inspect_multichannel_stats(tmp_path):
    root = str(tmp_path / "ds")
    with ShardWriter(root, command=["t"]) as w:
        for i in range(3):
            chip = np.stack([np.full((4, 4), 1.0 + i), np.full((4, 4), 10.0 + i)]).astype(np.float32)
            w.add(ChipRecord(f"c{i}", chip))
        w.commit()
    info = inspect_dataset(root)
    ch = info["values"]["per_channel"]
    assert [c["mean"] for c in ch] == [pytest.approx(2.0), pytest.approx(11.0)]
    assert info["counts"]["per_class"] == {"<unlabelled>": 3}
    assert "unlabelled" in format_inspection(info) and "channel 1" in format_inspection(info)
