"""The online probe: real accuracies on separable and inseparable chips, and the step-0 figures."""

import numpy as np
import pytest
import torch

from sarjepa_dist.config import ConfigError, DataConfig, GradientConfig, ModelConfig, ProbeConfig, load_config
from sarjepa_dist.model.encoder import build_encoder
from sarjepa_dist.probe import build_probe_set, run_probe, score_features, stratified_rows


def _chips(n_per_class: int, separable: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: a bright square top-left, class 1: bottom-right (or noise only when not separable)."""
    rng = np.random.default_rng(seed)
    chips, labels = [], []
    for c in (0, 1):
        for _ in range(n_per_class):
            a = rng.exponential(1.0, size=(1, 32, 32)).astype(np.float32)
            if separable:
                r = slice(2, 12) if c == 0 else slice(20, 30)
                a[:, r, r] *= 20.0
            chips.append(a)
            labels.append(c)
    return np.stack(chips), np.array(labels)


def _probe_cfg(**kw) -> ProbeConfig:
    base = dict(every=1, shots=5, episodes=3, test_fraction=0.3, max_per_class=None, methods=["knn", "linear"],
                pooling="grid2", seed=0)
    base.update(kw)
    return ProbeConfig(**base)


def test_probe_scores_separable_chips_high_and_noise_near_chance():
    data_cfg, grad_cfg = DataConfig(img_size=32), GradientConfig(radii=(2, 3))
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(patch_size=8, depth=2), 32, 1)
    for separable, check in ((True, lambda a: a > 0.9), (False, lambda a: a < 0.8)):
        chips, labels = _chips(20, separable)
        ps = build_probe_set(chips, labels, _probe_cfg(), data_cfg, grad_cfg, keys=("x",))
        out = run_probe(enc, ps, "x", _probe_cfg(), extra_poolings=("mean",))
        assert check(out["probe_knn"]), (separable, out)
        assert check(out["probe_linear"]), (separable, out)
        assert {"probe_knn/mean", "probe_linear/mean", "probe_feat_std", "probe_eff_rank"} <= set(out)
        assert 1.0 <= out["probe_eff_rank"] <= 192


def test_probe_split_is_stratified_fixed_and_disjoint():
    chips, labels = _chips(20, True)
    cfg = _probe_cfg(max_per_class=10)
    a = build_probe_set(chips, labels, cfg, DataConfig(img_size=32), GradientConfig(radii=(2,)), keys=("x", "gx"))
    b = build_probe_set(chips, labels, cfg, DataConfig(img_size=32), GradientConfig(radii=(2,)), keys=("x", "gx"))
    assert len(a.labels) == 20 and set(a.inputs) == {"x", "gx"}
    assert np.bincount(a.labels[a.test]).tolist() == [3, 3]
    assert not set(a.pool) & set(a.test)
    assert torch.equal(a.inputs["x"], b.inputs["x"])


def test_stratified_rows_split_each_class_by_the_fraction_and_keep_one_for_the_pool():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 1 + [-1] * 3)  # -1: unlabelled, never drawn
    pool, test = stratified_rows(labels, None, 0.3, seed=1)
    assert np.bincount(labels[test], minlength=3).tolist() == [3, 2, 1]
    assert np.bincount(labels[pool], minlength=3).tolist() == [7, 5, 0]
    assert not set(pool) & set(test) and (labels[np.concatenate([pool, test])] >= 0).all()
    capped_pool, capped_test = stratified_rows(labels, 4, 0.3, seed=1)
    assert np.bincount(labels[np.concatenate([capped_pool, capped_test])], minlength=3).tolist() == [4, 4, 1]
    again, _ = stratified_rows(labels, None, 0.3, seed=1)
    other, _ = stratified_rows(labels, None, 0.3, seed=2)
    assert np.array_equal(pool, again) and not np.array_equal(pool, other)


def test_score_features_uses_the_same_supports_for_every_encoder():
    chips, labels = _chips(20, True)
    ps = build_probe_set(chips, labels, _probe_cfg(methods=["knn"]), DataConfig(img_size=32),
                         GradientConfig(radii=(2,)), keys=("x",))
    perfect = np.eye(2)[ps.labels] * 10
    assert score_features(perfect, ps, _probe_cfg(methods=["knn"])) == {"knn": 1.0}


def test_probe_too_few_chips_for_the_shots_is_refused():
    chips, labels = _chips(6, True)
    with pytest.raises(ValueError, match="probe.shots = 5"):
        build_probe_set(chips, labels, _probe_cfg(), DataConfig(img_size=32), GradientConfig(radii=(2,)), keys=("x",))


def test_probe_config_is_validated_with_the_key_named():
    with pytest.raises(ConfigError, match="probe.pooling"):
        load_config(None, ["probe.pooling=cls"])
    with pytest.raises(ConfigError, match="probe.max_per_class = 10 leaves fewer than probe.shots"):
        load_config(None, ["probe.max_per_class=10", "probe.shots=10"])
    with pytest.raises(ConfigError, match="probe.methods"):
        load_config(None, ["probe.methods=[svm]"])
