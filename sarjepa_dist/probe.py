"""Online few-shot probe: how well an encoder's frozen features separate labelled chips, right now.

Pure torch/numpy (no Ray, no storage): the train loop calls it every ``probe.every`` steps on rank
0, the sweep's early stopping reads the figures it reports, and ``benchmarks/learning_curves.py``
draws curves from it. The chips' model inputs are computed once (``build_probe_set``: they are
deterministic), so a probe costs one encoder forward over the probe chips plus a few numpy
classifiers.

Reported (prefix ``probe_``): ``knn`` (cosine 1-NN) and/or ``linear`` accuracy at K shots, each
the mean over ``episodes`` support draws on one fixed pool/test split; ``feat_std`` and
``eff_rank`` of the mean-pooled embedding (collapse shows there as both falling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sarjepa_dist.config import DataConfig, GradientConfig, ProbeConfig
from sarjepa_dist.fewshot.classifiers import LinearProbeConfig, knn_predict, linear_probe_predict
from sarjepa_dist.model.collapse import collapse_stats
from sarjepa_dist.model.encoder import MaskedViT
from sarjepa_dist.model.pooling import encode_tokens, pool_tokens
from sarjepa_dist.transforms import center_resize, prepare_inputs


@dataclass
class ProbeSet:
    """Precomputed model inputs of the probe chips, their labels and a fixed pool/test split."""

    inputs: dict[str, torch.Tensor]  # key (x | gx) -> (N, C, S, S) float32
    labels: np.ndarray  # (N,) int64
    pool: np.ndarray  # row indices the K-shot support sets are drawn from
    test: np.ndarray  # row indices scored
    num_classes: int


def stratified_rows(labels: np.ndarray, per_class: int | None, test_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test) row indices: per class, a seeded shuffle, at most ``per_class`` rows, the first
    ``test_fraction`` of them (at least one, and one left for the pool) to test."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9B0BE]))
    pool, test = [], []
    for c in np.unique(labels[labels >= 0]):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if per_class is not None:
            rows = rows[:per_class]
        n_test = int(np.clip(round(len(rows) * test_fraction), 1, max(len(rows) - 1, 1)))
        test.append(rows[:n_test])
        pool.append(rows[n_test:])
    return np.concatenate(pool), np.concatenate(test)


def build_probe_set(amplitude: np.ndarray | torch.Tensor, labels: np.ndarray, cfg: ProbeConfig,
                    data_cfg: DataConfig, gradient_cfg: GradientConfig, keys: Sequence[str]) -> ProbeSet:
    """Subsample ``cfg.max_per_class`` chips per class, split pool/test (``cfg.test_fraction``,
    seeded), and compute the evaluation view's inputs ``keys`` once."""
    labels = np.asarray(labels, dtype=np.int64)
    pool, test = stratified_rows(labels, cfg.max_per_class, cfg.test_fraction, cfg.seed)
    short = [int(c) for c in np.unique(labels[pool]) if (labels[pool] == c).sum() < cfg.shots]
    if short:
        raise ValueError(f"probe.shots = {cfg.shots} but classes {short} have fewer probe pool chips; "
                         f"raise probe.max_per_class or lower probe.shots")
    rows = np.concatenate([pool, test])
    amp = torch.as_tensor(np.asarray(amplitude)[rows], dtype=torch.float32)
    amp = center_resize(amp, data_cfg.img_size)
    inputs = prepare_inputs(amp, data_cfg, gradient_cfg, need=tuple(sorted(set(keys))))
    n_pool = len(pool)
    return ProbeSet(inputs=inputs, labels=labels[rows], pool=np.arange(n_pool),
                    test=np.arange(n_pool, len(rows)), num_classes=int(labels[rows].max()) + 1)


@torch.no_grad()
def embed(encoder: MaskedViT, x: torch.Tensor, poolings: Sequence[str],
          batch_size: int = 256, tta: str = "none") -> dict[str, torch.Tensor]:
    """Features of ``x`` under each pooling (plus the mean, for the collapse figures), eval mode,
    tokens averaged over the test-time views ``tta``."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out: dict[str, list[torch.Tensor]] = {p: [] for p in {*poolings, "mean"}}
    try:
        for start in range(0, len(x), batch_size):
            tokens = encode_tokens(encoder, x[start:start + batch_size].to(device), encoder.grid_size, tta).float()
            for p in out:
                out[p].append(pool_tokens(tokens, encoder.grid_size, p).cpu())
    finally:
        encoder.train(was_training)
    return {p: torch.cat(v) for p, v in out.items()}


def score_features(feats: np.ndarray, probe: ProbeSet, cfg: ProbeConfig) -> dict[str, float]:
    """Mean K-shot accuracy per method over ``cfg.episodes`` support draws (same draws for every encoder)."""
    pool_y, test_y = probe.labels[probe.pool], probe.labels[probe.test]
    test_x = feats[probe.test]
    scores: dict[str, list[float]] = {m: [] for m in cfg.methods}
    for episode in range(cfg.episodes):
        rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(cfg.shots), episode]))
        support = np.concatenate([rng.choice(np.flatnonzero(pool_y == c), cfg.shots, replace=False)
                                  for c in np.unique(pool_y)])
        sx, sy = feats[probe.pool][support], pool_y[support]
        for method in cfg.methods:
            if method == "knn":
                pred = knn_predict(sx, sy, test_x, probe.num_classes, k=1)
            else:
                pred = linear_probe_predict(sx, sy, test_x, probe.num_classes,
                                            LinearProbeConfig(epochs=50, seed=episode))
            scores[method].append(float((pred == test_y).mean()))
    return {m: float(np.mean(v)) for m, v in scores.items()}


def run_probe(encoder: MaskedViT, probe: ProbeSet, input_key: str, cfg: ProbeConfig,
              extra_poolings: Sequence[str] = ()) -> dict[str, float]:
    """``probe_<method>`` accuracies under ``cfg.pooling`` (and ``probe_<method>/<pooling>`` for
    ``extra_poolings``), ``probe_feat_std`` and ``probe_eff_rank`` of the mean-pooled features."""
    poolings = [cfg.pooling, *[p for p in extra_poolings if p != cfg.pooling]]
    feats = embed(encoder, probe.inputs[input_key], poolings, tta=cfg.tta)
    out: dict[str, float] = {}
    for p in poolings:
        suffix = "" if p == cfg.pooling else f"/{p}"
        for method, acc in score_features(feats[p].numpy(), probe, cfg).items():
            out[f"probe_{method}{suffix}"] = acc
    stats = collapse_stats(feats["mean"])
    out["probe_feat_std"] = stats["std"]
    out["probe_eff_rank"] = stats["effective_rank"]
    return out
