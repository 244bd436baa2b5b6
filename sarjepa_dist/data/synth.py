"""Physics-based synthetic SAR target chips (vectorised numpy; no GPU, no scipy).

What carries the class, and what is nuisance
--------------------------------------------
A *class* is a rigid vehicle drawn once from ``class_seed`` (:func:`make_class_templates`): a hull box
(5–10 m long), optionally a superstructure ("turret") box and a thin barrel, and a set of scattering
centres in the body frame:

* **points** (corners, hatches, wheels, ...) with their own RCS, height and a cos^q azimuth lobe
  (q = 0 is isotropic; q > 0 points are hidden from behind, as occlusion by the body would do);
* **elongated edges** (side-skirt / wheel-line dihedrals, front and rear plates, turret sides, the
  barrel as a cylinder, a few odd internal edges): a line of sub-points spaced at half a resolution
  cell that shares one phase and one amplitude, and *flashes* only when the radar line of sight is
  within a few degrees of the edge normal: amplitude ∝ |sinc(Δ/Δ₀)| (Δ the angle between the normal
  and the line of sight, Δ₀ the first null), one-sided for plates/dihedrals, two-sided for cylinders,
  plus a small floor for edge diffraction.

A *chip* is that vehicle seen at a random azimuth (uniform over ``azimuth_range``) and one of the
configured depression angles ψ, rendered as a coherent complex image:

* each scatterer at height z lays over toward the radar by ``z·tan ψ`` (ground-range image);
* the complex sum ``Σ a_i e^{jφ_i} h(r − r_i) h(c − c_i)`` goes through a separable 2-D **Taylor-weighted
  sinc** impulse response (default n̄ = 4, −35 dB sidelobes, as MSTAR) evaluated at the exact
  sub-pixel offsets of every scatterer — one batched matrix product per block of chips;
* the ground is complex Gaussian reflectivity (speckle comes from the coherent sum) with an optional
  gamma texture (K-distributed clutter), filtered by the *same* band-limited response in the
  frequency domain so that speckle grains have the size of a resolution cell;
* the ground under the vehicle is replaced by weaker diffuse body returns, and the **radar shadow** —
  every ground point whose ray toward the radar passes through a box of the vehicle (length ≈
  ``h / tan ψ`` on the far-range side) — holds only receiver noise;
* ``looks`` > 1 averages the intensity over independent clutter/noise realisations (the targets'
  coherent response is the same in every look), so clutter intensity is Gamma(L, 1/L);
* finally the amplitude gets a random global gain (log-uniform in ``gain_range``) and a slow linear
  illumination ramp (up to ``ramp_db`` across the chip, random direction).

Per-chip nuisance on the target itself: random phase per scatterer, log-normal amplitude jitter,
random drop-out of scatterers (articulation / obscuration), small position jitter, a translation of
the whole target of up to ``translate_px`` pixels, and a per-chip clutter level jitter.

Geometry conventions: rows are ground range (the radar looks from the top of the chip, so the
shadow falls toward larger row indices), columns are cross-range (azimuth). The target's body
u-axis points along ``(cos θ, sin θ)`` in (column, row) at azimuth θ.

Determinism and chunking
------------------------
Chip *i* is fully defined by ``(cfg, i)``: per-chip metadata (label, depression, azimuth) is drawn once
from one stream, and the pixels are generated in fixed internal blocks of :data:`BLOCK` chips, each
block from its own stream (``SeedSequence(seed, spawn_key=(1, block))``). So any ``start``/``stop`` range
(:func:`generate` with ``start``/``stop``) returns exactly the same bytes as the same rows of the full
dataset, whatever the caller's chunking. Changing ``num_classes``/``per_class`` changes the dataset.
"Same bytes" holds for one numpy build on one CPU type; float32 FFT/BLAS kernels may round differently
elsewhere (differences of a few ulps, never in labels or angles).

Chip order is **shuffled** by default (``shuffle=True``): classes and depressions interleave, so any
contiguous shard holds every class. With ``shuffle=False`` the order is class-sorted. Either way each
class holds exactly ``per_class`` chips, and within a class the depressions cycle through
``depressions`` (so ``per_class`` = 100 with (17°, 15°) gives 50 + 50).

Units: the clutter level is relative to a unit-amplitude point scatterer's peak intensity:
``clutter_to_target_db`` = 10·log10(mean clutter pixel intensity / 1). The templates' point scatterers
have median amplitude 1 (log-normal RCS spread), edges are stronger when they flash.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from sarjepa_dist.config import ConfigError, check_choice, check_pair, check_range
from sarjepa_dist.data.shards import ChipRecord, Manifest, ShardWriter

BLOCK = 256  # chips per internal generation block (fixed: part of the definition of the dataset)
SENSOR = "synthetic-xband"

# element kinds
KIND_POINT = 0  # cos^q lobe around the facing direction (q = 0: isotropic)
KIND_PLATE = 1  # one-sided flash (dihedral / flat plate), |sinc(Δ/Δ0)| for |Δ| < 90°
KIND_CYLINDER = 2  # two-sided flash (cylinder: specular from both sides of its axis)


# --------------------------------------------------------------------------- configuration


@dataclass
class SynthConfig:
    """Every knob of the synthetic generator. Lengths in metres, angles in degrees, levels in dB."""

    num_classes: int = 10
    per_class: int = 100
    size: int = 64  # chip side, pixels
    seed: int = 0  # per-chip randomness (azimuth, speckle, jitter, gain, ...)
    class_seed: int = 1234  # the targets themselves: class k is the same vehicle for one class_seed
    looks: int = 1  # intensity averaged over this many independent speckle realisations
    clutter_to_target_db: float = -18.0  # mean clutter intensity / unit-amplitude point scatterer peak
    clutter_jitter_db: float = 3.0  # per-chip clutter level, uniform ± this
    noise_to_clutter_db: float = -14.0  # receiver noise floor (what remains in the shadow)
    body_to_clutter_db: float = 3.0  # diffuse returns from the vehicle body over its footprint
    depressions: tuple[float, ...] = (17.0, 15.0)  # cycled within each class
    azimuth_range: tuple[float, float] = (0.0, 360.0)
    pixel_spacing_m: float = 0.4  # 64 px x 0.4 m = 25.6 m, the ground extent of an MSTAR 128 px chip
    resolution_m: float = 0.6  # 1/bandwidth of the impulse response (1.5x oversampled, as MSTAR)
    taylor_nbar: int = 4
    taylor_sll_db: float = 35.0  # peak sidelobe level of the Taylor weighting (MSTAR: about -35 dB)
    texture: str = "gamma"  # gamma: K-distributed clutter (gamma texture x speckle) | none: Rayleigh
    texture_shape: float = 4.0  # gamma shape ν of the texture (mean 1, variance 1/ν)
    texture_cell_px: int = 6  # texture correlation length (bilinear between iid gamma nodes)
    amp_jitter_db: float = 1.5  # per-chip log-normal jitter of each scatterer's amplitude (std, dB)
    dropout: float = 0.05  # per-chip probability that a scatterer is missing
    position_jitter_m: float = 0.1  # per-chip std of each scatterer's horizontal position
    translate_px: float = 1.0  # target centre moves uniformly within ± this many pixels
    gain_range: tuple[float, float] = (0.3, 3.0)  # global amplitude gain, log-uniform
    ramp_db: float = 3.0  # illumination ramp across the chip, uniform in [0, ramp_db], random direction
    shuffle: bool = True  # False: class-sorted order

    def validate(self, p: str = "synth") -> "SynthConfig":
        check_range(f"{p}.num_classes", self.num_classes, 1)
        check_range(f"{p}.per_class", self.per_class, 1)
        check_range(f"{p}.size", self.size, 8)
        check_range(f"{p}.looks", self.looks, 1)
        check_range(f"{p}.clutter_jitter_db", self.clutter_jitter_db, 0)
        check_range(f"{p}.pixel_spacing_m", self.pixel_spacing_m, 0, lo_open=True)
        check_range(f"{p}.resolution_m", self.resolution_m, self.pixel_spacing_m)
        check_range(f"{p}.taylor_nbar", self.taylor_nbar, 1)
        check_range(f"{p}.taylor_sll_db", self.taylor_sll_db, 13.26)
        check_choice(f"{p}.texture", self.texture, ("gamma", "none"))
        check_range(f"{p}.texture_shape", self.texture_shape, 0, lo_open=True)
        check_range(f"{p}.texture_cell_px", self.texture_cell_px, 1)
        check_range(f"{p}.amp_jitter_db", self.amp_jitter_db, 0)
        check_range(f"{p}.dropout", self.dropout, 0, 1, hi_open=True)
        check_range(f"{p}.position_jitter_m", self.position_jitter_m, 0)
        check_range(f"{p}.translate_px", self.translate_px, 0)
        check_pair(f"{p}.gain_range", tuple(self.gain_range), 0)
        if self.gain_range[0] <= 0:
            raise ConfigError(f"{p}.gain_range = {list(self.gain_range)} must be > 0 (log-uniform)")
        check_pair(f"{p}.azimuth_range", tuple(self.azimuth_range))
        check_range(f"{p}.ramp_db", self.ramp_db, 0)
        if not self.depressions:
            raise ConfigError(f"{p}.depressions is empty; give at least one angle, e.g. [17, 15]")
        for d in self.depressions:
            check_range(f"{p}.depressions[]", float(d), 0, 90, lo_open=True, hi_open=True)
        return self

    @property
    def num_chips(self) -> int:
        return self.num_classes * self.per_class

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depressions"] = list(self.depressions)
        d["azimuth_range"] = list(self.azimuth_range)
        d["gain_range"] = list(self.gain_range)
        return d

    def source_string(self) -> str:
        """``synthetic:<params>``: the manifest's ``source``; every knob, compact and reproducible."""
        return "synthetic:" + json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- class templates


@dataclass
class TargetTemplate:
    """One rigid target in its body frame (u along the length, v across, z up; metres).

    ``boxes`` (B, 6) rows ``[u, v, length, width, z_low, z_high]``: volumes that cast shadow; boxes
    with ``z_low == 0`` stand on the ground and hide it. Row 0 is the hull.
    Elements (K of them; edges are already split into sub-points): ``pos`` (K, 3), ``amp`` (K,),
    ``facing`` (K,) radians from the u-axis, ``kind`` (K,) KIND_*, ``lobe`` (K,) the cos exponent q
    for points or the flash's first-null angle in radians for edges, ``group`` (K,) index of the
    scatterer the element belongs to (one per point, one per edge: shared phase, jitter, drop-out).
    """

    name: str
    length_m: float
    width_m: float
    height_m: float  # highest point (hull or superstructure)
    boxes: np.ndarray
    pos: np.ndarray
    amp: np.ndarray
    facing: np.ndarray
    kind: np.ndarray
    lobe: np.ndarray
    group: np.ndarray
    parts: dict[str, int] = field(default_factory=dict)  # counts by part type, for summaries

    @property
    def num_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "length_m": round(self.length_m, 2), "width_m": round(self.width_m, 2),
                "height_m": round(self.height_m, 2), "elements": int(len(self.amp)),
                "scatterers": self.num_groups, **self.parts}


class _Builder:
    """Accumulates points and edges of one template."""

    def __init__(self, sub_spacing: float):
        self.sub = sub_spacing
        self.rows: list[tuple[float, float, float, float, float, int, float, int]] = []
        self.g = 0
        self.parts: dict[str, int] = {}

    def point(self, part: str, u: float, v: float, z: float, amp: float, facing: float, q: float) -> None:
        self.rows.append((u, v, z, amp, facing, KIND_POINT, q, self.g))
        self.g += 1
        self.parts[part] = self.parts.get(part, 0) + 1

    def edge(self, part: str, u: float, v: float, z: float, length: float, direction: float, amp: float,
             normal: float, null_rad: float, kind: int) -> None:
        """A straight edge centred at (u, v, z) along ``direction``; ``amp`` per resolution cell."""
        n = max(2, int(math.ceil(length / self.sub)) + 1)
        t = np.linspace(-length / 2, length / 2, n)
        # sub-points spaced by ~resolution/2 sum coherently to ~amp per resolution cell along the line
        a = amp * (length / max(n - 1, 1)) / (2 * self.sub)
        for ti in t:
            self.rows.append((u + ti * math.cos(direction), v + ti * math.sin(direction), z, a, normal,
                              kind, null_rad, self.g))
        self.g += 1
        self.parts[part] = self.parts.get(part, 0) + 1


def make_class_templates(num_classes: int, class_seed: int, resolution_m: float = 0.6) -> list[TargetTemplate]:
    """Class ``k`` is drawn from its own stream ``default_rng([class_seed, k])``: the same vehicle for a
    given ``class_seed`` whatever ``num_classes`` is. ``resolution_m`` only sets how finely edges are
    split into sub-points (half a resolution cell)."""
    return [_make_template(k, class_seed, resolution_m) for k in range(num_classes)]


def _add_superstructure(rng: np.random.Generator, b: _Builder, boxes: list[list[float]], L: float, W: float,
                        h: float) -> float:
    """Maybe a turret / cabin box on the hull (its sides dihedrals with the hull roof) and a barrel;
    appends their boxes and returns the vehicle's top height."""
    U = rng.uniform
    if not rng.random() < 0.75:
        return h
    ls, ws = U(0.25, 0.5) * L, U(0.55, 0.9) * W
    us, vs = U(-0.5, 0.5) * (L - ls), U(-0.25, 0.25) * (W - ws)
    top = h + U(0.5, 1.3)
    boxes.append([us, vs, ls, ws, h, top])
    for side in range(4):  # turret sides: dihedrals with the hull roof
        if rng.random() < 0.55:
            normal = side * math.pi / 2
            along = ls if side % 2 else ws  # a side facing ±u runs along v (length ws)
            cu = us + (ls / 2) * math.cos(normal)
            cv = vs + (ws / 2) * math.sin(normal)
            b.edge("turret_edge", cu, cv, h, along * U(0.6, 1.0), normal + math.pi / 2,
                   U(1.0, 2.5), normal, math.radians(U(4, 10)), KIND_PLATE)
    if rng.random() < 0.6:
        bl = U(2.0, 4.5)
        sgn = 1.0 if rng.random() < 0.7 else -1.0
        cu = us + sgn * (ls / 2 + bl / 2) * 0.9
        zb = top - U(0.15, 0.4)
        boxes.append([cu, vs, bl, 0.3, zb - 0.1, zb + 0.1])
        b.edge("barrel", cu, vs, zb, bl, 0.0, U(1.0, 2.5), math.pi / 2, math.radians(U(3, 6)),
               KIND_CYLINDER)
        b.point("muzzle", cu + sgn * bl / 2, vs, zb, U(0.4, 1.0), 0.0, 0.0)
    return top


def _add_side_dihedrals_and_wheels(rng: np.random.Generator, b: _Builder, L: float, W: float) -> None:
    """Side skirts / wheel lines (dihedrals with the ground) and discrete wheels, on both sides."""
    U = rng.uniform
    n_wheels = int(rng.integers(3, 8)) if rng.random() < 0.6 else 0
    wheel_span = U(0.6, 0.9) * L
    for sgn in (1.0, -1.0):
        if rng.random() < 0.9:
            ln = U(0.6, 0.95) * L
            b.edge("side_dihedral", U(-0.05, 0.05) * L, sgn * W / 2, U(0.3, 0.8), ln, 0.0, U(1.0, 3.0),
                   sgn * math.pi / 2, math.radians(U(3, 9)), KIND_PLATE)
        for u in np.linspace(-wheel_span / 2, wheel_span / 2, n_wheels) if n_wheels else []:
            b.point("wheel", float(u), sgn * W / 2 * 0.95, 0.4, U(0.4, 1.2), sgn * math.pi / 2, 1.0)


def _add_end_plates(rng: np.random.Generator, b: _Builder, L: float, W: float, h: float) -> None:
    """Front and rear plates."""
    U = rng.uniform
    for sgn in (1.0, -1.0):
        if rng.random() < 0.8:
            b.edge("end_plate", sgn * L / 2, U(-0.1, 0.1) * W, U(0.4, h), U(0.5, 1.0) * W, math.pi / 2,
                   U(0.8, 2.5), 0.0 if sgn > 0 else math.pi, math.radians(U(4, 12)), KIND_PLATE)


def _add_internal_edges(rng: np.random.Generator, b: _Builder, L: float, W: float, h: float, top: float) -> None:
    """A few odd internal edges (hatches, racks, stowage)."""
    U = rng.uniform
    for _ in range(int(rng.integers(0, 4))):
        d = U(0, math.pi)
        b.edge("internal_edge", U(-0.4, 0.4) * L, U(-0.35, 0.35) * W, U(h * 0.6, top), U(0.8, 2.5), d,
               U(0.7, 2.0), d + math.pi / 2 * (1 if rng.random() < 0.5 else -1), math.radians(U(4, 12)),
               KIND_PLATE)


def _lognormal_amplitude(rng: np.random.Generator, sigma_db: float) -> float:
    return float(10 ** (rng.normal(0.0, sigma_db) / 20))


def _add_roof_corners(rng: np.random.Generator, b: _Builder, L: float, W: float, h: float) -> None:
    """Hull-roof corners (trihedral-like, facing outward diagonally)."""
    for su, sv in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
        if rng.random() < 0.5:
            b.point("corner", su * L / 2, sv * W / 2, h, _lognormal_amplitude(rng, 3.0) * 1.5,
                    math.atan2(sv * W, su * L), 2.0)


def _add_point_scatterers(rng: np.random.Generator, b: _Builder, boxes: list[list[float]], L: float, W: float,
                          h: float) -> None:
    """Generic point scatterers (RCS log-normal, median amplitude 1), some on the superstructure."""
    U = rng.uniform
    has_sup = len(boxes) > 1
    for _ in range(int(rng.integers(6, 17))):
        q = float(rng.choice([0.0, 1.0, 2.0, 4.0], p=[0.25, 0.3, 0.3, 0.15]))
        if has_sup and rng.random() < 0.3:
            bu, bv, bl_, bw, _, bt = boxes[1]
            u, v, z = bu + U(-0.5, 0.5) * bl_, bv + U(-0.5, 0.5) * bw, bt
        else:
            u, v, z = U(-0.48, 0.48) * L, U(-0.48, 0.48) * W, U(0.2, h)
        b.point("point", u, v, z, _lognormal_amplitude(rng, 5.0), U(0, 2 * math.pi), q)


def _make_template(k: int, class_seed: int, resolution_m: float) -> TargetTemplate:
    """One vehicle: a hull box, then its parts in a fixed order (the draws from ``rng`` define it)."""
    rng = np.random.default_rng([int(class_seed), int(k)])
    U = rng.uniform
    b = _Builder(resolution_m / 2)
    L, W, h = U(5.0, 10.0), U(2.4, 3.6), U(1.4, 2.4)
    boxes = [[0.0, 0.0, L, W, 0.0, h]]
    top = _add_superstructure(rng, b, boxes, L, W, h)
    _add_side_dihedrals_and_wheels(rng, b, L, W)
    _add_end_plates(rng, b, L, W, h)
    _add_internal_edges(rng, b, L, W, h, top)
    _add_roof_corners(rng, b, L, W, h)
    _add_point_scatterers(rng, b, boxes, L, W, h)
    arr = np.asarray(b.rows, dtype=np.float64)
    return TargetTemplate(
        name=f"class_{k:02d}", length_m=L, width_m=W, height_m=top,
        boxes=np.asarray(boxes, dtype=np.float64),
        pos=arr[:, 0:3].copy(), amp=arr[:, 3].copy(), facing=arr[:, 4].copy(),
        kind=arr[:, 5].astype(np.int8), lobe=arr[:, 6].copy(), group=arr[:, 7].astype(np.int64),
        parts=dict(b.parts),
    )


@dataclass
class _Bank:
    """Templates padded to common sizes so a block of chips can gather its classes' arrays."""

    pos: np.ndarray  # (C, K, 3)
    amp: np.ndarray  # (C, K); 0 on padding
    facing: np.ndarray
    kind: np.ndarray
    lobe: np.ndarray
    group: np.ndarray  # (C, K)
    boxes: np.ndarray  # (C, B, 6); padding boxes have negative size (never hit)
    num_groups: int

    @classmethod
    def build(cls, templates: list[TargetTemplate]) -> "_Bank":
        C = len(templates)
        K = max(len(t.amp) for t in templates)
        B = max(len(t.boxes) for t in templates)
        pos = np.zeros((C, K, 3))
        amp = np.zeros((C, K))
        facing = np.zeros((C, K))
        kind = np.zeros((C, K), dtype=np.int8)
        lobe = np.zeros((C, K))
        group = np.zeros((C, K), dtype=np.int64)
        boxes = np.tile(np.array([0.0, 0.0, -1.0, -1.0, 1.0, 0.0]), (C, B, 1))
        for c, t in enumerate(templates):
            n = len(t.amp)
            pos[c, :n], amp[c, :n], facing[c, :n] = t.pos, t.amp, t.facing
            kind[c, :n], lobe[c, :n], group[c, :n] = t.kind, t.lobe, t.group
            boxes[c, : len(t.boxes)] = t.boxes
        return cls(pos, amp, facing, kind, lobe, group, boxes, max(t.num_groups for t in templates))


# --------------------------------------------------------------------------- impulse response


def taylor_coefficients(nbar: int = 4, sll_db: float = 35.0) -> np.ndarray:
    """Cosine-series coefficients F_1..F_{n̄-1} of the Taylor window w(ν) = 1 + 2 Σ F_m cos(2π m ν),
    ν ∈ [-1/2, 1/2] (the standard Taylor formula, as ``scipy.signal.windows.taylor``)."""
    B = 10 ** (sll_db / 20)
    A = math.acosh(B) / math.pi
    s2 = nbar ** 2 / (A ** 2 + (nbar - 0.5) ** 2)
    F = np.zeros(max(nbar - 1, 0))
    for m in range(1, nbar):
        num = np.prod([1 - m ** 2 / (s2 * (A ** 2 + (n - 0.5) ** 2)) for n in range(1, nbar)])
        den = 2 * np.prod([1 - m ** 2 / n ** 2 for n in range(1, nbar) if n != m])
        F[m - 1] = (-1) ** (m + 1) * num / den
    return F


def taylor_window(nu: np.ndarray, F: np.ndarray) -> np.ndarray:
    """The Taylor aperture weight at normalised frequency ν (|ν| ≤ 1/2); 0 outside the band."""
    nu = np.asarray(nu, dtype=np.float64)
    w = np.ones_like(nu)
    for m, f in enumerate(F, start=1):
        w += 2 * f * np.cos(2 * np.pi * m * nu)
    return np.where(np.abs(nu) <= 0.5, w, 0.0)


def impulse_response(x_px: np.ndarray, bandwidth_px: float, F: np.ndarray) -> np.ndarray:
    """1-D Taylor-weighted sinc at offsets ``x_px`` (pixels), peak 1 at 0:
    h(x) = sinc(Bx) + Σ_m F_m [sinc(Bx − m) + sinc(Bx + m)], the exact transform of the window."""
    bx = bandwidth_px * np.asarray(x_px, dtype=np.float64)
    h = np.sinc(bx)
    for m, f in enumerate(F, start=1):
        h += f * (np.sinc(bx - m) + np.sinc(bx + m))
    return h


class _PSFTable:
    """h(x) tabulated at 1/128 px over ±(size + 8) px, read with linear interpolation (float32)."""

    STEP = 1.0 / 128

    def __init__(self, size: int, bandwidth_px: float, F: np.ndarray):
        self.half = size + 8.0
        x = np.arange(-self.half, self.half + self.STEP, self.STEP)
        self.table = impulse_response(x, bandwidth_px, F).astype(np.float32)
        self.table = np.append(self.table, self.table[-1])  # guard for the +1 read at the end

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = (np.clip(x, -self.half, self.half) + self.half) * (1.0 / self.STEP)
        i = t.astype(np.int32)
        frac = (t - i).astype(np.float32)
        lo = self.table[i]
        return lo + frac * (self.table[i + 1] - lo)


# --------------------------------------------------------------------------- output


@dataclass
class SynthBatch:
    chips: np.ndarray  # (N, 1, S, S) float32 amplitude
    labels: np.ndarray  # (N,) int64
    azimuth_deg: np.ndarray  # (N,) float64
    depression_deg: np.ndarray  # (N,) float64
    class_names: list[str]
    gain: np.ndarray  # (N,) the global amplitude gain applied to each chip
    index: np.ndarray  # (N,) int64 global chip index (the i of chip_id synth-<seed>-<i>)
    shadow_mask: np.ndarray | None = None  # (N, S, S) bool, only with return_masks=True
    footprint_mask: np.ndarray | None = None  # (N, S, S) bool, ground hidden under the vehicle

    def __len__(self) -> int:
        return len(self.labels)


def _metadata(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, depression angles and azimuths of every chip, in dataset order."""
    rng = np.random.default_rng(np.random.SeedSequence(int(cfg.seed), spawn_key=(0,)))
    C, P = cfg.num_classes, cfg.per_class
    labels = np.repeat(np.arange(C, dtype=np.int64), P)
    deps = np.asarray(cfg.depressions, dtype=np.float64)
    depression = np.tile(deps[np.arange(P) % len(deps)], C)
    lo, hi = cfg.azimuth_range
    azimuth = rng.uniform(lo, hi, size=C * P) % 360.0
    if cfg.shuffle:
        perm = rng.permutation(C * P)
        labels, depression, azimuth = labels[perm], depression[perm], azimuth[perm]
    return labels, depression, azimuth


# --------------------------------------------------------------------------- rendering


@dataclass
class _Nuisance:
    """One block's per-chip random draws (see ``_Renderer.draw_nuisance``)."""

    phase: np.ndarray  # (n, G) per scatterer
    amp_jitter: np.ndarray  # (n, G) log-normal amplitude factor
    keep: np.ndarray  # (n, G) bool, False where a scatterer drops out
    pos_jitter: np.ndarray  # (n, G, 2) horizontal position jitter, metres
    shift: np.ndarray  # (n, 2) target translation, pixels (column, row)
    clutter_db: np.ndarray  # (n,)
    gain: np.ndarray  # (n,)
    ramp_db: np.ndarray  # (n,)
    ramp_dir: np.ndarray  # (n,) radians
    texture: np.ndarray  # (n, S, S) gamma texture (ones without texture)


class _Renderer:
    """Everything that is fixed for one config: templates, PSF table, clutter filter, texture upsampler."""

    def __init__(self, cfg: SynthConfig, templates: list[TargetTemplate] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.templates = templates or make_class_templates(cfg.num_classes, cfg.class_seed, cfg.resolution_m)
        if len(self.templates) < cfg.num_classes:
            raise ConfigError(f"{len(self.templates)} templates for num_classes = {cfg.num_classes}")
        self.bank = _Bank.build(self.templates[: cfg.num_classes])
        S = cfg.size
        self.bw = cfg.pixel_spacing_m / cfg.resolution_m  # bandwidth in cycles per pixel (< 1)
        F = taylor_coefficients(cfg.taylor_nbar, cfg.taylor_sll_db)
        self.psf = _PSFTable(S, self.bw, F)
        f = np.fft.fftfreq(S)
        w1 = taylor_window(f / self.bw, F)
        w2 = np.outer(w1, w1)
        self.filt = (w2 / np.sqrt(np.mean(w2 ** 2))).astype(np.float32)  # unit-variance output
        cell = cfg.texture_cell_px
        nodes = int(math.ceil((S - 1) / cell)) + 1
        r = np.arange(S)[:, None] - cell * np.arange(nodes)[None, :]
        self.tex_up = np.maximum(0.0, 1.0 - np.abs(r) / cell).astype(np.float32)  # (S, nodes)
        self.tex_nodes = nodes
        self.grid = np.arange(S, dtype=np.float32)

    # -- clutter
    def clutter_field(self, rng: np.random.Generator, variance: np.ndarray, looks: int) -> np.ndarray:
        """Band-limited complex Gaussian images (n, L, S, S) with local variance ``variance`` (n, S, S)."""
        n, S = variance.shape[0], self.cfg.size
        w = rng.standard_normal((n, looks, S, S, 2), dtype=np.float32)
        z = w.view(np.complex64)[..., 0]
        z *= np.sqrt(variance / 2.0).astype(np.float32)[:, None]
        Z = np.fft.fft2(z, axes=(-2, -1))
        Z *= self.filt
        return np.fft.ifft2(Z, axes=(-2, -1)).astype(np.complex64, copy=False)

    def texture(self, rng: np.random.Generator, n: int) -> np.ndarray:
        cfg = self.cfg
        if cfg.texture == "none":
            return np.ones((n, cfg.size, cfg.size), dtype=np.float32)
        nu = cfg.texture_shape
        t = rng.gamma(nu, 1.0 / nu, size=(n, self.tex_nodes, self.tex_nodes)).astype(np.float32)
        return self.tex_up @ t @ self.tex_up.T

    # -- geometry
    def shadow_masks(self, boxes: np.ndarray, theta: np.ndarray, tan_psi: np.ndarray, cx: np.ndarray,
              cy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Footprint (ground hidden under a box standing on it) and shadow masks, (n, S, S) bool.

        A ground point p is shadowed by a box when p − d·ê_range lies in the box footprint for some
        d in [z_low, z_high] / tan ψ: the ray from p toward the radar passes through the box. The set
        of such d is the intersection of two slab intervals (one per box axis) with that range."""
        dx = self.cfg.pixel_spacing_m
        g = self.grid
        X = ((g[None, None, :] - cx[:, None, None]) * dx).astype(np.float32)  # (n, 1, S)
        Y = ((g[None, :, None] - cy[:, None, None]) * dx).astype(np.float32)  # (n, S, 1)
        s = np.sin(theta).astype(np.float32)[:, None, None]
        c = np.cos(theta).astype(np.float32)[:, None, None]
        up = X * c + Y * s  # body-frame coordinates of every pixel
        vp = Y * c - X * s
        # ray direction in the body frame is -(sin θ, cos θ); avoid exact zeros
        eps = np.float32(1e-6)
        s_safe = np.where(np.abs(s) < eps, eps, s)
        c_safe = np.where(np.abs(c) < eps, eps, c)
        foot = np.zeros(up.shape, dtype=bool)
        shadow = np.zeros(up.shape, dtype=bool)
        t = tan_psi.astype(np.float32)[:, None, None]
        for bi in range(boxes.shape[1]):
            bu, bv, bl, bw, z0, z1 = (boxes[:, bi, j].astype(np.float32)[:, None, None] for j in range(6))
            du, dv = up - bu, vp - bv
            a1, a2 = (du - bl / 2) / s_safe, (du + bl / 2) / s_safe
            b1, b2 = (dv - bw / 2) / c_safe, (dv + bw / 2) / c_safe
            lo = np.maximum(np.maximum(np.minimum(a1, a2), np.minimum(b1, b2)), z0 / t)
            hi = np.minimum(np.minimum(np.maximum(a1, a2), np.maximum(b1, b2)), z1 / t)
            shadow |= lo <= hi
            on_ground = (z0 <= 0) & (bl > 0)
            foot |= on_ground & (np.abs(du) <= bl / 2) & (np.abs(dv) <= bw / 2)
        return foot, shadow & ~foot

    # -- one block
    def draw_nuisance(self, rng: np.random.Generator, n: int) -> _Nuisance:
        """Every per-chip random draw of a block, always in this order (the block's stream defines
        the chips); only the speckle (``clutter_field``) draws after these."""
        cfg, G = self.cfg, self.bank.num_groups
        phase = rng.uniform(0.0, 2 * np.pi, size=(n, G))
        amp_jitter = 10 ** (rng.normal(0.0, cfg.amp_jitter_db, size=(n, G)) / 20)
        keep = rng.random((n, G)) >= cfg.dropout
        pos_jitter = rng.normal(0.0, cfg.position_jitter_m, size=(n, G, 2))
        shift = rng.uniform(-cfg.translate_px, cfg.translate_px, size=(n, 2))
        clutter_db = cfg.clutter_to_target_db + rng.uniform(-1, 1, size=n) * cfg.clutter_jitter_db
        lg_lo, lg_hi = np.log(cfg.gain_range[0]), np.log(cfg.gain_range[1])
        gain = np.exp(lg_lo + rng.random(n) * (lg_hi - lg_lo))
        ramp_db = rng.random(n) * cfg.ramp_db
        ramp_dir = rng.uniform(0.0, 2 * np.pi, size=n)
        return _Nuisance(phase, amp_jitter, keep, pos_jitter, shift, clutter_db, gain, ramp_db, ramp_dir,
                         self.texture(rng, n))

    def render(self, rng: np.random.Generator, labels: np.ndarray, depression: np.ndarray,
               azimuth: np.ndarray, *, with_target: bool = True, with_gain: bool = True,
               with_ramp: bool = True, return_masks: bool = False) -> dict[str, np.ndarray]:
        """One block of chips: scatterers through the PSF over shadowed, textured clutter → speckle
        → gain and illumination ramp. Returns ``chips`` (n, 1, S, S), ``gain`` and, with
        ``return_masks``, ``footprint_mask`` / ``shadow_mask``."""
        n = len(labels)
        nz = self.draw_nuisance(rng, n)
        theta, tan_psi = np.deg2rad(azimuth), np.tan(np.deg2rad(depression))
        centre = (self.cfg.size - 1) / 2.0
        cx, cy = centre + nz.shift[:, 0], centre + nz.shift[:, 1]
        clutter = 10 ** (nz.clutter_db / 10)  # clutter intensity per pixel
        out: dict[str, np.ndarray] = {"gain": nz.gain if with_gain else np.ones(n)}
        target = foot = shadow = None
        if with_target:
            foot, shadow = self.shadow_masks(self.bank.boxes[labels], theta, tan_psi, cx, cy)
            target = self.scatterer_image(labels, theta, tan_psi, cx, cy, nz)
            if return_masks:
                out["footprint_mask"], out["shadow_mask"] = foot, shadow
        variance = self.ground_variance(clutter, nz.texture, foot, shadow)
        amplitude = self.speckle(rng, variance, target)
        out["chips"] = self.illuminate(amplitude, out["gain"], nz.ramp_db, nz.ramp_dir, with_ramp)
        return out

    def ground_variance(self, clutter: np.ndarray, texture: np.ndarray, foot: np.ndarray | None,
                        shadow: np.ndarray | None) -> np.ndarray:
        """Local variance of the ground return (n, S, S): receiver noise everywhere, plus textured
        clutter where the ground is seen and weaker diffuse body returns over the footprint; the
        shadow keeps only the noise. Without masks (no target) the whole chip is clutter."""
        cfg, S = self.cfg, self.cfg.size
        var = (clutter * 10 ** (cfg.noise_to_clutter_db / 10))[:, None, None] * np.ones((1, S, S))
        if foot is None or shadow is None:
            return var + clutter[:, None, None] * texture
        visible = ~(foot | shadow)
        return var + clutter[:, None, None] * (texture * visible + 10 ** (cfg.body_to_clutter_db / 10) * foot)

    def speckle(self, rng: np.random.Generator, variance: np.ndarray, target: np.ndarray | None) -> np.ndarray:
        """Amplitude (n, S, S): the coherent target plus one clutter realisation per look, intensity
        averaged over the looks."""
        looks = self.clutter_field(rng, variance.astype(np.float32), self.cfg.looks)  # (n, L, S, S)
        if target is not None:
            looks += target[:, None]
        intensity = np.mean(looks.real ** 2 + looks.imag ** 2, axis=1)
        return np.sqrt(intensity)

    def illuminate(self, amplitude: np.ndarray, gain: np.ndarray, ramp_db: np.ndarray, ramp_dir: np.ndarray,
                   with_ramp: bool) -> np.ndarray:
        """The global gain and the slow linear illumination ramp (in dB across the chip): (n, 1, S, S)."""
        S = self.cfg.size
        scale = np.asarray(gain, dtype=np.float32)[:, None, None]
        if with_ramp:
            g = (self.grid - (S - 1) / 2.0) / S
            proj = (np.cos(ramp_dir)[:, None, None] * g[None, None, :]
                    + np.sin(ramp_dir)[:, None, None] * g[None, :, None])
            scale = scale * (10 ** (ramp_db[:, None, None] * proj / 20)).astype(np.float32)
        return (amplitude * scale).astype(np.float32)[:, None]

    def scatterer_image(self, labels: np.ndarray, theta: np.ndarray, tan_psi: np.ndarray, cx: np.ndarray,
                     cy: np.ndarray, nz: _Nuisance) -> np.ndarray:
        """Coherent sum of every scatterer through the separable PSF: (n, S, S) complex64."""
        bank, dx = self.bank, self.cfg.pixel_spacing_m
        grp = bank.group[labels]  # (n, K)
        pos = bank.pos[labels]
        take = lambda a: np.take_along_axis(a, grp, axis=1)  # noqa: E731
        u = pos[..., 0] + np.take_along_axis(nz.pos_jitter[..., 0], grp, axis=1)
        v = pos[..., 1] + np.take_along_axis(nz.pos_jitter[..., 1], grp, axis=1)
        z = pos[..., 2]
        s, c = np.sin(theta)[:, None], np.cos(theta)[:, None]
        col = cx[:, None] + (u * c - v * s) / dx
        row = cy[:, None] + (u * s + v * c - z * tan_psi[:, None]) / dx  # layover toward the radar
        # aspect: angle between each element's normal and the direction to the radar (body frame)
        to_radar = np.arctan2(-c, -s)
        delta = np.angle(np.exp(1j * (to_radar - bank.facing[labels])))  # wrapped to (-pi, pi]
        kind, lobe = bank.kind[labels], bank.lobe[labels]
        cosd = np.cos(delta)
        pattern_pt = np.where(lobe > 0, np.maximum(cosd, 0.0) ** lobe, 1.0)
        d_cyl = np.minimum(np.abs(delta), np.pi - np.abs(delta))
        d_edge = np.where(kind == KIND_CYLINDER, d_cyl, np.abs(delta))
        flash = np.abs(np.sinc(d_edge / np.where(lobe > 0, lobe, 1.0)))
        flash = np.where(d_edge < np.pi / 2, np.maximum(flash, 0.05), 0.0)
        pattern = np.where(kind == KIND_POINT, pattern_pt, flash)
        a = bank.amp[labels] * pattern * take(nz.amp_jitter) * take(nz.keep)
        ph = take(nz.phase)
        hr = self.psf(self.grid[None, None, :] - row[..., None].astype(np.float32))  # (n, K, S)
        hc = self.psf(self.grid[None, None, :] - col[..., None].astype(np.float32))
        hr_t = np.swapaxes(hr, 1, 2)  # (n, S, K)
        re = np.matmul(hr_t * (a * np.cos(ph)).astype(np.float32)[:, None, :], hc)
        im = np.matmul(hr_t * (a * np.sin(ph)).astype(np.float32)[:, None, :], hc)
        img = np.empty(re.shape, dtype=np.complex64)
        img.real, img.imag = re, im
        return img


def _block_rng(seed: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1, int(block))))


def iter_blocks(cfg: SynthConfig, start: int = 0, stop: int | None = None, *, return_masks: bool = False,
                templates: list[TargetTemplate] | None = None) -> Iterator[SynthBatch]:
    """Yield the chips ``start:stop`` (dataset order) as batches of at most :data:`BLOCK` chips."""
    cfg.validate()
    N = cfg.num_chips
    stop = N if stop is None else min(int(stop), N)
    start = max(0, int(start))
    if start >= stop:
        return
    labels, depression, azimuth = _metadata(cfg)
    rend = _Renderer(cfg, templates)
    names = [t.name for t in rend.templates[: cfg.num_classes]]
    for blk in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        b0, b1 = blk * BLOCK, min((blk + 1) * BLOCK, N)
        sl = slice(b0, b1)
        out = rend.render(_block_rng(cfg.seed, blk), labels[sl], depression[sl], azimuth[sl],
                          return_masks=return_masks)
        lo, hi = max(start, b0) - b0, min(stop, b1) - b0
        idx = np.arange(b0, b1, dtype=np.int64)[lo:hi]
        yield SynthBatch(
            chips=out["chips"][lo:hi], labels=labels[idx], azimuth_deg=azimuth[idx],
            depression_deg=depression[idx], class_names=names, gain=out["gain"][lo:hi], index=idx,
            shadow_mask=out["shadow_mask"][lo:hi] if return_masks else None,
            footprint_mask=out["footprint_mask"][lo:hi] if return_masks else None,
        )


def _concat(batches: list[SynthBatch], cfg: SynthConfig) -> SynthBatch:
    if not batches:
        S = cfg.size
        e = np.zeros(0)
        return SynthBatch(np.zeros((0, 1, S, S), np.float32), np.zeros(0, np.int64), e, e,
                          [f"class_{k:02d}" for k in range(cfg.num_classes)], e, np.zeros(0, np.int64))
    cat = lambda name: (None if getattr(batches[0], name) is None  # noqa: E731
                        else np.concatenate([getattr(b, name) for b in batches]))
    return SynthBatch(
        chips=cat("chips"), labels=cat("labels"), azimuth_deg=cat("azimuth_deg"),
        depression_deg=cat("depression_deg"), class_names=batches[0].class_names, gain=cat("gain"),
        index=cat("index"), shadow_mask=cat("shadow_mask"), footprint_mask=cat("footprint_mask"),
    )


def generate(cfg: SynthConfig, *, start: int = 0, stop: int | None = None,
             return_masks: bool = False) -> SynthBatch:
    """Chips ``start:stop`` of the dataset ``cfg`` defines (all of them by default), in memory.

    Same ``cfg`` → same bytes; any ``start``/``stop`` gives the same rows as slicing the full result.
    ``return_masks`` adds the footprint and shadow masks (for tests and figures).
    """
    return _concat(list(iter_blocks(cfg, start, stop, return_masks=return_masks)), cfg)


def render(cfg: SynthConfig, labels: np.ndarray, azimuth_deg: np.ndarray, depression_deg: np.ndarray, *,
           seed: int = 0, return_masks: bool = False,
           templates: list[TargetTemplate] | None = None) -> SynthBatch:
    """Chips of chosen classes at chosen angles (for figures and tests), with ``cfg``'s physics and
    nuisance drawn from ``seed``; independent of the dataset stream (``index`` is 0..n-1)."""
    cfg.validate()
    labels = np.asarray(labels, dtype=np.int64)
    az = np.broadcast_to(np.asarray(azimuth_deg, dtype=np.float64), labels.shape).copy()
    dep = np.broadcast_to(np.asarray(depression_deg, dtype=np.float64), labels.shape).copy()
    if labels.size and (labels.min() < 0 or labels.max() >= cfg.num_classes):
        raise ValueError(f"labels must lie in 0..{cfg.num_classes - 1}")
    rend = _Renderer(cfg, templates)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(3,)))
    out = rend.render(rng, labels, dep, az, return_masks=return_masks)
    return SynthBatch(out["chips"], labels, az, dep, [t.name for t in rend.templates[: cfg.num_classes]],
                      out["gain"], np.arange(len(labels), dtype=np.int64), out.get("shadow_mask"),
                      out.get("footprint_mask"))


def clutter_only(cfg: SynthConfig, n: int | None = None, *, with_gain: bool = False,
                 with_ramp: bool = False) -> np.ndarray:
    """Target-free chips (n, 1, S, S) float32 amplitude: clutter (+ texture per ``cfg.texture``) and
    receiver noise through the same PSF, with ``cfg.looks`` looks; no gain or ramp unless asked.
    Single-look, ``texture="none"``: every pixel is circular complex Gaussian, so intensity is
    exponential (CV 1); L looks give Gamma(L, 1/L) (CV 1/√L). The per-chip clutter level still
    varies by ``clutter_jitter_db`` (set it to 0 for pooled statistics). Deterministic in ``cfg.seed``."""
    cfg.validate()
    n = cfg.num_chips if n is None else int(n)
    rend = _Renderer(cfg)
    out = []
    for blk in range(0, (n + BLOCK - 1) // BLOCK):
        m = min(BLOCK, n - blk * BLOCK)
        rng = np.random.default_rng(np.random.SeedSequence(int(cfg.seed), spawn_key=(2, blk)))
        zeros = np.zeros(m)
        out.append(rend.render(rng, np.zeros(m, dtype=np.int64), zeros + cfg.depressions[0], zeros,
                               with_target=False, with_gain=with_gain, with_ramp=with_ramp)["chips"])
    return np.concatenate(out) if out else np.zeros((0, 1, cfg.size, cfg.size), np.float32)


# --------------------------------------------------------------------------- writing shards


def write_synthetic_dataset(dest: str, cfg: SynthConfig, target_shard_mib: float = 128.0,
                            command: list[str] | None = None) -> Manifest:
    """Generate ``cfg``'s chips block by block and write them as a chip-shard dataset at ``dest``.

    Rows follow dataset order; ``chip_id`` is ``synth-<seed>-<index:07d>``; the manifest's ``source``
    is ``synthetic:<all params as JSON>`` and ``stats`` holds the config and template summaries.
    Returns the :class:`~sarjepa_dist.data.shards.Manifest`.
    """
    cfg.validate()
    templates = make_class_templates(cfg.num_classes, cfg.class_seed, cfg.resolution_m)
    names = [t.name for t in templates]
    with ShardWriter(dest, class_names=names, source=cfg.source_string(),
                     crop_policy={"mode": "none", "size": cfg.size}, target_shard_mib=target_shard_mib,
                     command=command) as writer:
        for batch in iter_blocks(cfg, templates=templates):
            for j in range(len(batch)):
                lab = int(batch.labels[j])
                writer.add(ChipRecord(
                    chip_id=f"synth-{cfg.seed}-{int(batch.index[j]):07d}", chip=batch.chips[j], label=lab,
                    class_name=names[lab], depression_deg=float(batch.depression_deg[j]),
                    azimuth_deg=float(batch.azimuth_deg[j]), sensor=SENSOR, source_path=None,
                ))
        writer.stats = {"synth_config": cfg.to_dict(), "templates": [t.summary() for t in templates]}
        return writer.commit()
