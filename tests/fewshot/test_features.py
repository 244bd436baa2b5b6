"""Feature sources without Ray: checkpoint vs export, domains, baselines, the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _fewshot_helpers import blob_chips, blob_dataset
from sarjepa_dist.config import ConfigError, config_from_dict
from sarjepa_dist.data.shards import read_manifest
from sarjepa_dist.fewshot import extract
from sarjepa_dist.fewshot.cache import cache_uri, features_for, save_cache
from sarjepa_dist.fewshot.compute import FeatureError, GRADIENT_MAP_GRID, build_model, compute_features
from sarjepa_dist.fewshot.extract import ChipFeatureUDF, actor_plan, extract_local
from sarjepa_dist.fewshot.sources import baseline_source, encoder_source
from sarjepa_dist.model.io import export_encoder, save_checkpoint_dir
from sarjepa_dist.model.jepa import SarJEPA
from sarjepa_dist.transforms import prepare_inputs

TINY = {"data": {"img_size": 16}, "gradient": {"radii": [2, 4]},
        "model": {"encoder": "vit_tiny", "patch_size": 4, "depth": 2, "predictor_dim": 48, "predictor_depth": 1,
                  "predictor_heads": 3}}


def tiny_cfg(**fewshot):
    """tta none: these tests compare features with the encoder's own tokens (test_compute covers tta)."""
    return config_from_dict({**TINY, "fewshot": {"encoders": ["random-init"], "tta": "none", **fewshot}})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny SarJEPA checkpoint whose EMA encoder differs from its context encoder, and its export."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = SarJEPA(cfg.model, cfg.data.img_size, cfg.data.channels, num_grad_scales=len(cfg.gradient.radii))
    with torch.no_grad():
        for name, p in model.target_encoder.named_parameters():
            if "pos_embed" not in name:
                p.add_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("ckpt")
    ckpt = root / "checkpoint_000003"
    meta = save_checkpoint_dir(ckpt, model, None, {"step": 3}, cfg.to_dict(),
                               {"run_name": "tiny-run", "step": 3, "dataset_id": "d" * 64})
    export = export_encoder(ckpt, root / "export")
    return {"model": model, "ckpt": str(ckpt), "export": str(export), "meta": meta}


def test_checkpoint_and_its_export_give_the_same_features(checkpoint):
    cfg = tiny_cfg()
    chips = blob_chips(np.arange(6) % 3, size=20)
    from_ckpt = encoder_source(checkpoint["ckpt"], cfg)
    from_export = encoder_source(checkpoint["export"], cfg)
    from_export_file = encoder_source(checkpoint["export"] + "/encoder.safetensors", cfg)
    a = compute_features(chips, from_ckpt.recipe, build_model(from_ckpt.recipe, from_ckpt.state))
    b = compute_features(chips, from_export.recipe, build_model(from_export.recipe, from_export.state))
    c = compute_features(chips, from_export_file.recipe,
                           build_model(from_export_file.recipe, from_export_file.state))
    assert a.shape == (6, 192)  # mean pooling (the default): D features
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert from_ckpt.fingerprint == from_export.fingerprint  # same weights, same recipe
    assert from_ckpt.name == "tiny-run@3"
    assert from_ckpt.info["lineage"]["checkpoint_id"] == checkpoint["meta"]["checkpoint_id"]
    assert from_export.info["lineage"]["checkpoint_id"] == checkpoint["meta"]["checkpoint_id"]
    assert from_ckpt.info["lineage"]["dataset_id"] == "d" * 64


@pytest.mark.parametrize("pooling", ["grid2", "grid4", "centre"])
def test_encoder_features_follow_fewshot_pooling(checkpoint, pooling):
    """Spatial poolings keep the token layout; random-init gets the same protocol as any encoder."""
    from sarjepa_dist.model.pooling import pool_tokens

    cfg = tiny_cfg(pooling=pooling)
    chips = blob_chips(np.arange(4) % 3, size=16)
    inp = prepare_inputs(torch.from_numpy(chips), cfg.data, cfg.gradient, need=("x",))["x"]
    for spec in (checkpoint["ckpt"], "random-init"):
        src = encoder_source(spec, cfg)
        assert src.recipe.pooling == pooling and f"{pooling}-pooled" in src.domain_description
        model = build_model(src.recipe, src.state)
        feats = compute_features(chips, src.recipe, model)
        with torch.no_grad():
            expected = pool_tokens(model(inp), model.grid_size, pooling).numpy()
        grid = {"grid2": 4, "grid4": 16, "centre": 1}[pooling]
        assert feats.shape == (4, model.embed_dim * grid)
        np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    assert encoder_source("random-init", cfg).fingerprint != encoder_source("random-init", tiny_cfg(pooling="mean")).fingerprint


def test_features_come_from_the_ema_encoder(checkpoint):
    cfg = tiny_cfg(pooling="mean")
    src = encoder_source(checkpoint["ckpt"], cfg)
    chips = blob_chips(np.arange(4) % 3, size=16)
    feats = compute_features(chips, src.recipe, build_model(src.recipe, src.state))
    model = checkpoint["model"]
    with torch.no_grad():
        inp = prepare_inputs(torch.from_numpy(chips), cfg.data, cfg.gradient, need=("x",))["x"]
        ema = model.target_encoder.eval()(inp).mean(1).numpy()
        ctx = model.encoder.eval()(inp).mean(1).numpy()
    np.testing.assert_allclose(feats, ema, rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats, ctx, atol=1e-3)
    assert "EMA" in src.domain_description and "context domain (raw)" in src.domain_description


def test_domains_inputs_and_cache_names_differ(checkpoint):
    ctx = encoder_source(checkpoint["ckpt"], tiny_cfg(feature_domain="context"))
    tgt = encoder_source(checkpoint["ckpt"], tiny_cfg(feature_domain="target"))
    assert (ctx.recipe.input, tgt.recipe.input) == ("x", "gx")
    assert ctx.cache_name("a" * 64) != tgt.cache_name("a" * 64)
    assert ctx.cache_name("a" * 64).endswith("__aaaaaaaaaaaa__context.npz")
    assert tgt.cache_name("a" * 64).endswith("__target.npz")
    assert ctx.cache_name("a" * 64) != ctx.cache_name("b" * 64)
    # a gradient-context encoder is fed ∇x in its context domain
    grad_cfg = config_from_dict({**TINY, "model": {**TINY["model"], "context_domain": "gradient"},
                                 "fewshot": {"encoders": ["random-init"]}})
    assert encoder_source("random-init", grad_cfg).recipe.input == "gx"
    # the encoder has no class token to pool: the config offers the token poolings only, and says so
    with pytest.raises(ConfigError, match=r"fewshot\.pooling = 'cls' is not allowed; choose one of \['mean', 'grid2', 'grid4', 'centre'\]"):
        tiny_cfg(pooling="cls")
    assert ctx.recipe.pooling == "mean" and not ctx.notes  # the default


def test_random_init_is_seeded():
    a = encoder_source("random-init", tiny_cfg(seed=1))
    b = encoder_source("random-init", tiny_cfg(seed=1))
    c = encoder_source("random-init", tiny_cfg(seed=2))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_baselines_shapes():
    cfg = tiny_cfg()
    chips = blob_chips(np.arange(5) % 3, size=24)
    raw = baseline_source("raw-pixels", cfg)
    grad = baseline_source("gradient-maps", cfg)
    assert compute_features(chips, raw.recipe).shape == (5, 16 * 16)
    assert compute_features(chips, grad.recipe).shape == (5, 2 * GRADIENT_MAP_GRID ** 2)
    with pytest.raises(FeatureError, match="unknown baseline"):
        baseline_source("hog", cfg)
    with pytest.raises(FeatureError, match="channel"):
        compute_features(np.ones((2, 2, 16, 16), np.float32), raw.recipe)


def test_raw_pixels_baseline_is_the_robust_log_z_score_by_hand():
    """A 16² chip of three levels: 8 dark pixels (1), 240 clutter (4), 8 bright (100). Nearest-rank
    quantiles over the 256 pixels are then unambiguous: q01 = 1, median = 4, q99 = 100, and with
    δ = 1e-3 · median the feature of a pixel a is (log(a + δ) − log(4 + δ)) / ((log(100 + δ) − log(1 + δ)) / 4.6527)."""
    chip = np.full((1, 1, 16, 16), 4.0, np.float32)
    chip[0, 0, 0, :8] = 1.0
    chip[0, 0, 15, 8:] = 100.0
    feats = compute_features(chip, baseline_source("raw-pixels", tiny_cfg()).recipe)
    delta = 4e-3
    spread = (math.log(100 + delta) - math.log(1 + delta)) / (2 * 2.3263478740408408)
    expected = [(math.log(a + delta) - math.log(4 + delta)) / spread for a in chip.ravel().tolist()]
    np.testing.assert_allclose(feats[0], expected, rtol=1e-5, atol=1e-6)


def test_gradient_maps_baseline_on_a_step_by_hand():
    """A vertical step (columns 0-7 at 1, 8-15 at 9): every row is the same and so is every row of
    the reflect-padded chip, so the vertical ratio is 0 and each pixel's value is
    |log(mean of the left half-window + eps) − log(mean of the right one + eps)| over the columns
    j−r..j and j..j+r (reflected at the borders); 16 → 8 average pooling then averages column
    pairs. Features: scale-major (radius 2, then 4), 8 × 8 row-major."""
    a, b, eps = 1.0, 9.0, 1e-2
    chip = np.full((1, 1, 16, 16), a, np.float32)
    chip[..., 8:] = b
    cfg = tiny_cfg()
    assert tuple(cfg.gradient.radii) == (2, 4) and cfg.gradient.eps == eps
    feats = compute_features(chip, baseline_source("gradient-maps", cfg).recipe)

    def column(j: int) -> float:
        j = -j if j < 0 else (30 - j if j > 15 else j)  # reflect padding of 16 columns
        return a if j < 8 else b

    expected = []
    for r in (2, 4):
        per_column = [abs(math.log(sum(column(c) for c in range(j - r, j + 1)) / (r + 1) + eps)
                          - math.log(sum(column(c) for c in range(j, j + r + 1)) / (r + 1) + eps))
                      for j in range(16)]
        pooled = [(per_column[2 * m] + per_column[2 * m + 1]) / 2 for m in range(8)]
        expected += pooled * 8
    np.testing.assert_allclose(feats[0], expected, rtol=1e-5, atol=1e-6)
    assert max(expected) > 0.5  # the step is seen


def test_cache_hit_skips_the_extractor_and_stale_files_are_ignored(tmp_path, monkeypatch):
    root = blob_dataset(str(tmp_path / "blobs"), per_class=4)
    dataset_id = read_manifest(root).dataset_id
    cfg = tiny_cfg()
    raw = baseline_source("raw-pixels", cfg)
    calls = []

    def fake_extract(sources, datasets, **kwargs):
        calls.append([s.name for s in sources])
        return {s.name: {d: extract_local(s, r) for d, r in datasets.items()} for s in sources}

    monkeypatch.setattr(extract, "extract_features", fake_extract)
    out = str(tmp_path / "report")
    first, rec1 = features_for([raw], {dataset_id: root}, out)
    assert calls == [["raw-pixels"]] and rec1["raw-pixels"]["extracted"] == [dataset_id]
    second, rec2 = features_for([raw], {dataset_id: root}, out)
    assert calls == [["raw-pixels"]] and rec2["raw-pixels"]["cached"] == [dataset_id]
    np.testing.assert_array_equal(first["raw-pixels"][dataset_id].features, second["raw-pixels"][dataset_id].features)
    # a file under the right name but made by something else is not trusted
    other = baseline_source("raw-pixels", config_from_dict({**TINY, "data": {"img_size": 8}}))
    uri = cache_uri(out, raw, dataset_id)
    save_cache(uri, first["raw-pixels"][dataset_id], other, dataset_id)
    features_for([raw], {dataset_id: root}, out)
    assert calls == [["raw-pixels"], ["raw-pixels"]]


def test_actor_plan_leaves_cpus_for_reading_and_uses_one_gpu_per_actor():
    # one CPU actor reads its own shards; a pool of several or GPU actors leaves it to read tasks
    assert actor_plan({"CPU": 4}) == {"size": 1, "num_gpus": 0, "num_cpus": 3, "reads": "actor"}
    assert actor_plan({"CPU": 1}) == {"size": 1, "num_gpus": 0, "num_cpus": 1, "reads": "actor"}
    plan = actor_plan({"CPU": 32})
    assert plan["size"] * plan["num_cpus"] < 32 and plan["reads"] == "tasks"
    assert actor_plan({"CPU": 16, "GPU": 2}) == {"size": 2, "num_gpus": 1, "num_cpus": 1, "reads": "tasks"}
    assert actor_plan({"CPU": 16, "GPU": 2}, gpu=False)["num_gpus"] == 0


def test_the_ray_callable_matches_the_local_computation(checkpoint):
    """ChipFeatureUDF (what each Ray actor runs) on a shard-like batch, bad rows included."""
    from sarjepa_dist.data.shards import encode_chip

    cfg = tiny_cfg()
    sources = [encoder_source(checkpoint["ckpt"], cfg), baseline_source("raw-pixels", cfg)]
    chips = [blob_chips(np.array([i % 3]), size=16)[0] for i in range(3)] + [blob_chips(np.array([0]), size=20)[0]]
    enc = [encode_chip(c) for c in chips]
    batch = {"chip_id": np.array(["a", "b", "c", "d", "bad"]), "path": np.array(["p"] * 5),
             "chip": np.array([e[0] for e in enc] + [b"xx"], dtype=object),
             "chip_shape": np.array([np.array(e[1]) for e in enc] + [np.array([1, 16, 16])], dtype=object),
             "chip_dtype": np.array([e[2] for e in enc] + ["float32"])}
    udf = ChipFeatureUDF([s.recipe.to_dict() for s in sources], [s.state for s in sources])
    out = udf(batch)
    assert out["ok"].tolist() == [True, True, True, True, False]
    for j, src in enumerate(sources):
        model = build_model(src.recipe, src.state)
        same_size = compute_features(np.stack(chips[:3]), src.recipe, model)
        other = compute_features(chips[3][None], src.recipe, model)
        np.testing.assert_allclose(out[f"f{j}"][:3], same_size, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[f"f{j}"][3:4], other, rtol=1e-5, atol=1e-6)
        assert not out[f"f{j}"][4].any()
