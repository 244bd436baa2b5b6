"""Shard format: round trips (local and S3), plain-reader compatibility, validation, atomic rewrite."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sarjepa_dist import storage
from sarjepa_dist.data import shards
from sarjepa_dist.data.shards import (
    BadChip, ChipRecord, Manifest, ShardError, ShardWriter, check_chip, decode_chip, encode_chip, load_arrays,
    read_manifest, read_table, shard_uris,
)


def _chips(n: int, dtype: str, shape=(1, 16, 16), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "float32":
        return rng.gamma(1.0, 1.0, size=(n, *shape)).astype(np.float32) + 1e-3
    hi = 255 if dtype == "uint8" else 65535
    return rng.integers(1, hi + 1, size=(n, *shape)).astype(dtype)


def _write(root: str, chips: np.ndarray, labelled: bool, target_shard_mib: float = 128.0) -> Manifest:
    names = ["cat", "dog", "emu"] if labelled else None
    with ShardWriter(root, class_names=names, source="synthetic", crop_policy={"mode": "none"},
                     target_shard_mib=target_shard_mib, command=["test"]) as w:
        for i, c in enumerate(chips):
            lab = i % 3 if labelled else None
            w.add(ChipRecord(f"c{i:04d}", c, label=lab, class_name=names[lab] if labelled else None,
                             depression_deg=17.0 if i % 2 else None, sensor="test", source_path=f"src/{i}.png"))
        return w.commit()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ds")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/datasets/ds"


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("labelled", [True, False])
def test_round_trip_multi_shard(root, dtype, labelled):
    chips = _chips(40, dtype)
    # shards cut every ~12 chips → 4 shards (the last one partial)
    man = _write(root, chips, labelled, target_shard_mib=12 * chips[0].nbytes / 2**20)
    assert len(man.shards) == 4
    assert man.num_chips == 40 and man.chip_shape == [1, 16, 16] and man.chip_dtype == dtype
    assert man.labelled is labelled
    assert sum(s.rows for s in man.shards) == 40
    if labelled:
        assert man.per_class_counts == {"cat": 14, "dog": 13, "emu": 13}
    else:
        assert man.per_class_counts == {"<unlabelled>": 40}

    again = read_manifest(root)
    assert again.dataset_id == man.dataset_id
    # sha256 of every shard as stored == manifest; dataset_id derives from them
    for info, uri in zip(man.shards, shard_uris(root)):
        payload = storage.read_bytes(uri)
        assert hashlib.sha256(payload).hexdigest() == info.sha256 and len(payload) == info.bytes
    assert man.dataset_id == hashlib.sha256("".join(s.sha256 for s in man.shards).encode()).hexdigest()
    table = read_table(root, verify=True)
    assert table.num_rows == 40

    arrays = load_arrays(root)
    np.testing.assert_array_equal(arrays.chips, chips)
    assert arrays.chips.dtype == np.dtype(dtype)
    assert arrays.bad == {}
    if labelled:
        np.testing.assert_array_equal(arrays.labels, np.arange(40) % 3)
    else:
        assert (arrays.labels == -1).all()
    assert np.isnan(arrays.metadata["depression_deg"][0]) and arrays.metadata["depression_deg"][1] == 17.0


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_plain_pyarrow_numpy_and_pandas_read(tmp_path, dtype):
    """Any Parquet reader decodes a chip with only numpy: the format's promise to outside tools."""
    root = str(tmp_path / "ds")
    chips = _chips(7, dtype, shape=(2, 8, 12))
    man = _write(root, chips, labelled=True)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    path = tmp_path / "ds" / manifest["shards"][0]["path"]
    t = pq.read_table(path)  # plain pyarrow, no package helpers
    rows = t.to_pylist()
    for i, row in enumerate(rows):
        arr = np.frombuffer(row["chip"], dtype=row["chip_dtype"]).reshape(row["chip_shape"])
        np.testing.assert_array_equal(arr, chips[i])
    import pandas as pd

    df = pd.read_parquet(path)
    assert list(df["chip_id"]) == [f"c{i:04d}" for i in range(7)]
    first = np.frombuffer(df["chip"].iloc[3], dtype=df["chip_dtype"].iloc[3]).reshape(list(df["chip_shape"].iloc[3]))
    np.testing.assert_array_equal(first, chips[3])
    assert list(df["class_name"][:3]) == ["cat", "dog", "emu"]
    assert man.shards[0].rows == 7


def _masked(chips: np.ndarray) -> np.ndarray:
    """Float chips with a no-data border (zeros), as masked or padded products have."""
    out = np.zeros_like(chips)
    out[..., 4:12, 4:12] = chips[..., 4:12, 4:12]
    return out


@pytest.mark.parametrize("dtype, masked, chip_codec", [
    ("uint8", False, "ZSTD"), ("uint16", False, "ZSTD"), ("float32", False, "UNCOMPRESSED"),
    ("float32", True, "LZ4")])
def test_chip_column_codec_follows_the_chip_dtype(tmp_path, dtype, masked, chip_codec):
    """Quantised chips compress well under zstd; float speckle does not compress under lz4, so it is
    stored uncompressed (cheapest to read), and float chips lz4 does shrink keep lz4; every other
    column is zstd. The chips read back unchanged either way."""
    root = str(tmp_path / "ds")
    chips = _masked(_chips(9, dtype)) if masked else _chips(9, dtype)
    _write(root, chips, labelled=True)
    meta = pq.ParquetFile(shard_uris(root)[0]).metadata
    names = [meta.schema.column(i).path for i in range(meta.num_columns)]
    codecs = {name: meta.row_group(0).column(i).compression for i, name in enumerate(names)}
    assert codecs.pop("chip") == chip_codec
    assert set(codecs.values()) == {"ZSTD"}
    np.testing.assert_array_equal(load_arrays(root).chips, chips)
    assert shards.chip_compression("float64") == "lz4" and shards.chip_compression("int16") == "zstd"
    speckle = _chips(64, "float32").tobytes()
    assert shards.chip_compression("float32", speckle) == "none"
    assert shards.chip_compression("float32", _masked(_chips(64, "float32")).tobytes()) == "lz4"
    assert shards.chip_compression("uint8", speckle) == "zstd"


def test_rewrite_swaps_version_and_removes_old(tmp_path):
    root = str(tmp_path / "ds")
    m1 = _write(root, _chips(5, "uint8"), True)
    old_dir = m1.shards[0].path.split("/")[0]
    m2 = _write(root, _chips(6, "uint8", seed=1), True)
    assert m2.dataset_id != m1.dataset_id
    dirs = [p.name for p in (tmp_path / "ds").iterdir() if p.is_dir()]
    assert dirs == [m2.shards[0].path.split("/")[0]] and old_dir not in dirs
    assert read_table(root, verify=True).num_rows == 6


def test_exception_inside_writer_keeps_previous_dataset(root):
    m1 = _write(root, _chips(5, "uint8"), True)
    with pytest.raises(RuntimeError):
        with ShardWriter(root, class_names=["a"], target_shard_mib=1 / 4096, command=["x"]) as w:
            for i in range(20):  # several shards get flushed before the failure
                w.add(ChipRecord(f"n{i}", _chips(1, "uint8")[0], label=0, class_name="a"))
            raise RuntimeError("boom")
    assert read_manifest(root).dataset_id == m1.dataset_id
    assert read_table(root, verify=True).num_rows == 5
    assert [d.rsplit("/", 1)[-1] for d in storage.list_dirs(root)] == [m1.shards[0].path.split("/")[0]]


def test_commit_without_chips_is_refused(tmp_path):
    root = str(tmp_path / "ds")
    w = ShardWriter(root, command=["x"])
    w.add_quarantined("a.png", "undecodable", "bad")
    with pytest.raises(ShardError, match="no good chips"):
        w.commit()
    assert not storage.exists(storage.join(root, "manifest.json"))


def test_one_shape_and_valid_labels_per_dataset(tmp_path):
    w = ShardWriter(str(tmp_path / "ds"), class_names=["a", "b"], command=["x"])
    w.add(ChipRecord("a", np.ones((1, 4, 4), np.uint8), label=0, class_name="a"))
    with pytest.raises(ShardError, match="one dataset holds one chip shape"):
        w.add(ChipRecord("b", np.ones((1, 4, 5), np.uint8), label=0))
    with pytest.raises(ShardError, match="differs"):
        w.add(ChipRecord("c", np.ones((1, 4, 4), np.uint16), label=0))
    with pytest.raises(ShardError, match="label 2 outside 0..1"):
        w.add(ChipRecord("d", np.ones((1, 4, 4), np.uint8), label=2))
    with pytest.raises(ShardError, match="target_shard_mib"):
        ShardWriter(str(tmp_path / "x"), target_shard_mib=0)


def test_check_chip_reasons():
    ok = np.ones((1, 4, 4), np.float32)
    check_chip(ok, (1, 4, 4))
    cases = {
        "wrong_shape": [np.ones((4, 4), np.float32), (ok, (1, 5, 5))],
        "nan_or_inf": [np.where(np.eye(4, dtype=bool)[None], np.nan, 1).astype(np.float32),
                       np.full((1, 4, 4), np.inf, np.float32)],
        "negative_amplitude": [-ok, np.full((1, 2, 2), -1, np.int16)],
        "all_zero": [np.zeros((1, 4, 4), np.uint8), np.zeros((2, 3, 3), np.float32)],
    }
    for reason, chips in cases.items():
        for c in chips:
            arr, shape = c if isinstance(c, tuple) else (c, None)
            with pytest.raises(BadChip) as ei:
                check_chip(arr, shape)
            assert ei.value.reason == reason


def test_encode_decode():
    chip = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)
    data, shape, dtype = encode_chip(chip.astype(">u2"))  # big-endian input is stored little-endian
    assert dtype == "uint16" and shape == [2, 3, 4] and data == chip.astype("<u2").tobytes()
    np.testing.assert_array_equal(decode_chip(data, shape, dtype), chip)
    with pytest.raises(BadChip) as ei:
        decode_chip(data[:-1], shape, dtype)
    assert ei.value.reason == "undecodable"
    with pytest.raises(BadChip):
        decode_chip(data, shape, "not-a-dtype")
    with pytest.raises(ShardError, match="not supported"):
        encode_chip(np.zeros((1, 2, 2), np.complex64))


def test_decode_checked_turns_every_failure_into_bad_chip():
    chip = np.arange(1, 13, dtype=np.float32).reshape(1, 3, 4)
    data, shape, dtype = encode_chip(chip)
    np.testing.assert_array_equal(shards.decode_checked(data, shape, dtype, (1, 3, 4)), chip)
    nan = chip.copy()
    nan[0, 0, 0] = np.nan
    cases = [
        ((data, None, dtype, None), "undecodable", "missing"),
        ((data, shape, None, None), "undecodable", "missing"),
        ((data[:-4], shape, dtype, None), "undecodable", "bytes"),
        ((data, shape, "not-a-dtype", None), "undecodable", "unknown dtype"),
        ((data, [-1, -1, 12], dtype, None), "undecodable", "unknown dimension"),  # numpy's ValueError
        ((data, [None, 3, 4], dtype, None), "undecodable", "int"),  # a TypeError from int(None)
        ((data, shape, dtype, (1, 4, 3)), "wrong_shape", "expected"),
        ((encode_chip(nan)[0], shape, dtype, None), "nan_or_inf", "non-finite"),
    ]
    for args, reason, detail in cases:
        with pytest.raises(BadChip) as ei:
            shards.decode_checked(*args)
        assert ei.value.reason == reason and detail in ei.value.detail, (args[1:], ei.value)


def test_load_arrays_counts_bad_rows(tmp_path):
    """Rows that slipped past ingest (here written directly) are counted by reason, not fatal."""
    root = str(tmp_path / "ds")
    with ShardWriter(root, command=["x"]) as w:
        w.add(ChipRecord("good", np.ones((1, 4, 4), np.float32)))
        w.add(ChipRecord("nan", np.full((1, 4, 4), np.nan, np.float32)))
        w.add(ChipRecord("zero", np.zeros((1, 4, 4), np.float32)))
        w.commit()
    arrays = load_arrays(root)
    assert arrays.chip_ids == ["good"] and arrays.bad == {"nan_or_inf": 1, "all_zero": 1}
    assert [r["chip_id"] for r in shards.iter_rows(root)] == ["good", "nan", "zero"]
    assert load_arrays(root, max_rows=1).chips.shape == (1, 1, 4, 4)


def test_manifest_errors(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json here"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ShardError, match="schema_version 99"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1, "shards": []}))
    with pytest.raises(ShardError, match="malformed"):
        read_manifest(str(tmp_path))


def test_tampered_shard_fails_verification(tmp_path):
    root = str(tmp_path / "ds")
    man = _write(root, _chips(4, "uint8"), True)
    p = tmp_path / "ds" / man.shards[0].path
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(ShardError, match="sha256 differs"):
        read_table(root, verify=True)
    with pytest.raises(ShardError, match="not a readable Parquet"):
        read_table(root)



def test_second_writer_into_a_dest_being_written_fails_fast(root):
    first = ShardWriter(root, command=["sarjepa", "ingest", "first"], class_names=["cat"])
    with first:
        first.add(ChipRecord("a0", _chips(1, "float32")[0], label=0, class_name="cat"))
        lock = json.loads(storage.read_text(storage.join(root, shards.LOCK_NAME)))
        assert lock["pid"] > 0 and lock["expires_at"] > lock["acquired_at"]
        second = ShardWriter(root, command=["x"])
        with pytest.raises(shards.DatasetLockedError, match="another writer is writing this dataset") as info:
            with second:
                pytest.fail("the second writer got in")
        assert shards.LOCK_NAME in str(info.value) and "pid" in str(info.value)
        first.commit()
    # the first writer's dataset is whole and its lock is gone: the next writer gets in
    assert read_manifest(root).num_chips == 1
    assert not storage.exists(storage.join(root, shards.LOCK_NAME))
    _write(root, _chips(3, "float32"), labelled=False)
    assert read_manifest(root).num_chips == 3


def test_a_dead_writers_expired_lock_is_taken_over(root):
    dead = shards.WriterLock(root, ttl_s=-1.0, owner="killed ingest").acquire()  # already expired
    assert dead.held and storage.exists(dead.uri)
    _write(root, _chips(2, "float32"), labelled=False)
    assert read_manifest(root).num_chips == 2
    assert not storage.exists(dead.uri)
