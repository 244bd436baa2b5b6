"""What a sweep leaves a person: the trials ranked by the probe (printed, CSV, Markdown), a PNG of
the probe against each swept parameter beside every trial's learning curve, and the best point
as a ready ``pretrain`` YAML."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

import yaml

from sarjepa_dist import storage

COMPLETED = "completed"
STOPPED_EARLY = "stopped early by ASHA"
HALVED = "stopped at a rung by hyperband"
STOPPED = "stopped before train.steps"
ERROR = "error"
# sections a trial's config carries that a pretraining does not need
_SWEEP_ONLY_SECTIONS = ("tune", "pipeline")


def trial_row(trial_id: str, run_uri: str, point: dict[str, Any], history: list[dict[str, Any]],
              error: str | None, metric: str, total_steps: int, scheduler: str) -> dict[str, Any]:
    """One trial: its point, last probe figure, steps run, why it ended and its learning curve."""
    steps = max((int(r["step"]) for r in history if r.get("step") is not None), default=0)
    probed = [r for r in history if _number(r.get(metric)) is not None]
    if error is not None:
        why = ERROR
    elif steps >= total_steps:
        why = COMPLETED
    else:
        why = {"asha": STOPPED_EARLY, "hyperband": HALVED}.get(scheduler, STOPPED)
    return {
        "trial_id": trial_id, "run": run_uri, "params": point,
        metric: _number(probed[-1][metric]) if probed else None,
        "steps": steps, "stopped": why, "error": error,
        "curve": [[int(r["step"]), _number(r[metric])] for r in probed],
        "loss_curve": [[int(r["step"]), _number(r.get("loss"))] for r in history
                       if _number(r.get("loss")) is not None],
        **_timing(history),
    }


def _timing(history: list[dict[str, Any]]) -> dict[str, float | None]:
    """The trial's wall time and its start-up (Ray Train, Ray Data, the probe set), the time of its
    first report less that report's steps at the trial's average time per step since."""
    timed = [(int(r["step"]), t) for r in history
             if r.get("step") is not None and (t := _number(r.get("time_total_s"))) is not None]
    if not timed:
        return {"wall_s": None, "startup_s": None}
    (first_step, first_t), (last_step, last_t) = timed[0], timed[-1]
    startup = None
    if last_step > first_step:
        per_step = (last_t - first_t) / (last_step - first_step)
        startup = round(max(first_t - first_step * per_step, 0.0), 2)
    return {"wall_s": round(last_t, 2), "startup_s": startup}


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def rank_rows(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Best first: trials that ran furthest, then by ``metric``; trials without a probe figure
    (errors) last, never dropped.

    Steps come first because probe figures at different steps are not comparable: ASHA stopped a
    shorter trial for trailing the others at its rung, whatever its figure says there.
    """
    sign = -1.0 if mode == "max" else 1.0
    return sorted(rows, key=lambda r: (r.get(metric) is None, -r["steps"], sign * (r.get(metric) or 0.0)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "" if v is None else str(v)


def table_cells(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> list[list[str]]:
    """Header and one line per ranked row: rank, trial, parameters, probe, steps, why it stopped."""
    head = ["rank", "trial", *keys, metric, "steps", "stopped", "error"]
    body = [[str(i + 1), r["trial_id"], *[_fmt(r["params"].get(k)) for k in keys],
             "" if r.get(metric) is None else f"{r[metric]:.4f}", str(r["steps"]), r["stopped"],
             (r.get("error") or "")[:120]] for i, r in enumerate(rows)]
    return [head, *body]


def format_markdown(cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
    lines.insert(1, "|" + "---|" * len(cells[0]))
    return "\n".join(lines) + "\n"


def format_text(cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells) + "\n"


def format_csv(cells: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(cells)
    return buf.getvalue()


def best_config_yaml(config_tree: dict[str, Any], header: str) -> str:
    """The best trial's config as a ``sarjepa pretrain --config`` file (the sweep's sections left out)."""
    tree = {k: v for k, v in config_tree.items() if k not in _SWEEP_ONLY_SECTIONS}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(tree, sort_keys=False, default_flow_style=None)


def plot_sweep(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str, dest: str, title: str) -> None:
    """Probe figure against each swept parameter, and every trial's probe curve, in one PNG."""
    import matplotlib  # Agg chosen here, not on import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.2 * (len(keys) + 1), 3.8), squeeze=False)
    scored = [r for r in rows if r.get(metric) is not None]
    for ax, key in zip(axes[0], keys):
        values = [r["params"].get(key) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({_fmt(v) for v in values}) if not numeric else []
        xs = values if numeric else [labels.index(_fmt(v)) for v in values]
        colours = ["tab:red" if r["stopped"] != COMPLETED else "tab:blue" for r in scored]
        ax.scatter(xs, [r[metric] for r in scored], c=colours, s=28)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ax.set(xlabel=key, ylabel=metric)
    curves = axes[0][-1]
    for r in rows:
        if r["curve"]:
            steps, acc = zip(*r["curve"])
            curves.plot(steps, acc, marker=".", alpha=0.8, linestyle="--" if r["stopped"] != COMPLETED else "-")
    curves.set(title="learning curves (dashed: stopped early or failed)", xlabel="step", ylabel=metric)
    curves.title.set_fontsize(8)
    fig.suptitle(f"{title} (red: stopped early or failed)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(dest, buf.getvalue())


def write_sweep_outputs(root: str, summary: dict[str, Any], keys: Sequence[str],
                        best_tree: dict[str, Any] | None) -> dict[str, str]:
    """``sweep.json``, ``sweep.md``, ``sweep.csv``, ``sweep.png`` and ``best.yaml`` under ``root``."""
    metric, rows = summary["metric"], summary["trials"]
    cells = table_cells(rows, keys, metric)
    uris = {name: storage.join(root, name) for name in ("sweep.json", "sweep.md", "sweep.csv", "sweep.png")}
    storage.write_text(uris["sweep.json"], json.dumps(summary, indent=2, default=str))
    storage.write_text(uris["sweep.md"], format_markdown(cells))
    storage.write_text(uris["sweep.csv"], format_csv(cells))
    plot_sweep(rows, keys, metric, uris["sweep.png"], title=f"sweep {summary['name']}")
    if best_tree is not None:
        best = summary["best"]
        uris["best.yaml"] = storage.join(root, "best.yaml")
        header = (f"best point of sweep {summary['name']}: trial {best['trial_id']}, {metric} = "
                  f"{best[metric]:.4f} at step {best['steps']}, dataset {summary.get('dataset_id')}\n"
                  f"pretrain with it: sarjepa pretrain --config best.yaml --set train.steps=N")
        storage.write_text(uris["best.yaml"], best_config_yaml(best_tree, header))
    return uris
