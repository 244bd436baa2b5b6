"""A run's learning curves from the metrics history every checkpoint carries (``metrics_history.jsonl``):
the text table and the PNG that ``sarjepa inspect RUN`` shows."""

from __future__ import annotations

import io
import json
import math
from typing import Any, Sequence

from sarjepa_dist import storage

HISTORY_FILE = "metrics_history.jsonl"
# columns of the printed curve, in order, when the history has them
CURVE_COLUMNS = ("step", "loss", "probe_knn", "probe_linear", "probe_eff_rank", "eff_rank_target", "eff_rank_pred")


def read_history(checkpoint_uri: str) -> list[dict[str, Any]]:
    """The report rows saved with a checkpoint (empty when it has none)."""
    uri = storage.join(checkpoint_uri, HISTORY_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_curve(history: Sequence[dict[str, Any]], every: int = 1) -> str:
    """A fixed-width table of the curve columns present, one row per ``every``-th report (the last always)."""
    if not history:
        return "no metrics history in this checkpoint"
    cols = [c for c in CURVE_COLUMNS if any(c in row for row in history)]
    rows = [r for i, r in enumerate(history) if i % every == 0 or i == len(history) - 1]
    table = [cols] + [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table)


def plot_curve(history: Sequence[dict[str, Any]], dest: str, title: str = "") -> None:
    """Probe accuracy, loss and effective ranks against step, in one PNG at ``dest`` (local or s3://)."""
    import matplotlib  # here, not at the top: choosing the Agg backend must not happen on import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[key]) for r in history if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for key in ("probe_knn", "probe_linear"):
        xs, ys = series(key)
        if xs:
            axes[0].plot(xs, ys, marker="o", label=key)
    axes[0].set(title="online few-shot probe", xlabel="step", ylabel="accuracy")
    xs, ys = series("loss")
    axes[1].plot(xs, ys)
    axes[1].set(title="JEPA loss", xlabel="step")
    for key in ("probe_eff_rank", "eff_rank_target", "eff_rank_pred"):
        xs, ys = series(key)
        if xs:
            axes[2].plot(xs, ys, label=key)
    axes[2].set(title="effective rank", xlabel="step")
    for ax in (axes[0], axes[2]):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(dest, buf.getvalue())
