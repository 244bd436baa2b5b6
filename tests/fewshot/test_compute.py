"""Feature computation's test-time views (fewshot.tta): encoders average a chip with its mirror,
baselines are unchanged by it; ``hflip+crops`` averages every feature over the chip and its crops."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from _fewshot_helpers import blob_chips
from sarjepa_dist.config import config_from_dict
from sarjepa_dist.fewshot.compute import build_model, compute_features
from sarjepa_dist.fewshot.sources import baseline_source, encoder_source
from sarjepa_dist.model.pooling import pool_tokens
from sarjepa_dist.transforms import crop_views, prepare_inputs

TINY = {"data": {"img_size": 16}, "gradient": {"radii": [2, 4]},
        "model": {"encoder": "vit_tiny", "patch_size": 4, "depth": 2, "predictor_dim": 48, "predictor_depth": 1,
                  "predictor_heads": 3}}


def cfg_with(**fewshot):
    return config_from_dict({**TINY, "fewshot": {"encoders": ["random-init"], **fewshot}})


def test_hflip_encoder_features_average_the_chip_and_its_mirror():
    cfg = cfg_with(tta="hflip")
    src = encoder_source("random-init", cfg)
    assert src.recipe.tta == "hflip" and "azimuth mirror" in src.domain_description
    assert src.fingerprint != encoder_source("random-init", cfg_with(tta="none")).fingerprint  # cached apart
    model = build_model(src.recipe, src.state)
    chips = blob_chips(np.arange(4) % 2, size=16)
    feats = compute_features(chips, src.recipe, model)
    inp = prepare_inputs(torch.from_numpy(chips), cfg.data, cfg.gradient, need=(src.recipe.input,))[src.recipe.input]
    with torch.no_grad():
        both = (pool_tokens(model(inp), model.grid_size, "mean") + pool_tokens(model(inp.flip(-1)), model.grid_size,
                                                                               "mean")) / 2
        plain = pool_tokens(model(inp), model.grid_size, "mean")
    np.testing.assert_allclose(feats, both.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats, plain.numpy(), atol=1e-4)
    none = encoder_source("random-init", cfg_with(tta="none"))
    np.testing.assert_allclose(compute_features(chips, none.recipe, build_model(none.recipe, none.state)),
                               plain.numpy(), rtol=1e-5, atol=1e-5)
    mirrored = compute_features(chips[..., ::-1].copy(), src.recipe, model)
    np.testing.assert_allclose(feats, mirrored, rtol=1e-4, atol=1e-5)  # mirror-invariant


def test_baselines_ignore_tta():
    cfg = cfg_with(tta="hflip")
    chips = blob_chips(np.arange(3) % 2, size=16)
    for name in ("raw-pixels", "gradient-maps"):
        recipe = baseline_source(name, cfg).recipe
        hflip = dataclasses.replace(recipe, tta="hflip")
        np.testing.assert_array_equal(compute_features(chips, recipe), compute_features(chips, hflip))


def test_crops_average_encoder_features_over_the_chip_and_five_crops():
    cfg = cfg_with(tta="hflip+crops")
    src = encoder_source("random-init", cfg)
    assert src.recipe.tta == "hflip+crops" and "5 crops" in src.domain_description
    assert src.fingerprint != encoder_source("random-init", cfg_with(tta="hflip")).fingerprint
    model = build_model(src.recipe, src.state)
    chips = blob_chips(np.arange(4) % 2, size=32)  # stored at 32 px, the model sees 16
    feats = compute_features(chips, src.recipe, model)
    hflip = dataclasses.replace(src.recipe, tta="hflip")
    views = crop_views(torch.from_numpy(chips), 16)
    assert len(views) == 6
    expected = np.mean([compute_features(v.numpy(), hflip, model) for v in views], axis=0)
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats, compute_features(chips, hflip, model), atol=1e-4)


def test_crops_apply_to_the_baselines_too():
    cfg = cfg_with(tta="hflip+crops")
    chips = blob_chips(np.arange(3) % 2, size=32)
    for name in ("raw-pixels", "gradient-maps"):
        src = baseline_source(name, cfg)
        assert src.recipe.tta == "hflip+crops" and "5 crops" in src.domain_description
        plain = baseline_source(name, cfg_with(tta="hflip")).recipe
        assert src.fingerprint != baseline_source(name, cfg_with(tta="hflip")).fingerprint
        expected = np.mean([compute_features(v.numpy(), plain) for v in crop_views(torch.from_numpy(chips), 16)],
                           axis=0)
        np.testing.assert_allclose(compute_features(chips, src.recipe), expected, rtol=1e-5, atol=1e-5)
