"""Few-shot classifiers on frozen features: linear probe, cosine k-NN, nearest class prototype.

Every classifier takes ``(support_x, support_y, query_x, num_classes)`` and returns the predicted
labels of the query rows as an int64 numpy array; they know nothing of encoders, Ray or storage.

Cosine classifiers (``knn``, ``prototype``) first centre both sets on the *support* mean and then
L2-normalise (SimpleShot's "CL2N"): without centring, features that share a large common
component (mean-pooled ViT tokens, positive log-amplitude pixels) have cosines all near 1 and
the ranking is dominated by that component. Only the labelled support set is used, so nothing
is learned from the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

METHODS = ("linear", "knn", "prototype")


@dataclass(frozen=True)
class LinearProbeConfig:
    """Frozen features → BatchNorm1d(affine=False) → Linear, full-batch AdamW for ``epochs`` steps."""

    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"


def _check(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray, num_classes: int) -> None:
    if support_x.ndim != 2 or query_x.ndim != 2:
        raise ValueError(f"features must be (N, D); got support {support_x.shape}, query {query_x.shape}")
    if support_x.shape[1] != query_x.shape[1]:
        raise ValueError(f"support has {support_x.shape[1]} feature dims, query {query_x.shape[1]}")
    if len(support_y) != len(support_x):
        raise ValueError(f"{len(support_x)} support rows but {len(support_y)} labels")
    if len(support_y) == 0:
        raise ValueError("the support set is empty")
    if support_y.min() < 0 or support_y.max() >= num_classes:
        raise ValueError(f"support labels must lie in 0..{num_classes - 1}")


def cl2n(support_x: np.ndarray, query_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre on the support mean, then L2-normalise rows (float64)."""
    s = np.asarray(support_x, dtype=np.float64)
    q = np.asarray(query_x, dtype=np.float64)
    mu = s.mean(axis=0, keepdims=True)
    s, q = s - mu, q - mu
    s /= np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return s, q


def knn_predict(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray, num_classes: int,
                k: int = 1, chunk: int = 4096) -> np.ndarray:
    """Majority vote of the ``k`` most cosine-similar support rows; ties go to the class with the
    larger summed similarity among the voters. ``k`` is capped at the support size."""
    support_y = np.asarray(support_y, dtype=np.int64)
    _check(support_x, support_y, query_x, num_classes)
    if k < 1:
        raise ValueError(f"k = {k} must be >= 1")
    s, q = cl2n(support_x, query_x)
    k = min(k, len(s))
    out = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):
        sims = q[start:start + chunk] @ s.T  # (n, Ns)
        if k == 1:
            out[start:start + chunk] = support_y[np.argmax(sims, axis=1)]
            continue
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        top_lab = support_y[top]
        votes = np.zeros((len(top), num_classes))
        sim_sum = np.zeros((len(top), num_classes))
        rows = np.arange(len(top))[:, None]
        np.add.at(votes, (rows, top_lab), 1.0)
        np.add.at(sim_sum, (rows, top_lab), top_sims)
        # votes dominate; summed similarity (< k in magnitude) breaks ties
        score = votes * (2.0 * k + 1.0) + sim_sum
        score[votes == 0] = -np.inf
        out[start:start + chunk] = np.argmax(score, axis=1)
    return out


def prototype_predict(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray,
                      num_classes: int) -> np.ndarray:
    """The class whose mean (of the centred, normalised support rows) is most cosine-similar."""
    support_y = np.asarray(support_y, dtype=np.int64)
    _check(support_x, support_y, query_x, num_classes)
    s, q = cl2n(support_x, query_x)
    protos = np.zeros((num_classes, s.shape[1]))
    counts = np.bincount(support_y, minlength=num_classes).astype(np.float64)
    np.add.at(protos, support_y, s)
    present = counts > 0
    protos[present] /= counts[present, None]
    protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    sims = q @ protos.T
    sims[:, ~present] = -np.inf  # a class absent from the support can never be predicted
    return np.argmax(sims, axis=1).astype(np.int64)


def linear_probe_predict(support_x: np.ndarray, support_y: np.ndarray, query_x: np.ndarray,
                         num_classes: int, cfg: LinearProbeConfig = LinearProbeConfig()) -> np.ndarray:
    """Train ``BatchNorm1d(affine=False) → Linear`` on the support set (full batch), predict the query.

    BatchNorm keeps exact support statistics (``momentum=None``: cumulative average over steps of
    the same full batch), so evaluation normalises the query with the support mean/variance.
    """
    support_y = np.asarray(support_y, dtype=np.int64)
    _check(support_x, support_y, query_x, num_classes)
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    dim = support_x.shape[1]
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, momentum=None), nn.Linear(dim, num_classes))
    with torch.no_grad():
        lin = head[1]
        bound = 1.0 / np.sqrt(dim)
        lin.weight.copy_(torch.empty(lin.weight.shape).uniform_(-bound, bound, generator=gen))
        lin.bias.zero_()
    head = head.to(device)
    xs = torch.as_tensor(np.asarray(support_x, dtype=np.float32), device=device)
    ys = torch.as_tensor(support_y, device=device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    if len(xs) == 1:  # BatchNorm cannot take train-mode statistics of one row: use the row itself
        head[0].eval()
        with torch.no_grad():
            head[0].running_mean.copy_(xs[0])
            head[0].running_var.fill_(1.0)
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(head(xs), ys)
        loss.backward()
        opt.step()
    head.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(query_x), 8192):
            xq = torch.as_tensor(np.asarray(query_x[start:start + 8192], dtype=np.float32), device=device)
            preds.append(head(xq).argmax(dim=1).cpu().numpy())
    return np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, dtype=np.int64)


Classifier = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


def make_classifier(method: str, *, knn_k: int = 1, linear: LinearProbeConfig = LinearProbeConfig()) -> Classifier:
    """The predict function for ``method`` (one of ``METHODS``) with its settings bound."""
    if method == "linear":
        return lambda sx, sy, qx, c: linear_probe_predict(sx, sy, qx, c, linear)
    if method == "knn":
        return lambda sx, sy, qx, c: knn_predict(sx, sy, qx, c, k=knn_k)
    if method == "prototype":
        return prototype_predict
    raise ValueError(f"few-shot method {method!r} is unknown; choose one of {list(METHODS)}")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows the true class, columns the predicted one."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """Recall of each class (None for a class absent from the test set)."""
    totals = cm.sum(axis=1)
    return [float(cm[i, i] / totals[i]) if totals[i] else None for i in range(len(cm))]
