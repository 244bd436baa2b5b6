"""The Ray Data pipeline: exactly-once / equal splits, determinism, bad rows, placement agreement.

Shards are written here directly with ``ShardWriter`` (plus one hand-made shard of bad rows), so
these tests do not depend on the synthetic generator. The Ray tests share one module-scoped local
cluster and a handful of short pipeline runs; the data-placement pass of epoch 0 is run once and
reused by the tests that compare against it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import threading
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from sarjepa_dist import storage
from sarjepa_dist.config import AugmentConfig, DataConfig, GradientConfig
from sarjepa_dist.data import shards
from sarjepa_dist.data.badrows import BadDataError, BadRowTracker, BadRowWarning, _BadRowCounter
from sarjepa_dist.engine import make_inputs_on_device
from sarjepa_dist.data.pipeline import (
    _binary_views, _process_batch, _read_one_shard, _Spec, _validate_rows, build_dataset, chip_seed,
    dataset_tracker, file_shuffle_seed, pool_array, shards_per_read_task, split_for_consumers, stable_seed, transform_chip,
)
from sarjepa_dist.train.batches import iter_train_batches

CHIP_SHAPE = (1, 32, 32)
GOOD_SHARDS, PER_SHARD = 3, 20
GOOD_IN_BAD_SHARD = 4
NUM_GOOD = GOOD_SHARDS * PER_SHARD + GOOD_IN_BAD_SHARD  # 64
BAD_COUNTS = {"undecodable": 1, "nan_or_inf": 2, "wrong_shape": 1}
NUM_ROWS = NUM_GOOD + sum(BAD_COUNTS.values())  # 68
NEED = ("x", "gx", "gfeat")


# --------------------------------------------------------------------------- dataset helpers


def speckle(rng: np.random.Generator, shape=CHIP_SHAPE) -> np.ndarray:
    """Single-look-like amplitude: sqrt of unit-mean exponential intensity on a smooth scene."""
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    scene = 1.0 + 0.5 * np.sin(xx / 5.0 + rng.uniform(0, 6)) * np.cos(yy / 7.0)
    return (np.sqrt(rng.exponential(1.0, size=shape)) * scene).astype(np.float32) + 1e-3


def _row(chip_id: str, data: bytes, shape: list[int], dtype: str, label: int | None) -> dict[str, Any]:
    return {"chip_id": chip_id, "chip": data, "chip_shape": shape, "chip_dtype": dtype, "label": label,
            "class_name": None if label is None else ["a", "b"][label], "depression_deg": None,
            "azimuth_deg": None, "sensor": "test", "source_path": None}


def write_dataset(root: str, seed: int = 0) -> dict[str, np.ndarray]:
    """3 good shards of 20 chips + 1 shard mixing 4 good and 4 bad rows; returns the good chips."""
    rng = np.random.default_rng(seed)
    chip_bytes = int(np.prod(CHIP_SHAPE)) * 4
    good: dict[str, np.ndarray] = {}
    with shards.ShardWriter(root, class_names=["a", "b"], command=["test"],
                            target_shard_mib=PER_SHARD * chip_bytes / 2**20) as w:
        for i in range(GOOD_SHARDS * PER_SHARD):
            chip = speckle(rng)
            good[f"g{i:03d}"] = chip
            w.add(shards.ChipRecord(f"g{i:03d}", chip, label=i % 2, class_name=["a", "b"][i % 2]))
        manifest = w.commit()
    assert len(manifest.shards) == GOOD_SHARDS

    rows = []
    for i in range(GOOD_IN_BAD_SHARD):
        chip = speckle(rng)
        good[f"m{i}"] = chip
        rows.append(_row(f"m{i}", *shards.encode_chip(chip), label=None))
    data, shape, dtype = shards.encode_chip(speckle(rng))
    rows.append(_row("bad-undecodable", data[:-4], shape, dtype, 0))
    nan = speckle(rng)
    nan[0, 3, 4] = np.nan
    rows.append(_row("bad-nan", *shards.encode_chip(nan), label=1))
    inf = speckle(rng)
    inf[0, 0, 0] = np.inf
    rows.append(_row("bad-inf", *shards.encode_chip(inf), label=1))
    rows.append(_row("bad-shape", *shards.encode_chip(speckle(rng, (1, 16, 16))), label=0))
    rows = [rows[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]  # interleave good and bad
    table = pa.Table.from_pylist(rows, schema=shards.CHIP_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    payload = sink.getvalue()
    version_dir = manifest.shards[0].path.split("/")[0]
    rel = f"{version_dir}/shard-{GOOD_SHARDS:05d}.parquet"
    storage.write_bytes(storage.join(root, rel), payload)
    manifest.shards.append(shards.ShardInfo(rel, table.num_rows, hashlib.sha256(payload).hexdigest(), len(payload)))
    manifest.num_chips += table.num_rows
    manifest.dataset_id = hashlib.sha256("".join(s.sha256 for s in manifest.shards).encode()).hexdigest()
    storage.write_text(storage.join(root, shards.MANIFEST_NAME), manifest.to_json())
    return good


def data_cfg(path: str, **kw: Any) -> DataConfig:
    base = dict(path=path, img_size=24, channels=1, conditioning="log", transform_placement="data",
                batch_size=8, shuffle_buffer=16, seed=7, max_bad_fraction=0.1,
                augment=AugmentConfig(flips=True, rot90=True, crop_scale=(0.5, 1.0)))
    base.update(kw)
    return DataConfig(**base)


GRAD = GradientConfig(domain="gradient-by-ratio", radii=(2, 3), eps=1e-2, fuse="mean")


def reference(chip: np.ndarray, cfg: DataConfig, *, training: bool, epoch: int,
              chip_id: str) -> dict[str, torch.Tensor]:
    """What the pipeline must produce for one chip, computed in-process without Ray."""
    from sarjepa_dist.transforms import prepare_inputs

    amp = transform_chip(chip, cfg, training=training, epoch=epoch, chip_id=chip_id)
    feats = prepare_inputs(amp[None], cfg, GRAD, need=NEED)
    return {"amplitude": amp, **{k: feats[k][0] for k in NEED}}


def consume(iterators, cfg: DataConfig, *, epoch: int, drop_last: bool, tracker=None) -> list[list[dict]]:
    """Iterate every split concurrently (streaming_split needs all consumers pulling)."""
    results: list[list[dict]] = [[] for _ in iterators]
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            for batch in iter_train_batches(iterators[rank], cfg, epoch=epoch, device="cpu", rank=rank,
                                            drop_last=drop_last, tracker=tracker):
                results[rank].append(batch)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(iterators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a consumer hung"
    if errors:
        raise errors[0]
    return results


def by_chip(batches: list[dict], keys: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for b in batches:
        for j, cid in enumerate(b["chip_id"]):
            assert cid not in out, f"chip {cid} delivered twice"
            out[cid] = {k: b[k][j] for k in keys} | {"label": b["label"][j]}
    return out


# --------------------------------------------------------------------------- no Ray needed


def test_reader_counts_bad_rows_and_process_batch_transforms_the_rest(tmp_path):
    good = write_dataset(str(tmp_path / "ds"))
    manifest = shards.read_manifest(str(tmp_path / "ds"))
    uri = shards.shard_uris(str(tmp_path / "ds"), manifest)[-1]
    cfg = data_cfg(str(tmp_path / "ds"), transform_placement="device")
    spec = _Spec(cfg, GRAD, NEED, True, 0, CHIP_SHAPE, "")
    tally = _BadRowCounter()  # the actor's class, used in-process
    blocks = list(_read_one_shard(uri, 8, spec=spec, filesystem=pafs.LocalFileSystem(), tracker=tally))
    table = pa.concat_tables(blocks)
    assert sorted(table.column("chip_id").to_pylist()) == [f"m{i}" for i in range(GOOD_IN_BAD_SHARD)]
    snap = tally.snapshot()
    assert snap["seen"] == 8 and snap["counts"] == BAD_COUNTS and not snap["quarantined"]
    assert {e["chip_id"] for e in snap["examples"]} == {"bad-undecodable", "bad-nan", "bad-inf", "bad-shape"}
    assert all(e["shard"] == uri for e in snap["examples"])

    out = _process_batch(table, spec=spec)
    assert sorted(out["chip_id"]) == [f"m{i}" for i in range(GOOD_IN_BAD_SHARD)]
    assert out["amplitude"].shape == (GOOD_IN_BAD_SHARD, 1, 24, 24) and out["amplitude"].dtype == np.float32
    assert out["label"].tolist() == [-1] * GOOD_IN_BAD_SHARD  # unlabelled rows
    # the per-chip result does not depend on which batch the chip is in
    one = _process_batch(table.filter(pa.compute.equal(table["chip_id"], "m0")), spec=spec)
    assert one["chip_id"].tolist() == ["m0"]
    assert np.array_equal(one["amplitude"][0], out["amplitude"][list(out["chip_id"]).index("m0")])
    np.testing.assert_array_equal(
        one["amplitude"][0], transform_chip(good["m0"], cfg, training=True, epoch=0, chip_id="m0").numpy())

    # both placements hand Ray Data arrays held in Arrow's memory pool (see pool_array)
    assert _arrow_owned(out["amplitude"])
    data_spec = dataclasses.replace(spec, data_cfg=data_cfg(str(tmp_path / "ds"), transform_placement="data"))
    feats = _process_batch(table, spec=data_spec)
    for k in NEED:
        assert _arrow_owned(feats[k]), k
        assert feats[k].dtype == np.float32 and feats[k].shape[0] == GOOD_IN_BAD_SHARD

    # an empty batch gives zero rows with the right trailing shapes, in both placements
    for placement, key, trailing in (("device", "amplitude", (1, 24, 24)), ("data", "gfeat", None)):
        spec2 = dataclasses.replace(spec, data_cfg=data_cfg(str(tmp_path / "ds"), transform_placement=placement))
        empty = _process_batch(table.slice(0, 0), spec=spec2)
        assert empty[key].shape[0] == 0 and len(empty["chip_id"]) == 0
        if trailing:
            assert empty[key].shape[1:] == trailing


def _arrow_owned(arr: np.ndarray) -> bool:
    """Whether the memory under ``arr`` belongs to an Arrow buffer (Arrow's memory pool)."""
    owner: Any = arr
    while isinstance(owner, np.ndarray):
        owner = owner.base
    return isinstance(owner, pa.Buffer)


def test_pool_array_is_an_arrow_owned_writable_aligned_array():
    arr = pool_array((16, 1, 64, 64), np.float32)
    assert arr.shape == (16, 1, 64, 64) and arr.dtype == np.float32
    assert _arrow_owned(arr) and not _arrow_owned(np.zeros(3))
    assert arr.flags.writeable and arr.ctypes.data % 64 == 0
    torch.from_numpy(arr).fill_(2.0)  # torch writes straight into it (stack(out=...), copy_)
    assert float(arr.sum()) == 2.0 * arr.size
    assert pool_array((0, 1, 8, 8), np.float32).shape == (0, 1, 8, 8)


def _validate_row_by_row(table: pa.Table, expected: tuple[int, ...]) -> tuple[list[str], dict[str, int], list[tuple]]:
    """The reference: every row through shards.decode_checked on its own bytes."""
    kept, bad, examples = [], {}, []
    for row in table.to_pylist():
        try:
            shards.decode_checked(row["chip"], row["chip_shape"], row["chip_dtype"], expected)
            kept.append(row["chip_id"])
        except shards.BadChip as err:
            bad[err.reason] = bad.get(err.reason, 0) + 1
            examples.append((row["chip_id"], err.reason, err.detail))
    return kept, bad, examples


def test_block_validation_matches_row_by_row():
    """_validate_rows screens a block with whole-block reductions and looks at suspects alone: it must
    keep, count and describe exactly what decode_checked row by row does, in blocks that take the
    fast path and in blocks that cannot (mixed dtypes or shapes, short bytes, nulls)."""
    rng = np.random.default_rng(5)
    good = [speckle(rng) for _ in range(6)]

    def enc(chip_id, arr):
        data, shape, dtype = shards.encode_chip(arr)
        return {"chip_id": chip_id, "chip": data, "chip_shape": shape, "chip_dtype": dtype, "label": None}

    def variants(base: np.ndarray, kind: str) -> np.ndarray:
        x = base.copy()
        if kind == "nan":
            x[0, 3, 4] = np.nan
        elif kind == "inf":
            x[0, 0, 0] = np.inf
        elif kind == "-inf":
            x[0, 31, 31] = -np.inf
        elif kind == "negative":
            x[0, 5, 5] = -1e-6
        elif kind == "zero":
            x[:] = 0
        elif kind == "negzero":
            x[:] = -0.0
        elif kind == "one-pixel":
            x[:] = 0
            x[0, 7, 9] = 1e-30
        return x

    kinds = ["nan", "inf", "-inf", "negative", "zero", "negzero", "one-pixel"]
    uniform = [enc(f"g{i}", g) for i, g in enumerate(good)] + [enc(k, variants(good[0], k)) for k in kinds]
    ints = [enc(f"u{i}", (g * 100).astype(np.uint16)) for i, g in enumerate(good)] + [
        enc("u-zero", np.zeros(CHIP_SHAPE, np.uint16))]
    signed = [enc("s-good", (good[1] * 100).astype(np.int16)), enc("s-neg", -np.ones(CHIP_SHAPE, np.int16)),
              enc("s-zero", np.zeros(CHIP_SHAPE, np.int16))]
    mixed = uniform[:3] + ints[:2] + [enc("shape", speckle(rng, (1, 16, 16))), enc("f64", good[2].astype(np.float64))]
    short = dict(enc("short", good[3]), chip=enc("short", good[3])["chip"][:-4])
    null = dict(enc("null", good[4]), chip=None)
    noshape = dict(enc("noshape", good[4]), chip_shape=None)
    schema = pa.schema([("chip_id", pa.string()), ("chip", pa.binary()), ("chip_shape", pa.list_(pa.int64())),
                        ("chip_dtype", pa.string()), ("label", pa.int64())])
    spec = _Spec(data_cfg("unused"), GRAD, NEED, True, 0, CHIP_SHAPE, "")
    blocks = [uniform, ints, signed, mixed, uniform[:4] + [short], uniform[:2] + [null, noshape],
              uniform[:6], uniform[6:], []]
    for rows in blocks:
        table = pa.Table.from_pylist(rows, schema=schema)
        for t in (table, table.slice(1) if len(rows) > 1 else table):  # a sliced block too (buffer offsets)
            kept, bad, examples = _validate_row_by_row(t, CHIP_SHAPE)
            got, got_bad, got_examples = _validate_rows(t, spec)
            assert got.column("chip_id").to_pylist() == kept, [r["chip_id"] for r in rows]
            assert got_bad == bad
            assert [(e["chip_id"], e["reason"], e["detail"]) for e in got_examples] == examples
    # the zero-copy views hold the same bytes as to_pylist, nulls as None
    table = pa.Table.from_pylist(uniform[:3] + [null], schema=schema)
    assert [None if v is None else bytes(v) for v in _binary_views(table.column("chip").slice(1))] == \
        table.column("chip").slice(1).to_pylist()


def test_shards_per_read_task():
    """Small shards share a read task (about READ_TASK_ROWS rows), big ones do not, and the
    cluster's CPUs always get several tasks each."""
    from sarjepa_dist.data import pipeline

    assert shards_per_read_task([], 4) == 1
    assert shards_per_read_task([pipeline.READ_TASK_ROWS * 2] * 50, 2) == 1
    assert shards_per_read_task([128] * 94, 2) == pipeline.READ_TASK_ROWS // 128 == 8
    assert shards_per_read_task([128] * 20, 2) == 20 // (2 * pipeline.READ_TASKS_PER_CPU)  # CPUs keep work
    assert shards_per_read_task([10] * 4, 4) == 1  # the tests' small datasets: one task per file


def test_read_workers_to_warm_fill_the_cpus_the_trainer_leaves():
    from sarjepa_dist.data.pipeline import read_workers_to_warm

    assert read_workers_to_warm(4, 1) == 3
    assert read_workers_to_warm(4, 2.5) == 1
    assert read_workers_to_warm(2, 2) == 1  # a data task still needs a worker
    assert read_workers_to_warm(64, 8) == 8 and read_workers_to_warm(64, 8, most=4) == 4


def test_warm_read_workers_import_the_transforms_in_the_given_environment(ray_local):
    import ray

    from sarjepa_dist.data.pipeline import warm_read_workers
    from sarjepa_dist.train.runner import _train_controller_env

    env = _train_controller_env()
    # what TorchTrainer.fit gives its controller (and so the trainer's Ray Data tasks): if Ray
    # moves it, the warm workers land in another pool, and this says so
    assert "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC" in env, env
    refs = warm_read_workers(reserved_cpus=3.0, env_vars=env)  # 4 CPUs in ray_local
    assert len(refs) == 1
    assert isinstance(ray.get(refs[0], timeout=120), int)


def test_seeds_and_file_order_are_stable():
    assert stable_seed("a", 1) == stable_seed("a", 1) != stable_seed("a", 2)
    assert chip_seed(0, 0, "c1") != chip_seed(0, 1, "c1") != chip_seed(1, 0, "c1")
    # pinned value: the seed must not change between processes or releases (hash() of str would)
    assert stable_seed("augment", 0, 0, "c1") == int.from_bytes(
        hashlib.blake2b(b"augment\x1f0\x1f0\x1fc1", digest_size=8).digest(), "little") & (2**63 - 1)
    assert file_shuffle_seed(3, 0) == file_shuffle_seed(3, 0) != file_shuffle_seed(3, 1)
    assert 0 <= file_shuffle_seed(3, 0) < 2**32


def test_transform_chip_training_vs_eval():
    rng = np.random.default_rng(1)
    chip = speckle(rng)
    cfg = data_cfg("unused")
    a = transform_chip(chip, cfg, training=True, epoch=0, chip_id="c")
    assert a.shape == (1, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, transform_chip(chip, cfg, training=True, epoch=0, chip_id="c"))
    assert not torch.equal(a, transform_chip(chip, cfg, training=True, epoch=1, chip_id="c"))
    e = transform_chip(chip, cfg, training=False, epoch=5, chip_id="c")
    assert torch.equal(e, transform_chip(chip, cfg, training=False, epoch=0, chip_id="other"))


def test_step_inputs_both_placements():
    from sarjepa_dist.transforms import prepare_inputs

    cfg = data_cfg("unused")  # data placement: the batch already holds x/gx
    dev_cfg = dataclasses.replace(cfg, transform_placement="device")
    amp = torch.rand(2, 1, 24, 24) + 0.1
    feats = prepare_inputs(amp, cfg, GRAD, need=("x", "gx"))
    dev = make_inputs_on_device({"amplitude": amp}, dev_cfg, GRAD, ("x", "gx"))
    assert all(torch.equal(dev[k], feats[k]) for k in ("x", "gx"))
    assert make_inputs_on_device(dict(feats), cfg, GRAD, ("gx",)).keys() == {"gx"}
    with pytest.raises(KeyError, match="gfeat"):
        make_inputs_on_device(dict(feats), cfg, GRAD, ("gfeat",))
    with pytest.raises(ValueError):
        make_inputs_on_device(dict(feats), cfg, GRAD, ("nope",))


# --------------------------------------------------------------------------- Ray (local cluster + S3)


@pytest.fixture(scope="module")
def s3_dataset(s3_endpoint):
    import boto3

    bucket = f"pipe-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/ds"
    return root, write_dataset(root)


@pytest.fixture(scope="module")
def epoch0_data(ray_local, s3_dataset):
    """One pass of epoch 0, transform_placement=data, over 2 consumers, every good chip once."""
    root, _ = s3_dataset
    cfg = data_cfg(root, transform_placement="data")
    run = f"t-{uuid.uuid4().hex[:8]}"
    ds = build_dataset(cfg, GRAD, need=NEED, training=True, epoch=0, run_name=run)
    tracker = dataset_tracker(ds)
    with pytest.warns(BadRowWarning, match="bad-"):
        results = consume(split_for_consumers(ds, 2, equal=False), cfg, epoch=0, drop_last=False, tracker=tracker)
    snap = tracker.snapshot()
    tracker.kill()
    return cfg, results, snap


@pytest.mark.ray
@pytest.mark.s3
def test_every_good_chip_once_across_consumers(epoch0_data, s3_dataset):
    cfg, results, snap = epoch0_data
    _, good = s3_dataset
    per_rank = [by_chip(r, NEED) for r in results]
    assert not set(per_rank[0]) & set(per_rank[1])
    delivered = per_rank[0] | per_rank[1]
    assert sorted(delivered) == sorted(good)  # bad rows excluded, good rows exactly once
    assert snap["counts"] == BAD_COUNTS and snap["seen"] == NUM_ROWS
    assert {e["chip_id"] for e in snap["examples"]} == {"bad-undecodable", "bad-nan", "bad-inf", "bad-shape"}
    assert all(e["shard"].startswith("s3://") and e["shard"].endswith(".parquet") for e in snap["examples"])
    # every batch is full except at most the last of each rank (drop_last=False)
    for r in results:
        assert all(len(b["chip_id"]) == cfg.batch_size for b in r[:-1])
    # values equal the in-process reference (same seed, whatever batch/worker/consumer the chip took)
    for cid, got in delivered.items():
        ref = reference(good[cid], cfg, training=True, epoch=0, chip_id=cid)
        for k in NEED:
            assert got[k].dtype == torch.float32
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{cid} {k}")
    assert {int(v["label"]) for c, v in delivered.items() if c.startswith("m")} == {-1}
    assert {int(v["label"]) for c, v in delivered.items() if c.startswith("g")} == {0, 1}


@pytest.mark.ray
@pytest.mark.s3
def test_device_placement_matches_data_placement(epoch0_data, s3_dataset):
    """Same seed, other placement: prepare_inputs on the emitted amplitude gives the same numbers."""
    cfg_data, results, _ = epoch0_data
    root, good = s3_dataset
    cfg = dataclasses.replace(cfg_data, transform_placement="device")
    ds = build_dataset(cfg, GRAD, need=NEED, training=True, epoch=0, run_name=f"t-{uuid.uuid4().hex[:8]}")
    dev = consume(split_for_consumers(ds, 2, equal=False), cfg, epoch=0, drop_last=False)
    dataset_tracker(ds).kill()
    assert all("x" not in b and b["amplitude"].shape[1:] == (1, 24, 24) for r in dev for b in r)
    dev_feats: dict[str, dict[str, torch.Tensor]] = {}
    for r in dev:
        for b in r:
            feats = make_inputs_on_device(b, cfg, GRAD, NEED)  # what the train step does on the device
            for j, cid in enumerate(b["chip_id"]):
                dev_feats[cid] = {k: feats[k][j] for k in NEED}
    data_feats = by_chip(results[0] + results[1], NEED)
    assert dev_feats.keys() == data_feats.keys() == good.keys()
    for cid in good:
        for k in NEED:
            # bit-identical on CPU: the same function on the same per-chip amplitude, and
            # prepare_inputs is per chip (no batch statistics), so batch composition cannot matter
            assert torch.equal(dev_feats[cid][k], data_feats[cid][k]), f"{cid} {k}"


@pytest.mark.ray
@pytest.mark.s3
def test_equal_split_gives_equal_batch_counts(ray_local, s3_dataset):
    root, good = s3_dataset
    cfg = data_cfg(root, transform_placement="device", batch_size=6)
    ds = build_dataset(cfg, GRAD, training=True, epoch=1, run_name=f"t-{uuid.uuid4().hex[:8]}")
    results = consume(split_for_consumers(ds, 2, equal=True), cfg, epoch=1, drop_last=True)
    dataset_tracker(ds).kill()
    counts = [len(r) for r in results]
    assert counts[0] == counts[1] > 0
    assert all(len(b["chip_id"]) == 6 for r in results for b in r)
    seen = [cid for r in results for b in r for cid in b["chip_id"]]
    assert len(seen) == len(set(seen)) and set(seen) <= good.keys()
    assert NUM_GOOD - len(seen) < 2 * cfg.batch_size  # the documented drop bound
    # epoch 1 augments differently from epoch 0 (same chips, new per-chip generators)
    e1 = by_chip([b for r in results for b in r], ("amplitude",))
    ref0 = {cid: reference(good[cid], cfg, training=True, epoch=0, chip_id=cid)["amplitude"] for cid in e1}
    assert sum(not torch.equal(e1[c]["amplitude"], ref0[c]) for c in e1) > len(e1) // 2
    for cid in list(e1)[:5]:
        assert torch.equal(e1[cid]["amplitude"],
                           transform_chip(good[cid], cfg, training=True, epoch=1, chip_id=cid))


@pytest.mark.ray
@pytest.mark.s3
def test_too_many_bad_rows_stops_the_run(ray_local, s3_dataset):
    root, _ = s3_dataset
    cfg = data_cfg(root, transform_placement="device", max_bad_fraction=0.01)
    ds = build_dataset(cfg, GRAD, training=True, epoch=0, run_name=f"t-{uuid.uuid4().hex[:8]}")
    tracker = dataset_tracker(ds)
    with pytest.raises(BadDataError) as info, pytest.warns(BadRowWarning):
        for _ in iter_train_batches(ds.iterator(), cfg, epoch=0, tracker=tracker):
            pass
    assert info.value.counts == BAD_COUNTS and info.value.seen == NUM_ROWS
    assert "nan_or_inf" in str(info.value) and "max_bad_fraction" in str(info.value)
    assert BadRowTracker.attach(tracker.run_name).counts() == BAD_COUNTS  # how train workers find it
    with pytest.raises(ValueError, match="no bad-row tracker"):
        BadRowTracker.attach("no-such-run")
    metrics = tracker.metrics()
    assert metrics["data/bad_rows"] == 4 and metrics["data/bad_rows/nan_or_inf"] == 2
    tracker.kill()


@pytest.mark.ray
def test_evaluation_local_path_exactly_once(ray_local, tmp_path_factory):
    """training=False over a local path: no augmentation, every good chip once, centre-resized."""
    root = str(tmp_path_factory.mktemp("evalds") / "ds")
    good = write_dataset(root, seed=3)
    cfg = data_cfg(root, transform_placement="data", batch_size=10)
    ds = build_dataset(cfg, GRAD, need=("x",), training=False, run_name=f"t-{uuid.uuid4().hex[:8]}")
    batches = consume(split_for_consumers(ds, 2, equal=False), cfg, epoch=0, drop_last=False)
    assert dataset_tracker(ds).counts() == BAD_COUNTS
    dataset_tracker(ds).kill()
    got = by_chip(batches[0] + batches[1], ("x",))
    assert sorted(got) == sorted(good)
    # one read task per shard file here (small shards share a task only when the cluster's CPUs
    # keep several tasks each, see shards_per_read_task): Ray fuses the read into the transform stage, whose batch_size
    # would otherwise bundle up to that many files into one task (all 4 here). A split's stats stay
    # with its consumers, so a second build is materialised to read them.
    again = build_dataset(cfg, GRAD, need=("x",), training=False, run_name=f"t-{uuid.uuid4().hex[:8]}")
    stats = again.materialize().stats()
    dataset_tracker(again).kill()
    tasks = re.search(r"MapBatches\(_read_shards\)\S*: (\d+) tasks executed", stats)
    assert tasks and int(tasks.group(1)) == len(shards.read_manifest(root).shards) == 4, stats
    for cid in list(good)[:10]:
        ref = reference(good[cid], cfg, training=False, epoch=0, chip_id=cid)["x"]
        torch.testing.assert_close(got[cid]["x"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_streams_into_ray_train_workers_with_ddp(ray_local, s3_dataset, tmp_path):
    """2 Train V2 workers × 2 epochs, an all-reduce per batch (Ray issue 66085: a rank with an
    extra batch would wait in it forever): equal batch counts, disjoint chips, new draws per epoch."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root, good = s3_dataset
    cfg = data_cfg(root, transform_placement="device", batch_size=5)
    run = f"t-{uuid.uuid4().hex[:8]}"
    tracker = BadRowTracker(run)  # on the driver: outlives the workers, shared by every epoch
    out_dir = str(tmp_path / "ranks")

    def train_loop(config: dict) -> None:  # nested: cloudpickled by value to the workers
        import json as _json
        import os as _os

        import ray.train as rt
        import torch as _torch
        import torch.distributed as dist

        from sarjepa_dist.train.batches import epoch_shard
        from sarjepa_dist.train.batches import iter_train_batches as itb

        rank, world = rt.get_context().get_world_rank(), rt.get_context().get_world_size()
        seen: dict[str, dict[str, float]] = {}
        for epoch in (0, 1):  # the loop's own per-epoch path: rank 0 builds and splits, then broadcasts
            shard = epoch_shard(config["cfg"], config["grad"], epoch=epoch, rank=rank, world=world,
                                need=("x", "gx"), run_name=config["run"])
            ids, steps = [], 0
            for batch in itb(shard, config["cfg"], epoch=epoch):
                total = _torch.ones(1)
                dist.all_reduce(total)  # hangs if the ranks' batch counts differ
                steps += 1
                ids += batch["chip_id"]
                for j, cid in enumerate(batch["chip_id"]):
                    seen.setdefault(cid, {})[str(epoch)] = float(batch["amplitude"][j].sum())
            _os.makedirs(config["out"], exist_ok=True)
            with open(f"{config['out']}/rank{rank}-epoch{epoch}.json", "w") as f:
                _json.dump({"steps": steps, "ids": ids, "sums": {c: v for c, v in seen.items()
                                                                    if str(epoch) in v}}, f)

    trainer = TorchTrainer(
        train_loop, train_loop_config={"cfg": cfg, "grad": GRAD, "run": run, "out": out_dir},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=run, storage_path=str(tmp_path / "runs")),
        torch_config=TorchConfig(backend="gloo", timeout_s=120),  # a hang fails in 2 min, not 30
    )
    trainer.fit()

    for epoch in (0, 1):
        r0, r1 = (json.load(open(f"{out_dir}/rank{r}-epoch{epoch}.json")) for r in (0, 1))
        assert r0["steps"] == r1["steps"] > 0
        assert not set(r0["ids"]) & set(r1["ids"]) and set(r0["ids"]) | set(r1["ids"]) <= good.keys()
        assert NUM_GOOD - len(r0["ids"]) - len(r1["ids"]) < 2 * cfg.batch_size
    # a chip seen in both epochs was augmented differently (per-chip generator keyed by epoch)
    sums = [json.load(open(f"{out_dir}/rank{r}-epoch{e}.json"))["sums"] for r in (0, 1) for e in (0, 1)]
    both = {}
    for s in sums:
        for cid, v in s.items():
            both.setdefault(cid, {}).update(v)
    twice = [v for v in both.values() if len(v) == 2]
    assert twice and sum(v["0"] != v["1"] for v in twice) > len(twice) // 2
    assert tracker.counts() == {k: 2 * v for k, v in BAD_COUNTS.items()}  # 2 epochs, one tally
    tracker.kill()
