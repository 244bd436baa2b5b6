"""Tests of the physics-based synthetic SAR generator (small N; the whole file runs in seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sarjepa_dist.config import ConfigError
from sarjepa_dist.data import synth
from sarjepa_dist.data.shards import load_arrays, read_manifest
from sarjepa_dist.data.synth import (
    SynthConfig, clutter_only, generate, impulse_response, make_class_templates, render,
    taylor_coefficients, write_synthetic_dataset,
)

SMALL = dict(num_classes=4, per_class=6)


def _cv(intensity: np.ndarray) -> float:
    return float(intensity.std() / intensity.mean())


def _cv_tolerance(cfg: SynthConfig, n_pixels: int, se_unit: float) -> float:
    """5 standard errors of the sample CV. For iid Gamma(L, 1/L) samples, SE(CV) ≈ se_unit/√n
    (simulated: 0.96 for L = 1, 0.41 for L = 4). Speckle is correlated over a resolution cell, so the
    number of independent samples is taken as pixels / 4 (the cell is (resolution/spacing)² = 2.25 px²
    by default; 4 is a conservative bound)."""
    assert cfg.resolution_m / cfg.pixel_spacing_m <= 2.0
    return 5 * se_unit / math.sqrt(n_pixels / 4)


# --------------------------------------------------------------------------- shapes and determinism


def test_shapes_dtypes_and_metadata():
    cfg = SynthConfig(**SMALL, size=48)
    b = generate(cfg)
    n = cfg.num_classes * cfg.per_class
    assert b.chips.shape == (n, 1, 48, 48) and b.chips.dtype == np.float32
    assert b.labels.shape == (n,) and b.labels.dtype == np.int64
    assert b.azimuth_deg.shape == (n,) and b.depression_deg.shape == (n,)
    assert ((b.azimuth_deg >= 0) & (b.azimuth_deg < 360)).all()
    assert set(np.unique(b.depression_deg)) == {15.0, 17.0}
    assert b.class_names == [f"class_{k:02d}" for k in range(cfg.num_classes)]
    assert np.isfinite(b.chips).all() and (b.chips >= 0).all() and (b.chips > 0).mean() > 0.99
    assert (b.index == np.arange(n)).all()


def test_same_seed_same_bytes_other_seed_differs():
    cfg = SynthConfig(**SMALL)
    a, b = generate(cfg), generate(SynthConfig(**SMALL))
    assert a.chips.tobytes() == b.chips.tobytes()
    assert (a.labels == b.labels).all() and (a.azimuth_deg == b.azimuth_deg).all()
    c = generate(SynthConfig(**SMALL, seed=1))
    assert not np.array_equal(a.chips, c.chips)
    assert not np.array_equal(a.azimuth_deg, c.azimuth_deg)


def test_any_chunking_gives_the_same_rows():
    cfg = SynthConfig(num_classes=3, per_class=100, size=32)  # 300 chips: crosses an internal block
    assert cfg.num_chips > synth.BLOCK
    full = generate(cfg)
    for start, stop in ((0, 7), (250, 262), (synth.BLOCK, 300), (299, 300)):
        part = generate(cfg, start=start, stop=stop)
        assert part.chips.tobytes() == full.chips[start:stop].tobytes()
        assert (part.labels == full.labels[start:stop]).all()
        assert (part.index == np.arange(start, stop)).all()
    pieces = [b.chips for b in synth.iter_blocks(cfg, 5, 290)]
    assert np.concatenate(pieces).tobytes() == full.chips[5:290].tobytes()


def test_class_templates_depend_only_on_class_seed_and_index():
    a = make_class_templates(3, class_seed=7)
    b = make_class_templates(6, class_seed=7)
    for ta, tb in zip(a, b):
        assert ta.name == tb.name
        assert np.array_equal(ta.pos, tb.pos) and np.array_equal(ta.amp, tb.amp)
        assert np.array_equal(ta.boxes, tb.boxes)
    c = make_class_templates(3, class_seed=8)
    assert not np.array_equal(a[0].pos, c[0].pos)
    # same class_seed → same targets whatever the chip seed
    x = render(SynthConfig(**SMALL, seed=0), [1], [30.0], [17.0], seed=3)
    y = render(SynthConfig(**SMALL, seed=5), [1], [30.0], [17.0], seed=3)
    assert np.array_equal(x.chips, y.chips)


def test_class_balance_and_depression_split():
    cfg = SynthConfig(num_classes=5, per_class=10)
    b = generate(cfg)
    assert np.bincount(b.labels, minlength=5).tolist() == [10] * 5
    for k in range(5):
        d = b.depression_deg[b.labels == k]
        assert (d == 17.0).sum() == 5 and (d == 15.0).sum() == 5
    assert not (np.diff(b.labels) >= 0).all()  # shuffled by default
    s = generate(SynthConfig(num_classes=5, per_class=10, shuffle=False))
    assert (np.diff(s.labels) >= 0).all()  # class-sorted
    three = generate(SynthConfig(num_classes=2, per_class=7, depressions=(17.0, 15.0, 30.0)))
    for k in range(2):
        counts = sorted(np.unique(three.depression_deg[three.labels == k], return_counts=True)[1].tolist())
        assert counts == [2, 2, 3]


def test_validation_errors_name_the_key():
    with pytest.raises(ConfigError, match="texture"):
        generate(SynthConfig(texture="lognormal"))
    with pytest.raises(ConfigError, match="gain_range"):
        generate(SynthConfig(gain_range=(3.0, 0.3)))
    with pytest.raises(ConfigError, match="depressions"):
        generate(SynthConfig(depressions=()))


# --------------------------------------------------------------------------- physics


def test_taylor_impulse_response_sidelobes():
    F = taylor_coefficients(4, 35.0)
    x = np.linspace(0, 30, 30001)
    h = impulse_response(x, 1.0, F)
    assert h[0] == pytest.approx(1.0)
    first_null = np.argmax(np.diff(np.abs(h)) > 0)  # |h| stops falling at the first null
    peak_sidelobe_db = 20 * np.log10(np.abs(h[first_null:]).max())
    assert -36.5 < peak_sidelobe_db < -33.5  # a Taylor n̄=4 window holds its sidelobes near -35 dB
    assert x[first_null] > 1.0  # weighting widens the main lobe (the bare sinc's first null is at 1)
    bare = np.abs(np.sinc(x[x >= 1.0]))
    assert 20 * np.log10(bare.max()) > -14  # the unweighted sinc: -13.3 dB


@pytest.mark.parametrize("looks,se_unit", [(1, 0.96), (4, 0.41)])
def test_clutter_intensity_coefficient_of_variation(looks, se_unit):
    """Single-look complex Gaussian clutter: exponential intensity, CV 1; L looks: Gamma(L, 1/L), 1/√L."""
    cfg = SynthConfig(texture="none", looks=looks, seed=11, clutter_jitter_db=0.0)  # one clutter level
    amp = clutter_only(cfg, 32).astype(np.float64)
    inten = amp ** 2
    tol = _cv_tolerance(cfg, inten.size, se_unit)
    assert abs(_cv(inten) - 1 / math.sqrt(looks)) < tol, (_cv(inten), tol)
    # amplitude of one look is Rayleigh: mean/rms = √π / 2
    if looks == 1:
        assert amp.mean() / np.sqrt(inten.mean()) == pytest.approx(math.sqrt(math.pi) / 2, abs=0.01)


def test_gamma_texture_makes_k_distributed_clutter():
    """Gamma texture × speckle: CV² = 1 + 2/ν for a texture constant over the speckle cell; bilinear
    smoothing of the texture lowers its variance, so the CV lies between 1 and that bound."""
    nu = 2.0
    cfg = SynthConfig(texture="gamma", texture_shape=nu, seed=4, clutter_jitter_db=0.0)
    inten = clutter_only(cfg, 32).astype(np.float64) ** 2
    cv = _cv(inten)
    assert 1.1 < cv < math.sqrt(1 + 2 / nu) + 0.05, cv


def test_gain_range_is_applied_and_is_a_pure_scale():
    cfg = SynthConfig(**SMALL)
    b = generate(cfg)
    assert ((b.gain >= 0.3) & (b.gain <= 3.0)).all()
    assert b.gain.min() < 0.7 and b.gain.max() > 1.4  # log-uniform over a decade
    unit = generate(SynthConfig(**SMALL, gain_range=(1.0, 1.0)))
    assert np.allclose(unit.gain, 1.0)
    np.testing.assert_allclose(b.chips, unit.chips * b.gain[:, None, None, None].astype(np.float32),
                               rtol=1e-5, atol=1e-7)


def test_shadow_is_darker_than_clutter_and_longer_at_lower_depression():
    cfg = SynthConfig(num_classes=3, per_class=1, texture="none", ramp_db=0.0, gain_range=(1.0, 1.0))
    labels = np.repeat(np.arange(3), 4)
    az = np.tile([10.0, 100.0, 200.0, 290.0], 3)
    b = render(cfg, labels, az, 15.0, return_masks=True)
    target = b.footprint_mask | b.shadow_mask
    ratios = []
    for i in range(len(b)):
        inten = b.chips[i, 0].astype(np.float64) ** 2
        sh = b.shadow_mask[i]
        # deep shadow: shadow pixels whose 5x5 neighbourhood is all shadow (away from the target's sidelobes)
        pad = np.pad(sh, 2)
        deep = np.ones_like(sh)
        for dy in range(5):
            for dx in range(5):
                deep &= pad[dy:dy + sh.shape[0], dx:dx + sh.shape[1]]
        far = np.ones_like(sh)
        rows = np.nonzero(target.any(1))[0]
        far[max(rows.min() - 6, 0): rows.max() + 7] = False  # clutter rows clear of the target
        assert deep.sum() > 10 and far.sum() > 200
        ratios.append(inten[deep].mean() / inten[far].mean())
    ratios = np.array(ratios)
    assert (ratios < 0.3).all(), ratios  # more than 5 dB darker in every chip
    assert np.median(ratios) < 10 ** (-8 / 10)
    # shadow length h / tan ψ: a lower depression casts a longer shadow
    b17 = render(cfg, labels, az, 17.0, return_masks=True)
    assert (b.shadow_mask.sum((1, 2)) > b17.shadow_mask.sum((1, 2))).all()
    # and the shadow lies on the far-range side (larger rows) of the footprint
    for i in range(len(b)):
        ys, _ = np.nonzero(b.shadow_mask[i])
        yf, _ = np.nonzero(b.footprint_mask[i])
        assert ys.mean() > yf.mean()


def test_edges_flash_near_broadside():
    """An edge's response depends on the angle between its normal and the line of sight."""
    cfg = SynthConfig(num_classes=1, per_class=1, clutter_to_target_db=-60, amp_jitter_db=0, dropout=0,
                      position_jitter_m=0, translate_px=0, ramp_db=0, gain_range=(1, 1), texture="none")
    t = make_class_templates(1, cfg.class_seed)[0]
    plates = [g for g in np.unique(t.group[t.kind == synth.KIND_PLATE])]
    assert plates, "template without plates"
    # a template with only the first plate: it must peak when its normal faces the radar
    sel = t.group == plates[0]
    normal = float(t.facing[sel][0])
    one = synth.TargetTemplate(t.name, t.length_m, t.width_m, t.height_m, t.boxes, t.pos[sel], t.amp[sel],
                               t.facing[sel], t.kind[sel], t.lobe[sel], np.zeros(sel.sum(), np.int64))
    # the radar direction in the body frame is atan2(-cos θ, -sin θ); solve for the azimuth θ facing it
    theta_face = math.degrees(math.atan2(-math.cos(normal), -math.sin(normal))) % 360
    az = theta_face + np.array([0.0, 30.0, 90.0, 180.0])
    b = render(cfg, np.zeros(4, np.int64), az, 17.0, templates=[one])
    peak = b.chips[:, 0].max((1, 2))
    assert peak[0] > 5 * peak[1]  # 30° off the normal: a sidelobe of the flash (first null 3–12°)
    assert peak[0] > 10 * peak[2:].max()  # side-on and from behind: nothing


def test_classes_differ_more_than_speckle():
    """Same class and angle with new speckle, phases and jitter vs a different class at the same angle:
    the latter is farther (amplitude, so the bright scatterers weigh; the benchmark measures the rest)."""
    cfg = SynthConfig(num_classes=6, per_class=1, gain_range=(1.0, 1.0), ramp_db=0.0)
    t = make_class_templates(6, cfg.class_seed)
    lengths = np.array([x.length_m for x in t])
    assert np.ptp(lengths) > 1.0 and len({len(x.amp) for x in t}) > 1
    az = np.linspace(0, 360, 8, endpoint=False)
    labels = np.repeat(np.arange(6), len(az))
    azs = np.tile(az, 6)
    a = render(cfg, labels, azs, 17.0, seed=1).chips[:, 0].astype(np.float64).reshape(6, len(az), -1)
    b = render(cfg, labels, azs, 17.0, seed=2).chips[:, 0].astype(np.float64).reshape(6, len(az), -1)
    same = np.mean([np.linalg.norm(a[k] - b[k], axis=-1).mean() for k in range(6)])
    other = np.mean([np.linalg.norm(a[k] - b[j], axis=-1).mean() for k in range(6) for j in range(6) if j != k])
    assert other > 1.1 * same, (same, other)


# --------------------------------------------------------------------------- shards


def test_write_synthetic_dataset_round_trips(tmp_path):
    cfg = SynthConfig(num_classes=3, per_class=6, size=32, seed=3)
    dest = str(tmp_path / "synth")
    manifest = write_synthetic_dataset(dest, cfg, target_shard_mib=0.02, command=["sarjepa", "synth"])
    assert manifest.num_chips == 18 and len(manifest.shards) > 1
    assert manifest.class_names == ["class_00", "class_01", "class_02"]
    assert manifest.per_class_counts == {"class_00": 6, "class_01": 6, "class_02": 6}
    assert manifest.chip_shape == [1, 32, 32] and manifest.chip_dtype == "float32"
    assert manifest.crop_policy == {"mode": "none", "size": 32}
    assert manifest.source.startswith("synthetic:") and '"seed":3' in manifest.source
    assert manifest.stats["synth_config"]["per_class"] == 6
    assert read_manifest(dest).dataset_id == manifest.dataset_id

    got = load_arrays(dest)
    ref = generate(cfg)
    assert got.bad == {}
    assert got.chip_ids == [f"synth-3-{i:07d}" for i in range(18)]
    assert got.chips.tobytes() == ref.chips.tobytes()
    assert (got.labels == ref.labels).all()
    np.testing.assert_allclose(got.metadata["depression_deg"], ref.depression_deg)
    np.testing.assert_allclose(got.metadata["azimuth_deg"], ref.azimuth_deg, atol=1e-4)  # float32 column
    assert set(got.metadata["sensor"]) == {"synthetic-xband"}
    assert got.class_names == ref.class_names
