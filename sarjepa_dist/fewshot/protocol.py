"""The few-shot protocol on precomputed features: all-way, K shots per class, S seeds, paired.

For each (K, seed) one support set is drawn from the pool labels (``splits.support_indices``) and
every encoder and method is scored on it against the whole test set, so differences between
encoders are paired by construction. Pure numpy/torch: no Ray, no storage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from sarjepa_dist.fewshot.classifiers import (LinearProbeConfig, confusion_matrix, make_classifier,
                                              per_class_accuracy)
from sarjepa_dist.fewshot.splits import check_shots, support_indices
from sarjepa_dist.fewshot.stats import Interval, mean_interval


@dataclass
class EncoderFeatures:
    """Features of the pool rows and the test rows (row order as in the split)."""

    pool: np.ndarray  # (Np, D)
    test: np.ndarray  # (Nt, D)


@dataclass
class RunResult:
    encoder: str
    method: str
    shots: int
    seed: int
    accuracy: float
    per_class_accuracy: list[float | None]
    confusion: list[list[int]]
    support_size: int
    test_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SummaryRow:
    encoder: str
    method: str
    shots: int
    interval: Interval

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "method": self.method, "shots": self.shots, **self.interval.to_dict()}


def run_protocol(features: Mapping[str, EncoderFeatures], pool_labels: np.ndarray, test_labels: np.ndarray,
                 class_names: Sequence[str], *, shots: Sequence[int], seeds: int,
                 methods: Sequence[str], base_seed: int = 0, knn_k: int = 1, linear_epochs: int = 100,
                 linear_device: str = "cpu") -> list[RunResult]:
    """Score every encoder × method × K × seed; returns one ``RunResult`` each."""
    pool_labels = np.asarray(pool_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_classes = len(class_names)
    check_shots(pool_labels, shots, class_names)
    for name, f in features.items():
        if len(f.pool) != len(pool_labels) or len(f.test) != len(test_labels):
            raise ValueError(f"encoder {name!r}: {len(f.pool)}/{len(f.test)} feature rows for "
                             f"{len(pool_labels)}/{len(test_labels)} pool/test chips")
    results: list[RunResult] = []
    for k in shots:
        for s in range(seeds):
            support = support_indices(pool_labels, int(k), s, base_seed)
            sy = pool_labels[support]
            # the probe's initialisation is seeded by (K, seed) too: the same across encoders
            probe_seed = int(np.random.SeedSequence([int(base_seed), int(k), s, 1]).generate_state(1)[0])
            for name, f in features.items():
                sx = f.pool[support]
                for method in methods:
                    clf = make_classifier(method, knn_k=knn_k,
                                          linear=LinearProbeConfig(epochs=linear_epochs, seed=probe_seed,
                                                                   device=linear_device))
                    pred = clf(sx, sy, f.test, num_classes)
                    cm = confusion_matrix(test_labels, pred, num_classes)
                    results.append(RunResult(
                        encoder=name, method=method, shots=int(k), seed=s,
                        accuracy=float((pred == test_labels).mean()) if len(test_labels) else float("nan"),
                        per_class_accuracy=per_class_accuracy(cm), confusion=cm.tolist(),
                        support_size=int(len(support)), test_size=int(len(test_labels))))
    return results


def summarise(results: Sequence[RunResult], level: float = 0.95) -> list[SummaryRow]:
    """Mean ± t-interval over seeds per (encoder, method, K), in first-seen order."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for r in results:
        groups.setdefault((r.encoder, r.method, r.shots), []).append(r.accuracy)
    return [SummaryRow(e, m, k, mean_interval(accs, level)) for (e, m, k), accs in groups.items()]


def paired_differences(results: Sequence[RunResult], encoder: str, reference: str,
                       level: float = 0.95) -> list[dict[str, Any]]:
    """``encoder − reference`` accuracy per (method, K): mean ± t-interval of the per-seed
    differences. Both were scored on the same support sets, so the pairing removes the
    support-set luck the two share; an interval above zero means ``encoder`` is better."""
    acc = {(r.encoder, r.method, r.shots, r.seed): r.accuracy for r in results}
    cells: dict[tuple[str, int], list[float]] = {}
    for (enc, method, k, seed), a in acc.items():
        if enc != encoder or (reference, method, k, seed) not in acc:
            continue
        cells.setdefault((method, k), []).append(a - acc[(reference, method, k, seed)])
    return [{"encoder": encoder, "reference": reference, "method": m, "shots": k,
             **mean_interval(diffs, level).to_dict()} for (m, k), diffs in cells.items()]
