"""Small labelled shard datasets for the few-shot tests (written with the real ShardWriter)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sarjepa_dist.data.shards import ChipRecord, ShardWriter


def write_labelled(root: str, chips: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                   depression: Sequence[float] | None = None, prefix: str = "chip",
                   target_shard_mib: float = 128.0) -> str:
    """Write ``chips`` (N, C, H, W) with labels (and depression angles) as a shard dataset."""
    with ShardWriter(root, class_names=list(class_names), source="test", command=["test"],
                     target_shard_mib=target_shard_mib) as w:
        for i, (chip, y) in enumerate(zip(chips, labels)):
            w.add(ChipRecord(chip_id=f"{prefix}-{i:05d}", chip=np.asarray(chip), label=int(y),
                             class_name=class_names[int(y)],
                             depression_deg=None if depression is None else float(depression[i]),
                             sensor="test"))
        w.commit()
    return root


def blob_chips(labels: np.ndarray, size: int = 16, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """Amplitude chips whose class sets where a bright square sits: easy for any feature."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    chips = rng.gamma(4.0, 0.25 * noise / 0.05, size=(n, 1, size, size)).astype(np.float32) * 0.2 + 0.05
    q = size // 2
    corners = [(0, 0), (0, q), (q, 0), (q, q)]
    for i, y in enumerate(labels):
        r, c = corners[int(y) % 4]
        chips[i, 0, r:r + q, c:c + q] += 5.0
    return chips


def blob_dataset(root: str, per_class: int = 20, num_classes: int = 3, size: int = 16) -> str:
    """``num_classes`` × ``per_class`` chips of ``size``², depressions alternating 17/15, shuffled."""
    labels = np.repeat(np.arange(num_classes), per_class)
    labels = labels[np.random.default_rng(1).permutation(len(labels))]
    depression = np.where(np.arange(len(labels)) % 2 == 0, 17.0, 15.0)
    return write_labelled(root, blob_chips(labels, size=size), labels, ["A", "B", "C", "D"][:num_classes],
                          depression)
