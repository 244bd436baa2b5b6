"""Ingest: image trees (with corrupt files), array stacks and scene tiling, local and S3."""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from sarjepa_dist import storage
from sarjepa_dist.data.ingest import (
    BadChip, IngestError, center_crop_or_pad, decode_image, ingest_arrays, ingest_images, ingest_scene,
    min_paddable_side,
)
from sarjepa_dist.data.shards import load_arrays, read_manifest, read_table

# The shared data sits beside the checkout (../shared), in development and in CI alike.
MSTAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mstar_soc_17deg"
SIZE = 32


# --------------------------------------------------------------------------- fixtures


def _ramp(h: int, w: int, dtype, lo: float = 1, hi: float = 250) -> np.ndarray:
    """A non-symmetric ramp (so crops and reflections are checkable), values in [lo, hi]."""
    y, x = np.mgrid[0:h, 0:w]
    v = lo + (hi - lo) * ((3 * y + 7 * x) % 97) / 96
    return v.astype(dtype)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _mixed_tree() -> dict[str, bytes]:
    """7 good files (uint8 PNG, 16-bit PNG, grey RGB JPEG, float TIFF; 2 need padding) + 6 bad ones."""
    big16 = _ramp(50, 50, np.uint16, 100, 60000)
    big16[25, 25] = 40000
    nan = _ramp(32, 32, np.float32, 0.1, 5.0)
    nan[16, 16] = np.nan
    good_png = _png(_ramp(40, 48, np.uint8))
    return {
        "alpha/a1.png": good_png,  # 40×48 → cropped
        "alpha/a2.png": _png(_ramp(32, 32, np.uint8)),  # exact
        "alpha/a3.png": _png(_ramp(20, 36, np.uint8)),  # 20 high → padded
        "alpha/trunc.png": good_png[: len(good_png) // 2],
        "alpha/empty.png": b"",
        "alpha/info.json": b"{}",  # not an image: ignored
        "beta/b1.png": _png(big16),  # 16-bit
        "beta/b2.jpg": _jpeg(np.repeat(_ramp(40, 44, np.uint8)[..., None], 3, axis=2)),  # RGB but grey
        "beta/notes.png": b"this is a text file, not a PNG\n",
        "beta/zero.png": _png(np.zeros((32, 32), np.uint8)),
        "gamma/g1.tif": _tiff(_ramp(32, 40, np.float32, 0.01, 3.0)),
        "gamma/g2.tiff": _tiff(_ramp(28, 28, np.float32, 0.01, 3.0)),  # padded
        "gamma/nan.tif": _tiff(nan),
        "gamma/neg.tif": _tiff(-_ramp(32, 32, np.float32, 0.1, 1.0)),
        "README.txt": b"not in a class folder",
    }


def _uint8_tree(sizes: dict[str, tuple[int, int]], per_class: int = 3, seed: int = 0) -> dict[str, bytes]:
    """MSTAR-like: one chip size per class, 8-bit JPEG/PNG."""
    rng = np.random.default_rng(seed)
    files = {}
    for cls, (h, w) in sizes.items():
        for i in range(per_class):
            arr = rng.integers(1, 255, size=(h, w), dtype=np.uint8)
            files[f"{cls}/{i:03d}.png"] = _png(arr)
    return files


def _materialise(root: str, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        storage.write_bytes(storage.join(root, rel), data)
    return root


def _version_dirs(root: str) -> list[str]:
    return sorted(os.path.basename(d.rstrip("/")) for d in storage.list_dirs(root)
                  if os.path.basename(d.rstrip("/")).startswith("data-"))


# --------------------------------------------------------------------------- geometry


def test_center_crop_and_reflection_pad_geometry():
    chip = _ramp(41, 50, np.float32)[None]
    out, padded = center_crop_or_pad(chip, 32)
    assert not padded and out.shape == (1, 32, 32)
    np.testing.assert_array_equal(out[0], chip[0, 4:36, 9:41])  # (41-32)//2 = 4, (50-32)//2 = 9

    small = _ramp(25, 40, np.uint16)[None]
    out, padded = center_crop_or_pad(small, 32)
    assert padded and out.shape == (1, 32, 32) and out.dtype == np.uint16
    # 7 rows to add: 3 before, 4 after, by reflection; columns centre-cropped (40-32)//2 = 4
    expected = np.pad(small[0, :, 4:36], ((3, 4), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[0, 3:28], small[0, :, 4:36])  # original kept at the centre

    side = min_paddable_side(32)
    center_crop_or_pad(np.ones((1, side, side)), 32)
    with pytest.raises(BadChip) as ei:
        center_crop_or_pad(np.ones((1, side - 1, 40)), 32)
    assert ei.value.reason == "wrong_shape" and "too small" in str(ei.value)


def test_decode_image_dtypes_and_channels():
    assert decode_image(_png(_ramp(5, 6, np.uint8)), "x.png").shape == (1, 5, 6)
    src16 = _ramp(5, 6, np.uint16, 1, 60000)
    src16[0, 0] = 65535
    u16 = decode_image(_png(src16), "x.png")
    assert u16.dtype == np.uint16
    np.testing.assert_array_equal(u16[0], src16)
    grey_rgb = decode_image(_jpeg(np.repeat(_ramp(8, 8, np.uint8)[..., None], 3, 2)), "x.jpeg")
    assert grey_rgb.shape == (1, 8, 8)
    colour = np.stack([_ramp(8, 8, np.uint8), _ramp(8, 8, np.uint8)[::-1], np.full((8, 8), 9, np.uint8)], -1)
    assert decode_image(_png(colour), "c.png").shape == (3, 8, 8)
    f = decode_image(_tiff(_ramp(6, 7, np.float64)), "x.tif")
    assert f.dtype == np.float32 and f.shape == (1, 6, 7)
    multi = decode_image(_tiff(np.stack([_ramp(6, 7, np.float32)] * 2, -1), planarconfig="contig",
                               photometric="minisblack"), "m.tiff")
    assert multi.shape == (2, 6, 7)
    for data, name in [(b"", "e.png"), (b"junk", "j.png"), (b"junk", "j.tif")]:
        with pytest.raises(BadChip) as ei:
            decode_image(data, name)
        assert ei.value.reason == "undecodable"


# --------------------------------------------------------------------------- images


def test_ingest_mixed_tree_quarantines_bad_files(tmp_path, caplog):
    src = _materialise(str(tmp_path / "src"), _mixed_tree())
    dest = str(tmp_path / "ds")
    with caplog.at_level(logging.WARNING, logger="sarjepa_dist.data.ingest"):
        rep = ingest_images(src, dest, SIZE, max_bad_fraction=0.5, sensor="testsar", command=["sarjepa", "x"])
    assert (rep.num_good, rep.num_bad, rep.num_padded) == (7, 6, 2)
    assert rep.bad_by_reason == {"all_zero": 1, "nan_or_inf": 1, "negative_amplitude": 1, "undecodable": 3}
    m = rep.manifest
    assert m.class_names == ["alpha", "beta", "gamma"]
    assert m.per_class_counts == {"alpha": 3, "beta": 2, "gamma": 2}
    assert m.chip_shape == [1, SIZE, SIZE]
    assert m.chip_dtype == "float32"  # uint8 + uint16 + float32 sources → float32, values unscaled
    assert m.crop_policy == {"mode": "center", "size": SIZE, "padded": 2}
    assert m.stats["source_dtypes"] == {"float32": 2, "uint16": 1, "uint8": 4}
    assert m.stats["ignored_files"] == 2 and m.command == ["sarjepa", "x"]
    reasons = {q["source"]: q["reason"] for q in m.quarantine}
    assert reasons == {"alpha/empty.png": "undecodable", "alpha/trunc.png": "undecodable",
                       "beta/notes.png": "undecodable", "beta/zero.png": "all_zero",
                       "gamma/nan.tif": "nan_or_inf", "gamma/neg.tif": "negative_amplitude"}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for name in reasons:
        assert name in logged  # every bad file is named in a warning

    arrays = load_arrays(dest)
    assert arrays.chips.shape == (7, 1, SIZE, SIZE) and arrays.bad == {}
    by_id = dict(zip(arrays.chip_ids, arrays.chips))
    assert sorted(by_id) == ["alpha/a1.png", "alpha/a2.png", "alpha/a3.png", "beta/b1.png", "beta/b2.jpg",
                             "gamma/g1.tif", "gamma/g2.tiff"]
    np.testing.assert_array_equal(by_id["alpha/a1.png"][0], _ramp(40, 48, np.uint8)[4:36, 8:40])
    assert by_id["beta/b1.png"][0, 25 - 9, 25 - 9] == 40000.0  # 16-bit value kept exactly
    assert list(arrays.labels) == [0, 0, 0, 1, 1, 2, 2]
    assert set(arrays.metadata["sensor"]) == {"testsar"}
    assert arrays.metadata["source_path"][0] == "alpha/a1.png"
    assert np.isnan(arrays.metadata["depression_deg"]).all()


def test_one_crop_size_removes_the_size_cue(tmp_path):
    """MSTAR-like classes of different chip sizes all come out N×N uint8 (smaller ones padded)."""
    sizes = {"big": (60, 61), "mid": (40, 40), "small": (24, 30)}
    src = _materialise(str(tmp_path / "src"), _uint8_tree(sizes))
    rep = ingest_images(src, str(tmp_path / "ds"), SIZE)
    assert rep.num_good == 9 and rep.num_bad == 0 and rep.num_padded == 3
    arrays = load_arrays(str(tmp_path / "ds"))
    assert arrays.chips.shape == (9, 1, SIZE, SIZE) and arrays.chips.dtype == np.uint8
    assert rep.manifest.stats["dtype_promoted"] is False


def test_colour_chip_in_grey_dataset_is_wrong_shape(tmp_path):
    files = _uint8_tree({"a": (32, 32), "b": (32, 32)}, per_class=2)
    colour = np.stack([_ramp(32, 32, np.uint8), _ramp(32, 32, np.uint8).T, np.full((32, 32), 7, np.uint8)], -1)
    files["b/colour.png"] = _png(colour)
    rep = ingest_images(_materialise(str(tmp_path / "src"), files), str(tmp_path / "ds"), SIZE, max_bad_fraction=0.3)
    assert rep.num_good == 4 and rep.bad_by_reason == {"wrong_shape": 1}
    assert rep.manifest.quarantine[0]["source"] == "b/colour.png"
    assert "3 channels" in rep.manifest.quarantine[0]["detail"]


def test_dataset_id_is_deterministic(tmp_path):
    src = _materialise(str(tmp_path / "src"), _uint8_tree({"a": (33, 35), "b": (32, 32)}))
    m1 = ingest_images(src, str(tmp_path / "d1"), SIZE).manifest
    m2 = ingest_images(src, str(tmp_path / "d2"), SIZE).manifest
    assert m1.dataset_id == m2.dataset_id


def test_too_many_bad_files_fails_and_keeps_previous_dataset(tmp_path):
    dest = str(tmp_path / "ds")
    good = _materialise(str(tmp_path / "good"), _uint8_tree({"a": (32, 32), "b": (40, 40)}))
    first = ingest_images(good, dest, SIZE).manifest
    mixed = _materialise(str(tmp_path / "mixed"), _mixed_tree())
    with pytest.raises(IngestError) as ei:
        ingest_images(mixed, dest, SIZE)  # default max_bad_fraction = 0.01
    msg = str(ei.value)
    assert "6 of 13 inputs are bad (46.15%)" in msg and "max_bad_fraction = 0.01" in msg
    assert "alpha/empty.png (undecodable" in msg and "unchanged" in msg
    assert read_manifest(dest).dataset_id == first.dataset_id
    assert read_table(dest, verify=True).num_rows == 6
    assert _version_dirs(dest) == [first.shards[0].path.split("/")[0]]


def test_no_images_and_all_bad_are_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(IngestError, match="no images"):
        ingest_images(str(tmp_path / "empty"), str(tmp_path / "ds"), SIZE)
    with pytest.raises(IngestError, match="no such file or folder"):
        ingest_images(str(tmp_path / "absent"), str(tmp_path / "ds"), SIZE)
    bad = _materialise(str(tmp_path / "bad"), {"a/x.png": b"nope", "a/y.png": b""})
    with pytest.raises(IngestError, match=r"no good chips \(2 bad"):
        ingest_images(bad, str(tmp_path / "ds"), SIZE, max_bad_fraction=1.0)
    assert not (tmp_path / "ds").exists()


def test_failure_mid_write_keeps_previous_then_success_replaces(tmp_path, monkeypatch):
    """A run that dies after some shards are written leaves the first dataset whole and visible."""
    dest = str(tmp_path / "ds")
    tiny = 3 * SIZE * SIZE / 2**20  # ~3 chips per shard
    src1 = _materialise(str(tmp_path / "s1"), _uint8_tree({"a": (32, 32), "b": (36, 36)}, per_class=4))
    first = ingest_images(src1, dest, SIZE, target_shard_mib=tiny).manifest
    assert len(first.shards) == 3
    src2 = _materialise(str(tmp_path / "s2"), _uint8_tree({"a": (32, 32), "c": (32, 40)}, per_class=5, seed=1))

    real_write = storage.write_bytes
    shards_written = []

    def failing_write(uri, data):
        if uri.endswith(".parquet"):
            shards_written.append(uri)
            if len(shards_written) == 3:
                raise storage.StorageError(f"{uri}: injected failure")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", failing_write)
    with pytest.raises(storage.StorageError, match="injected failure"):
        ingest_images(src2, dest, SIZE, target_shard_mib=tiny)
    assert len(shards_written) == 3
    assert read_manifest(dest).dataset_id == first.dataset_id
    assert load_arrays(dest).chips.shape == (8, 1, SIZE, SIZE)
    read_table(dest, verify=True)
    assert _version_dirs(dest) == [first.shards[0].path.split("/")[0]]  # partial version removed

    monkeypatch.setattr(storage, "write_bytes", real_write)
    second = ingest_images(src2, dest, SIZE, target_shard_mib=tiny).manifest
    assert second.dataset_id != first.dataset_id and second.class_names == ["a", "c"]
    assert _version_dirs(dest) == [second.shards[0].path.split("/")[0]]  # the old version is gone
    assert read_table(dest, verify=True).num_rows == 10


def test_s3_source_and_destination(s3_bucket):
    src = _materialise(f"{s3_bucket}/raw", {**_uint8_tree({"a": (32, 34), "b": (30, 32)}, per_class=2),
                                            "b/broken.png": b"\x89PNG\r\n\x1a\nbroken"})
    dest = f"{s3_bucket}/datasets/chips"
    rep = ingest_images(src, dest, SIZE, max_bad_fraction=0.25)
    assert rep.num_good == 4 and rep.num_bad == 1 and rep.num_padded == 2
    assert rep.manifest.quarantine[0]["source"] == "b/broken.png"
    assert rep.manifest.source == src
    assert load_arrays(dest).chips.shape == (4, 1, SIZE, SIZE)
    with pytest.raises(IngestError):
        ingest_images(src, dest, SIZE)  # 20% bad > 1%
    assert read_manifest(dest).dataset_id == rep.manifest.dataset_id
    assert len(_version_dirs(dest)) == 1

    scene = np.abs(np.random.default_rng(0).normal(size=(40, 40))).astype(np.float32) + 0.1
    buf = io.BytesIO()
    np.save(buf, scene)
    storage.write_bytes(f"{s3_bucket}/scenes/s.npy", buf.getvalue())
    rep = ingest_scene(f"{s3_bucket}/scenes/s.npy", f"{s3_bucket}/datasets/tiles", tile=16, stride=16)
    assert rep.num_good == 4


@pytest.mark.skipif(not MSTAR.is_dir(), reason="MSTAR SOC 17° chips not present")
def test_mstar_soc_17deg(tmp_path):
    t0 = time.perf_counter()
    rep = ingest_images(str(MSTAR), str(tmp_path / "mstar128"), 128)
    elapsed = time.perf_counter() - t0
    m = rep.manifest
    assert m.num_chips == 2746 and rep.num_bad == 0 and rep.num_padded == 0
    assert len(m.class_names) == 10 and sum(m.per_class_counts.values()) == 2746
    assert m.chip_shape == [1, 128, 128] and m.chip_dtype == "uint8"
    assert m.crop_policy == {"mode": "center", "size": 128, "padded": 0}
    print(f"MSTAR ingest: {m.num_chips} chips in {elapsed:.1f} s")


# --------------------------------------------------------------------------- arrays


def test_ingest_npy_stack_unlabelled(tmp_path):
    stack = _ramp(24, 20, np.uint16)[None].repeat(5, 0) + np.arange(5, dtype=np.uint16)[:, None, None]
    np.save(tmp_path / "stack.npy", stack)
    rep = ingest_arrays(str(tmp_path / "stack.npy"), str(tmp_path / "ds"))
    m = rep.manifest
    assert rep.num_good == 5 and not m.labelled and m.chip_shape == [1, 24, 20] and m.chip_dtype == "uint16"
    assert m.crop_policy == {"mode": "none"}
    arrays = load_arrays(str(tmp_path / "ds"))
    np.testing.assert_array_equal(arrays.chips[:, 0], stack)
    assert arrays.chip_ids[0] == "stack-000000" and (arrays.labels == -1).all()


def test_ingest_npz_folder_with_labels_crop_and_bad_chips(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.gamma(1.0, size=(6, 2, 40, 36)).astype(np.float32) + 0.01
    a[3, 1, 20, 18] = np.nan
    b = rng.gamma(1.0, size=(4, 2, 40, 36)).astype(np.float32) + 0.01
    names = np.array(["ship", "tank", "truck"])
    np.savez(tmp_path / "a.npz", chips=a, labels=np.array([0, 1, 2, 0, 1, 2]), class_names=names)
    np.savez(tmp_path / "b.npz", chips=b, labels=np.array([2, 2, 7, 0]), class_names=names)
    (tmp_path / "notes.txt").write_text("ignored")
    rep = ingest_arrays(str(tmp_path), str(tmp_path / "ds"), size=SIZE, max_bad_fraction=0.25)
    assert rep.num_good == 8 and rep.bad_by_reason == {"bad_label": 1, "nan_or_inf": 1}
    m = rep.manifest
    assert m.class_names == ["ship", "tank", "truck"] and m.chip_shape == [2, SIZE, SIZE]
    assert m.crop_policy == {"mode": "center", "size": SIZE, "padded": 0}
    assert {q["source"] for q in m.quarantine} == {"a.npz#3", "b.npz#2"}
    arrays = load_arrays(str(tmp_path / "ds"))
    np.testing.assert_array_equal(arrays.chips[0], a[0, :, 4:36, 2:34])
    assert list(arrays.labels) == [0, 1, 2, 1, 2, 2, 2, 0]
    assert arrays.chip_ids[:2] == ["a-000000", "a-000001"]

    # class_names given by the caller win over the file's; label 7 is still out of range
    rep2 = ingest_arrays(str(tmp_path / "b.npz"), str(tmp_path / "ds2"), class_names=["x", "y", "z", "w"],
                         max_bad_fraction=0.3)
    assert rep2.manifest.class_names == ["x", "y", "z", "w"]
    assert rep2.num_good == 3 and rep2.bad_by_reason == {"bad_label": 1}


def test_arrays_errors(tmp_path):
    np.savez(tmp_path / "wrongkey.npz", images=np.ones((2, 8, 8), np.float32))
    with pytest.raises(IngestError, match=r"no good chips.*no array 'chips'"):
        ingest_arrays(str(tmp_path / "wrongkey.npz"), str(tmp_path / "ds"), max_bad_fraction=1.0)
    rep = ingest_arrays(str(tmp_path / "wrongkey.npz"), str(tmp_path / "ds"), chips_key="images")
    assert rep.num_good == 2

    d = tmp_path / "mix"
    d.mkdir()
    np.savez(d / "l.npz", chips=np.ones((2, 8, 8), np.float32), labels=np.array([0, 1]))
    np.save(d / "u.npy", np.ones((2, 8, 8), np.float32))
    with pytest.raises(IngestError, match="all labelled or all unlabelled"):
        ingest_arrays(str(d), str(tmp_path / "ds3"))
    os.remove(d / "u.npy")
    rep = ingest_arrays(str(d), str(tmp_path / "ds3"))
    assert rep.manifest.class_names == ["0", "1"]  # no names given anywhere
    np.save(tmp_path / "u.npy", np.ones((2, 8, 8), np.float32))
    with pytest.raises(IngestError, match="class_names given but no file"):
        ingest_arrays(str(tmp_path / "u.npy"), str(tmp_path / "ds4"), class_names=["a"])


# --------------------------------------------------------------------------- scenes


def _scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).gamma(1.0, size=(h, w)) + 0.01).astype(np.float32)


def test_scene_tiling_counts_nodata_and_bad_tiles(tmp_path):
    scene = _scene(100, 130)
    scene[:, :40] = 0.0  # outside the footprint
    scene[70, 120] = np.nan  # inside two kept tiles (rows 48 and 64, column 96)
    np.save(tmp_path / "scene.npy", scene)
    rep = ingest_scene(str(tmp_path / "scene.npy"), str(tmp_path / "ds"), tile=32, stride=16,
                       target_shard_mib=8 * 32 * 32 * 4 / 2**20)
    m = rep.manifest
    # rows 0..64 step 16 → 5, cols 0..96 step 16 → 7: 35 tiles; cols 0 and 16 are >50% no-data
    assert m.stats["scenes"][0]["tiles_total"] == 35
    assert m.stats["skipped_nodata"] == 10
    assert rep.num_good == 23 and rep.bad_by_reason == {"nan_or_inf": 2}
    assert {q["source"] for q in m.quarantine} == {"scene.npy#r48-c96", "scene.npy#r64-c96"}
    assert len(m.shards) == 3 and not m.labelled and m.chip_shape == [1, 32, 32]
    assert m.crop_policy == {"mode": "tile", "size": 32, "stride": 16, "padded": 0}
    arrays = load_arrays(str(tmp_path / "ds"))
    by_id = dict(zip(arrays.chip_ids, arrays.chips))
    assert "scene-r0-c32" in by_id and "scene-r0-c16" not in by_id
    np.testing.assert_array_equal(by_id["scene-r16-c48"][0], scene[16:48, 48:80])


@pytest.mark.parametrize("tile, stride, h, w", [(16, 16, 64, 48), (16, 24, 64, 64), (10, 7, 33, 21)])
def test_scene_tile_count_from_stride(tmp_path, tile, stride, h, w):
    np.save(tmp_path / "s.npy", _scene(h, w))
    rep = ingest_scene(str(tmp_path / "s.npy"), str(tmp_path / "ds"), tile=tile, stride=stride)
    assert rep.num_good == ((h - tile) // stride + 1) * ((w - tile) // stride + 1)


def test_complex_scene_becomes_magnitude(tmp_path):
    rng = np.random.default_rng(1)
    slc = (rng.normal(size=(48, 48)) + 1j * rng.normal(size=(48, 48))).astype(np.complex64)
    np.save(tmp_path / "slc.npy", slc)
    rep = ingest_scene(str(tmp_path / "slc.npy"), str(tmp_path / "ds"), tile=24, stride=24)
    assert rep.num_good == 4 and rep.manifest.chip_dtype == "float32" and rep.manifest.stats["complex_input"]
    by_id = dict(zip(*(lambda a: (a.chip_ids, a.chips))(load_arrays(str(tmp_path / "ds")))))
    np.testing.assert_allclose(by_id["slc-r24-c0"][0], np.abs(slc[24:48, 0:24]), rtol=1e-6)


def test_tiff_scenes_memmapped_compressed_and_multichannel(tmp_path):
    u16 = (_scene(64, 80) * 1000).astype(np.uint16) + 1
    tifffile.imwrite(tmp_path / "plain.tif", u16)  # uncompressed: memory-mapped in place
    rep = ingest_scene(str(tmp_path / "plain.tif"), str(tmp_path / "d1"), tile=32, stride=32)
    assert rep.num_good == 4 and rep.manifest.chip_dtype == "uint16"

    tifffile.imwrite(tmp_path / "zip.tif", u16, compression="zlib", tile=(16, 16))  # tiled + compressed
    rep = ingest_scene(str(tmp_path / "zip.tif"), str(tmp_path / "d2"), tile=32, stride=16)
    assert rep.num_good == 3 * 4
    by_id = dict(zip(*(lambda a: (a.chip_ids, a.chips))(load_arrays(str(tmp_path / "d2")))))
    np.testing.assert_array_equal(by_id["zip-r16-c48"][0], u16[16:48, 48:80])

    hwc = np.stack([_scene(40, 40, 1), _scene(40, 40, 2)], axis=-1)
    tifffile.imwrite(tmp_path / "pol.tif", hwc, planarconfig="contig", photometric="minisblack")
    rep = ingest_scene(str(tmp_path / "pol.tif"), str(tmp_path / "d3"), tile=20, stride=20)
    assert rep.manifest.chip_shape == [2, 20, 20] and rep.num_good == 4
    by_id = dict(zip(*(lambda a: (a.chip_ids, a.chips))(load_arrays(str(tmp_path / "d3")))))
    np.testing.assert_array_equal(by_id["pol-r20-c0"], np.moveaxis(hwc[20:40, 0:20], -1, 0))


def test_scene_errors(tmp_path):
    np.save(tmp_path / "tiny.npy", _scene(10, 10))
    with pytest.raises(IngestError, match="no good chips"):
        ingest_scene(str(tmp_path / "tiny.npy"), str(tmp_path / "ds"), tile=16, stride=16)
    np.save(tmp_path / "void.npy", np.zeros((32, 32), np.float32))
    with pytest.raises(IngestError, match="4 skipped_nodata"):
        ingest_scene(str(tmp_path / "void.npy"), str(tmp_path / "ds"), tile=16, stride=16)
    neg = -_scene(32, 32)
    np.save(tmp_path / "neg.npy", neg)
    with pytest.raises(IngestError, match=r"negative_amplitude"):
        ingest_scene(str(tmp_path / "neg.npy"), str(tmp_path / "ds"), tile=16, stride=16)
    with pytest.raises(IngestError, match="must both be >= 1"):
        ingest_scene(str(tmp_path / "neg.npy"), str(tmp_path / "ds"), tile=16, stride=0)
