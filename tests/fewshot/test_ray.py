"""run_fewshot through real Ray Data feature extraction (few tests: each starts actors)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sarjepa_dist import storage
from sarjepa_dist.config import config_from_dict
from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset
from sarjepa_dist.fewshot import extract
from sarjepa_dist.fewshot.runner import run_fewshot
from sarjepa_dist.fewshot.sources import baseline_source, encoder_source
from sarjepa_dist.model.io import save_checkpoint_dir
from sarjepa_dist.model.jepa import SarJEPA

from _fewshot_helpers import blob_chips, write_labelled

pytestmark = pytest.mark.ray

TINY = {"data": {"img_size": 32}, "gradient": {"radii": [2, 4, 6]},
        "model": {"encoder": "vit_tiny", "patch_size": 8, "depth": 2, "predictor_dim": 48, "predictor_depth": 1,
                  "predictor_heads": 3}}


def fewshot_cfg(data: str, out: str, encoders: list[str], **extra):
    return config_from_dict({**TINY, "fewshot": {
        "data": data, "out": out, "encoders": encoders, "split_column": "depression_deg", "train_values": [17],
        "test_values": [15], "shots": [1, 4], "seeds": 2, "linear_epochs": 20, "batch_size": 16, **extra}})


def test_run_fewshot_with_ray_data_then_from_the_cache(ray_local, tmp_path, monkeypatch):
    data = str(tmp_path / "synth")
    write_synthetic_dataset(data, SynthConfig(num_classes=3, per_class=16, size=32, seed=0), command=["test"])
    out = str(tmp_path / "report")
    cfg = fewshot_cfg(data, out, ["random-init", "raw-pixels", "gradient-maps"])
    res = run_fewshot(cfg)

    results = json.loads(Path(res.results_uri).read_text())
    assert [e["name"] for e in results["encoders"]] == ["random-init", "raw-pixels", "gradient-maps"]
    assert all(e["extraction"]["extracted"] for e in results["encoders"])
    assert results["encoders"][0]["feature_dim"] == 192 and results["encoders"][1]["feature_dim"] == 32 * 32
    assert results["split"]["kind"] == "column" and results["split"]["test_size"] == 24
    assert len(results["runs"]) == 3 * 3 * 2 * 2
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["runs"])
    md = Path(res.report_uri).read_text()
    assert "| encoder | K=1 | K=4 |" in md and "| random-init |" in md
    assert len(list((tmp_path / "report" / "features").glob("*.npz"))) == 3

    # the same job again: every feature comes from the cache, the extractor is never called
    def boom(*args, **kwargs):
        raise AssertionError("extractor called on a cached re-run")

    monkeypatch.setattr(extract, "extract_features", boom)
    again = run_fewshot(cfg)
    assert all(e["extraction"]["cached"] and not e["extraction"]["extracted"] for e in again.results["encoders"])
    first = {(r["encoder"], r["method"], r["shots"], r["seed"]): r["accuracy"] for r in results["runs"]}
    second = {(r.encoder, r.method, r.shots, r.seed): r.accuracy for r in again.runs}
    assert first == second


@pytest.mark.s3
def test_run_fewshot_on_s3_with_an_s3_checkpoint(ray_local, s3_bucket, tmp_path):
    data = f"{s3_bucket}/data/synth"
    write_synthetic_dataset(data, SynthConfig(num_classes=3, per_class=8, size=32, seed=1), command=["test"])
    cfg = fewshot_cfg(data, f"{s3_bucket}/fewshot", ["random-init"])
    torch.manual_seed(0)
    model = SarJEPA(cfg.model, cfg.data.img_size, cfg.data.channels, num_grad_scales=3)
    local = tmp_path / "ckpt"
    meta = save_checkpoint_dir(local, model, None, {"step": 5}, cfg.to_dict(),
                               {"run_name": "s3-run", "step": 5, "dataset_id": "e" * 64})
    ckpt_uri = f"{s3_bucket}/runs/s3-run/checkpoint_000005"
    for name in os.listdir(local):
        storage.write_bytes(storage.join(ckpt_uri, name), (local / name).read_bytes())

    cfg = fewshot_cfg(data, f"{s3_bucket}/fewshot", [ckpt_uri, "raw-pixels"], shots=[1, 2],
                      methods=["prototype", "linear"], feature_domain="target")
    res = run_fewshot(cfg)
    assert res.report_uri == f"{s3_bucket}/fewshot/report.md"
    results = json.loads(storage.read_text(res.results_uri))
    enc = results["encoders"][0]
    assert enc["name"] == "s3-run@5" and enc["lineage"]["checkpoint_id"] == meta["checkpoint_id"]
    assert enc["lineage"]["dataset_id"] == "e" * 64 and enc["lineage"]["config"]["model"]["depth"] == 2
    assert enc["domain"] == "target" and enc["input"] == "gx" and results["feature_domain"] == "target"
    assert "| encoder | K=1 | K=2 |" in storage.read_text(res.report_uri)
    assert storage.exists(f"{s3_bucket}/fewshot/fewshot.png")
    assert len([u for u in storage.list_files(f"{s3_bucket}/fewshot/features") if u.endswith(".npz")]) == 2
    assert np.isfinite([r["accuracy"] for r in results["runs"]]).all()


@pytest.mark.parametrize("reads", ["actor", pytest.param("tasks", marks=pytest.mark.slow)])
def test_ray_features_equal_extract_local_whoever_reads_the_shards(ray_local, tmp_path, reads):
    """Two datasets of several shards each, an undecodable chip, a batch size that does not divide
    a shard: every source's rows come back under the right dataset with extract_local's numbers."""
    cfg = fewshot_cfg(str(tmp_path), str(tmp_path / "out"), ["random-init"])
    sources = [encoder_source("random-init", cfg), baseline_source("gradient-maps", cfg)]
    roots = {}
    for k, n in (("a", 40), ("b", 25)):
        labels = np.arange(n) % 3
        chips = blob_chips(labels, size=32, seed=n)
        if k == "a":
            chips[7, 0, 0, 0] = np.nan
        roots[k] = write_labelled(str(tmp_path / k), chips, labels, ["A", "B", "C"], prefix=k, target_shard_mib=0.05)
    assert len(list((tmp_path / "a").rglob("*.parquet"))) > 2
    got = extract.extract_features(sources, roots, batch_size=6, reads=reads)
    for src in sources:
        for k, root in roots.items():
            want = extract.extract_local(src, root, batch_size=6)
            order = np.argsort(got[src.name][k].chip_ids)
            assert got[src.name][k].chip_ids[order].tolist() == sorted(want.chip_ids.tolist())
            feats, ok = got[src.name][k].take(want.chip_ids.tolist())
            np.testing.assert_array_equal(ok, want.ok)
            np.testing.assert_allclose(feats, want.features, rtol=1e-5, atol=1e-6)
    assert got["random-init"]["a"].take(["a-00007"])[1].tolist() == [False]
