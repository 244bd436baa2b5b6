"""Ingest throughput in one process vs as a Ray job on 2 local Ray workers, same files; and the
manifest commit time of a dataset of 10,000 shards.

(a) ``ingest_images``: ``--files`` PNGs (uint8, 80×80, 4 classes) centre-cropped to 64×64, and
    ``ingest_scene``: one ``--scene``² float32 ``.npy`` scene tiled 64×64; each once in this process
    (the thread pool ``ingest`` uses) and once inside ``distributed.ray_ingest`` on a local Ray
    cluster of ``--ray-cpus`` CPUs (Ray started before the clock runs). Both runs must give the same
    ``dataset_id``; the ratio of chips/s is the figure.
(b) ``ShardWriter.commit()`` (manifest JSON with every shard's sha256, then removal of stale
    versions) for a dataset of ``--commit-shards`` one-chip shards, and ``read_manifest`` of it.

    python benchmarks/bench_ingest.py            # ~3-5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sarjepa_dist.data import shards  # noqa: E402
from sarjepa_dist.data.ingest import distributed, ingest_images, ingest_scene  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ingest.json"


def write_pngs(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(1, 255, size=(80, 80), dtype=np.uint8)).save(buf, format="PNG")
        (folder / f"{i:06d}.png").write_bytes(buf.getvalue())


def timed_ingest(fn, *args, **kw) -> dict:
    t0 = time.perf_counter()
    rep = fn(*args, **kw)
    wall = time.perf_counter() - t0
    return {"chips": rep.num_good, "wall_s": round(wall, 3), "chips_per_s": round(rep.num_good / wall, 1),
            "shards": len(rep.manifest.shards), "dataset_id": rep.manifest.dataset_id}


def compare(name: str, fn, src: str, work: Path, **kw) -> dict:
    local = timed_ingest(fn, src, str(work / f"{name}-local"), **kw)
    with distributed.ray_ingest(None):
        ray_run = timed_ingest(fn, src, str(work / f"{name}-ray"), **kw)
    out = {"in_process": local, "ray": ray_run, "same_dataset_id": local["dataset_id"] == ray_run["dataset_id"],
           "speedup_ray_vs_in_process": round(ray_run["chips_per_s"] / local["chips_per_s"], 3)}
    print(f"{name:<8} in-process {local['chips_per_s']:8.0f} chips/s | ray {ray_run['chips_per_s']:8.0f} chips/s "
          f"| x{out['speedup_ray_vs_in_process']:.2f} | same dataset_id {out['same_dataset_id']}", flush=True)
    return out


def manifest_commit(work: Path, n_shards: int) -> dict:
    """A dataset of ``n_shards`` one-chip shards: time to write them, to commit, to read the manifest."""
    root = str(work / "many-shards")
    chip = np.full((1, 8, 8), 3.0, np.float32)
    t0 = time.perf_counter()
    writer = shards.ShardWriter(root, target_shard_mib=1e-9, command=["bench_ingest"])  # a shard per chip
    for i in range(n_shards):
        writer.add(shards.ChipRecord(f"c{i:06d}", chip))
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = writer.commit()
    t_commit = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = shards.read_manifest(root)
    t_read = time.perf_counter() - t0
    assert len(manifest.shards) == len(again.shards) == n_shards
    size = os.path.getsize(os.path.join(root, shards.MANIFEST_NAME))
    out = {"shards": n_shards, "write_shards_s": round(t_write, 2), "commit_s": round(t_commit, 3),
           "read_manifest_s": round(t_read, 3), "manifest_bytes": size}
    print(f"manifest at {n_shards} shards: commit {t_commit:.3f} s, read {t_read:.3f} s, {size / 2**20:.1f} MiB",
          flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=6000)
    p.add_argument("--scene", type=int, default=4096, help="scene side in pixels")
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--commit-shards", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    import ray

    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                                "load_avg_start": round(os.getloadavg()[0], 2)}, "params": vars(a) | {"out": str(a.out)}}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        write_pngs(work / "pngs", a.files)
        scene = (np.random.default_rng(1).gamma(1.0, size=(a.scene, a.scene)) + 0.01).astype(np.float32)
        np.save(work / "scene.npy", scene)
        del scene
        ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False)
        try:
            result["images"] = compare("images", ingest_images, str(work / "pngs"), work, size=64,
                                       target_shard_mib=8.0)
            result["scene"] = compare("scene", ingest_scene, str(work / "scene.npy"), work, tile=64, stride=64,
                                      target_shard_mib=8.0)
        finally:
            ray.shutdown()
        result["manifest"] = manifest_commit(work, a.commit_shards)
    result["machine"]["load_avg_end"] = round(os.getloadavg()[0], 2)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
