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
    torch.manual_seed(0)
    z = torch.randn(50_000, 32)
    out = collapse_stats(z, max_tokens=256)
    assert set(out) == {"std", "effective_rank"}
    # exactly the evenly strided rows are used: the same figures as those 256 rows given directly
    rows = torch.linspace(0, z.shape[0] - 1, 256).long()
    assert out == collapse_stats(z[rows], max_tokens=256)
    # strided, not the first rows: a collapsed head of the input does not decide the figure
    z[:10_000] = z[0]
    strided = collapse_stats(z, max_tokens=256)
    assert strided["effective_rank"] > 20 and collapse_stats(z[:256])["effective_rank"] < 1.01
