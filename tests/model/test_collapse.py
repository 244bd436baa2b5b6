from __future__ import annotations

import torch

from _model_helpers import one_thread  # noqa: F401  (autouse fixture)

from sarjepa_dist.model.collapse import collapse_stats


def test_random_vs_collapsed():
    torch.manual_seed(0)
    rand = collapse_stats(torch.randn(4, 500, 64))
    const = collapse_stats(torch.randn(64).expand(2000, 64))
    assert rand["std"] > 0.9 and rand["effective_rank"] > 40
    assert const["std"] < 1e-5 and abs(const["effective_rank"] - 1.0) < 1e-3
    low_rank = collapse_stats(torch.randn(1000, 2) @ torch.randn(2, 64))
    assert low_rank["effective_rank"] < 4


def test_subsamples_large_inputs():
    out = collapse_stats(torch.randn(50_000, 32), max_tokens=256)
    assert out["effective_rank"] <= 32 and set(out) == {"std", "effective_rank"}
