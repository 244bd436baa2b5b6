"""What a few-shot report costs once features exist: classifier time per (K, seed) cell.

    python benchmarks/bench_fewshot_classifiers.py [--classes 10] [--test 825] [--dims 192 768 4096] [--shots 1 10 40]

The protocol runs encoders × methods × K × seeds cells on cached features, so this is the
price of re-running a protocol (feature extraction is measured by the Ray Data pipeline
benchmark). Features are Gaussian class clusters; each timing is the best of ``--repeats``
(on a shared machine the minimum is the least disturbed estimate). Prints JSON; ``--out FILE``
also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sarjepa_dist.fewshot.classifiers import LinearProbeConfig, make_classifier  # noqa: E402


def cell_seconds(method: str, sx: np.ndarray, sy: np.ndarray, qx: np.ndarray, classes: int, epochs: int,
                 repeats: int) -> float:
    clf = make_classifier(method, knn_k=1, linear=LinearProbeConfig(epochs=epochs))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf(sx, sy, qx, classes)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--test", type=int, default=825, help="test chips (MSTAR 17° with a 0.3 split: 825)")
    ap.add_argument("--dims", type=int, nargs="+", default=[192, 768, 4096])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 10, 40])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for dim in args.dims:
        centres = rng.normal(size=(args.classes, dim)).astype(np.float32)
        qy = rng.integers(0, args.classes, size=args.test)
        qx = centres[qy] + rng.normal(size=(args.test, dim)).astype(np.float32)
        for k in args.shots:
            sy = np.repeat(np.arange(args.classes), k)
            sx = centres[sy] + rng.normal(size=(len(sy), dim)).astype(np.float32)
            for method in ("linear", "knn", "prototype"):
                s = cell_seconds(method, sx, sy, qx, args.classes, args.epochs, args.repeats)
                rows.append({"dim": dim, "shots": k, "method": method, "seconds": round(s, 5)})
                print(f"dim {dim:5d}  K={k:3d}  {method:9s}  {1000 * s:8.2f} ms", file=sys.stderr)
    result = {"benchmark": "fewshot-classifiers", "classes": args.classes, "test": args.test,
              "epochs": args.epochs, "threads": args.threads, "repeats": args.repeats,
              "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
              "load_average": os.getloadavg(), "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
