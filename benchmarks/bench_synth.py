"""Benchmark the synthetic SAR generator: speed on one thread, and how hard its task is.

(a) time to generate 10,000 chips of 64x64 (10 classes x 1,000) on one thread;
(b) class separability with two hand-made features through two training-free classifiers, MSTAR
    style: train on the 17° half with K shots per class, test on the whole 15° half, several
    episodes (different shots) per K:

    features   raw        per-chip z-scored log-amplitude pixels
               gbr        gradient-by-ratio magnitude (METHOD.md §2: radii 5, 9, 13, 17; mean over
                          scales), per-chip z-scored
               raw-pool4 / gbr-pool4   the same after 4x4 average pooling (16x16 maps), a little
                          translation tolerance
    classifiers  ncm      nearest class mean (Euclidean)
                 1nn      nearest neighbour (Euclidean)

Usage: ``python benchmarks/bench_synth.py [--per-class 1000] [--episodes 5] [--out benchmarks/results/synth.json]``
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS"):
    os.environ[_v] = "1"  # one thread: set before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sarjepa_dist.data.synth import SynthConfig, generate  # noqa: E402

RADII = (5, 9, 13, 17)
SHOTS = (1, 5, 10, 40)


# --------------------------------------------------------------------------- features


def _gbr_numpy(amp: np.ndarray, radii=RADII, eps: float = 1e-2) -> np.ndarray:
    """Gradient by ratio per METHOD.md §2 with integral images; (N, H, W) → (N, H, W), mean over scales."""
    n, h, w = amp.shape
    out = np.zeros((n, h, w))
    for r in radii:
        p = np.pad(amp.astype(np.float64), ((0, 0), (r, r), (r, r)), mode="reflect") + eps
        ii = np.zeros((n, h + 2 * r + 1, w + 2 * r + 1))
        ii[:, 1:, 1:] = p.cumsum(1).cumsum(2)

        def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:  # rows y0..y1-1 of each window
            return (ii[:, y1:y1 + h, x1:x1 + w] - ii[:, y0:y0 + h, x1:x1 + w]
                    - ii[:, y1:y1 + h, x0:x0 + w] + ii[:, y0:y0 + h, x0:x0 + w])

        k = 2 * r + 1
        top, bottom = box(0, r + 1, 0, k), box(r, k, 0, k)
        left, right = box(0, k, 0, r + 1), box(0, k, r, k)
        out += np.sqrt(np.log(left / right) ** 2 + np.log(top / bottom) ** 2)
    return out / len(radii)


def gradient_maps(amp: np.ndarray) -> tuple[np.ndarray, str]:
    """(N, H, W) gradient-by-ratio maps; the project's transform when importable, else the local one."""
    try:
        import torch
        from sarjepa_dist.transforms import gradient_domain  # type: ignore[attr-defined]

        torch.set_num_threads(1)
        with torch.no_grad():
            g = gradient_domain(torch.from_numpy(amp[:, None].astype(np.float32)), domain="gradient-by-ratio",
                                radii=RADII, eps=1e-2, fuse="mean")
        return g[:, 0].numpy().astype(np.float64), "sarjepa_dist.transforms.gradient_domain"
    except Exception as exc:  # not written yet, or a different signature
        return _gbr_numpy(amp), f"local numpy gradient-by-ratio (project transform unavailable: {type(exc).__name__})"


def _zscore(f: np.ndarray) -> np.ndarray:
    f = f.reshape(len(f), -1).astype(np.float64)
    f = f - f.mean(1, keepdims=True)
    return f / (f.std(1, keepdims=True) + 1e-8)


def _pool4(m: np.ndarray) -> np.ndarray:
    n, h, w = m.shape
    return m.reshape(n, h // 4, 4, w // 4, 4).mean((2, 4))


# --------------------------------------------------------------------------- classifiers


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]


def ncm(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, num_classes: int) -> np.ndarray:
    means = np.stack([xtr[ytr == c].mean(0) for c in range(num_classes)])
    return _sqdist(xte, means).argmin(1)


def nn1(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, num_classes: int) -> np.ndarray:
    return ytr[_sqdist(xte, xtr).argmin(1)]


def few_shot(features: dict[str, np.ndarray], labels: np.ndarray, depression: np.ndarray, num_classes: int,
             shots=SHOTS, episodes: int = 5, train_dep: float = 17.0, test_dep: float = 15.0) -> list[dict]:
    tr_pool = np.where(np.isclose(depression, train_dep))[0]
    te = np.where(np.isclose(depression, test_dep))[0]
    rows = []
    for fname, feat in features.items():
        for cname, clf in (("ncm", ncm), ("1nn", nn1)):
            for k in shots:
                accs = []
                for ep in range(episodes):
                    rng = np.random.default_rng([ep, k])
                    idx = np.concatenate([rng.choice(tr_pool[labels[tr_pool] == c], k, replace=False)
                                          for c in range(num_classes)])
                    pred = clf(feat[idx], labels[idx], feat[te], num_classes)
                    accs.append(float((pred == labels[te]).mean()))
                a = np.asarray(accs)
                half = 1.96 * a.std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else 0.0
                rows.append({"feature": fname, "classifier": cname, "shots": k, "mean": float(a.mean()),
                             "ci95": float(half), "episodes": accs})
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--episodes", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "synth.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="SynthConfig overrides, e.g. clutter_to_target_db=-8 looks=2")
    args = ap.parse_args(argv)
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = json.loads(v) if v[:1] in "[{" else type(getattr(SynthConfig, k))(v)
    cfg = SynthConfig(per_class=args.per_class, **overrides)

    generate(SynthConfig(per_class=2, num_classes=cfg.num_classes))  # warm-up (imports, tables)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t0, c0 = time.perf_counter(), time.process_time()
    batch = generate(cfg)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(batch)
    print(f"(a) generated {n} chips of {cfg.size}x{cfg.size} on one thread in {secs:.2f} s wall "
          f"({n / secs:,.0f} chips/s), {cpu:.2f} s CPU ({n / cpu:,.0f} chips/s); "
          f"1-min load average {load:.1f} on {os.cpu_count()} cores")

    amp = batch.chips[:, 0].astype(np.float64)
    t1 = time.perf_counter()
    gmaps, gsource = gradient_maps(amp)
    gsecs = time.perf_counter() - t1
    logamp = np.log(amp + 1e-6)
    features = {
        "raw": _zscore(logamp), "gbr": _zscore(gmaps),
        "raw-pool4": _zscore(_pool4(logamp)), "gbr-pool4": _zscore(_pool4(gmaps)),
    }
    rows = few_shot(features, batch.labels, batch.depression_deg, cfg.num_classes, episodes=args.episodes)

    print(f"(b) few-shot accuracy, train 17° / test 15° ({(np.isclose(batch.depression_deg, 15)).sum()} test "
          f"chips), {args.episodes} episodes, mean ± 95% CI; chance {1 / cfg.num_classes:.2f}")
    print(f"    gradient maps: {gsource}")
    print(f"    {'feature':<10} {'clf':<4} " + " ".join(f"{'K=' + str(k):>13}" for k in SHOTS))
    for fname in features:
        for cname in ("ncm", "1nn"):
            cells = [r for r in rows if r["feature"] == fname and r["classifier"] == cname]
            print(f"    {fname:<10} {cname:<4} " + " ".join(f"{r['mean']:>7.3f}±{r['ci95']:.3f}" for r in cells))

    result = {
        "benchmark": "bench_synth",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__, "threads": 1},
        "config": cfg.to_dict(),
        "speed": {"chips": n, "seconds": round(secs, 3), "chips_per_s": round(n / secs, 1),
                  "cpu_seconds": round(cpu, 3), "chips_per_cpu_s": round(n / cpu, 1),
                  "loadavg_1min_at_start": round(load, 2), "cpu_count": os.cpu_count(),
                  "note": "wall time is inflated when the machine is shared; CPU time is the process's "
                          "own (one BLAS/OpenMP thread)"},
        "gradient_source": gsource,
        "gradient_seconds": round(gsecs, 3),
        "fewshot": {"train_depression": 17.0, "test_depression": 15.0, "shots": list(SHOTS),
                    "episodes": args.episodes, "chance": 1 / cfg.num_classes,
                    "features": {"raw": "per-chip z-scored log-amplitude pixels",
                                 "gbr": "gradient-by-ratio magnitude, radii 5/9/13/17, mean over scales, "
                                        "per-chip z-scored",
                                 "raw-pool4": "raw after 4x4 average pooling",
                                 "gbr-pool4": "gbr after 4x4 average pooling"},
                    "results": rows},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
