"""``sarjepa ingest`` as a Ray job (``data/ingest/distributed.py``) against the in-process path: the
same input gives the same chips (ids and bytes), the same shards and the same manifest; a
distributed ingest whose driver dies half-way leaves the previous dataset readable, and re-running it
finishes with every chip exactly once."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from sarjepa_dist import cli, storage
from sarjepa_dist.data.ingest import ingest_images, ingest_scene
from sarjepa_dist.data.ingest import distributed
from sarjepa_dist.data.ingest.scene import BANDS_PER_TASK
from sarjepa_dist.data.shards import read_manifest, read_table

pytestmark = [pytest.mark.ray]

SIZE = 32
SHARD_MIB = 5 * SIZE * SIZE / 2**20  # ~5 uint8 chips a shard: several shard tasks


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_image_tree(root: str, per_class: int = 12) -> str:
    """Three classes of 8-bit PNGs of mixed sizes (crops and pads), plus bad files to quarantine."""
    rng = np.random.default_rng(7)
    for k, (cls, (h, w)) in enumerate({"a": (32, 40), "b": (36, 36), "c": (24, 32)}.items()):
        for i in range(per_class):
            storage.write_bytes(storage.join(root, cls, f"{i:03d}.png"),
                                _png(rng.integers(1, 255, size=(h, w), dtype=np.uint8)))
    storage.write_bytes(storage.join(root, "a", "broken.png"), b"\x89PNG\r\n\x1a\nbroken")
    storage.write_bytes(storage.join(root, "b", "zero.png"), _png(np.zeros((32, 32), np.uint8)))
    return root


def rows_of(dest: str) -> dict[str, bytes]:
    table = read_table(dest, verify=True)
    ids, chips = table.column("chip_id").to_pylist(), table.column("chip").to_pylist()
    assert len(ids) == len(set(ids)), "a chip id appears twice"
    return dict(zip(ids, chips))


def assert_same_dataset(local_dest: str, ray_dest: str) -> None:
    local, dist = read_manifest(local_dest), read_manifest(ray_dest)
    assert rows_of(ray_dest) == rows_of(local_dest)
    assert [(s.rows, s.sha256) for s in dist.shards] == [(s.rows, s.sha256) for s in local.shards]
    assert dist.dataset_id == local.dataset_id
    for field in ("num_chips", "chip_shape", "chip_dtype", "class_names", "per_class_counts", "quarantine",
                  "crop_policy"):
        assert getattr(dist, field) == getattr(local, field), field
    drop = {"elapsed_s"}
    assert {k: v for k, v in dist.stats.items() if k not in drop} == \
        {k: v for k, v in local.stats.items() if k not in drop}


@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    return ray_local


def test_images_same_rows_in_process_and_as_ray_job(ray_cluster, tmp_path):
    src = write_image_tree(str(tmp_path / "src"))
    local = ingest_images(src, str(tmp_path / "local"), SIZE, max_bad_fraction=0.1, target_shard_mib=SHARD_MIB)
    with distributed.ray_ingest(None):
        dist = ingest_images(src, str(tmp_path / "ray"), SIZE, max_bad_fraction=0.1, target_shard_mib=SHARD_MIB)
    assert local.num_good == dist.num_good == 36 and dist.num_bad == 2 and dist.num_padded == 12
    assert len(dist.manifest.shards) >= 6
    assert_same_dataset(str(tmp_path / "local"), str(tmp_path / "ray"))


def test_scene_split_by_row_bands_same_tiles(ray_cluster, tmp_path):
    scene = (np.random.default_rng(1).gamma(1.0, size=(200, 150)) + 0.01).astype(np.float32)
    scene[:, :40] = 0.0  # no-data margin
    scene[90, 120] = np.nan  # a bad tile
    np.save(tmp_path / "scene.npy", scene)
    kw = dict(tile=16, stride=16, target_shard_mib=20 * 16 * 16 * 4 / 2**20)
    local = ingest_scene(str(tmp_path / "scene.npy"), str(tmp_path / "local"), **kw)
    with distributed.ray_ingest(None):
        dist = ingest_scene(str(tmp_path / "scene.npy"), str(tmp_path / "ray"), **kw)
    rows = (200 - 16) // 16 + 1
    assert rows > 2 * BANDS_PER_TASK  # the scene really was split across several tasks
    assert dist.num_good == local.num_good > 0 and dist.bad_by_reason == {"nan_or_inf": 1}
    assert_same_dataset(str(tmp_path / "local"), str(tmp_path / "ray"))
    by_id = rows_of(str(tmp_path / "ray"))
    assert np.frombuffer(by_id["scene-r16-c48"], np.float32).reshape(16, 16).tobytes() == \
        scene[16:32, 48:64].tobytes()


def test_rerun_after_a_driver_died_half_way_has_no_duplicates(ray_cluster, tmp_path, monkeypatch):
    src = write_image_tree(str(tmp_path / "src"))
    dest = str(tmp_path / "ds")
    first = ingest_images(src, dest, SIZE, max_bad_fraction=0.1, target_shard_mib=SHARD_MIB).manifest

    class DriverDied(BaseException):
        """Stands for SIGKILL: nothing after it runs in the driver."""

    real_flush = distributed.ParallelShardWriter._flush
    flushed = []

    def dying_flush(self):
        real_flush(self)
        flushed.append(1)
        if len(flushed) == 3:
            self._collect()  # the three shard tasks finish writing, then the driver dies
            raise DriverDied()

    monkeypatch.setattr(distributed.ParallelShardWriter, "_flush", dying_flush)
    monkeypatch.setattr(distributed.ParallelShardWriter, "abort", lambda self: None)  # a killed driver cleans nothing
    with pytest.raises(DriverDied), distributed.ray_ingest(None):
        ingest_images(src, dest, SIZE, max_bad_fraction=0.1, target_shard_mib=SHARD_MIB)
    versions = [d for d in os.listdir(dest) if d.startswith("data-")]
    assert len(versions) == 2  # the committed one and the dead run's orphan with 3 shards
    assert read_manifest(dest).dataset_id == first.dataset_id
    assert len(rows_of(dest)) == first.num_chips  # readers still see the committed dataset only

    monkeypatch.undo()
    with distributed.ray_ingest(None):
        again = ingest_images(src, dest, SIZE, max_bad_fraction=0.1, target_shard_mib=SHARD_MIB).manifest
    assert [d for d in os.listdir(dest) if d.startswith("data-")] == [again.shards[0].path.split("/")[0]]
    rows = rows_of(dest)  # asserts that no chip id appears twice
    assert len(rows) == again.num_chips == first.num_chips
    assert again.dataset_id == first.dataset_id


def test_cli_ray_address_runs_the_distributed_path(ray_cluster, tmp_path, capsys, monkeypatch):
    src = write_image_tree(str(tmp_path / "src"), per_class=4)
    used = []
    real = distributed.RayBackend.writer
    monkeypatch.setattr(distributed.RayBackend, "writer", lambda self, *a, **k: used.append(1) or real(self, *a, **k))
    address = ray_cluster.get_runtime_context().gcs_address
    assert cli.main(["ingest", "images", src, str(tmp_path / "ds"), "--size", str(SIZE),
                     "--max-bad-fraction", "0.2", "--ray-address", address]) == 0
    assert used == [1]
    assert "wrote 12 chips" in capsys.readouterr().out
