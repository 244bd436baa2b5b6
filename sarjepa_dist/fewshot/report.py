"""The few-shot report: ``results.json`` (everything), ``report.md`` (tables), ``fewshot.png`` (curves).

All three are rendered from one plain ``results`` dict, so the JSON alone can regenerate the rest
(``render_markdown(json.load(...))``). Written through the storage layer (local or ``s3://``).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Mapping, Sequence

from sarjepa_dist import storage

METHOD_TITLES = {
    "linear": "linear probe",
    "knn": "k-nearest neighbours (cosine)",
    "prototype": "nearest class prototype (cosine)",
}
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
FIGURE_FILE = "fewshot.png"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_STYLES = ("-", "--", "-.", ":")


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def format_cell(row: Mapping[str, Any]) -> str:
    """``mean ± half`` in percent, or ``mean (n=1, no interval)``."""
    if row.get("half_width") is None:
        return f"{_pct(row['mean'])} (no CI)"
    return f"{_pct(row['mean'])} ± {_pct(row['half_width'])}"


def _summary_index(summary: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, int], Mapping[str, Any]]:
    return {(r["encoder"], r["method"], int(r["shots"])): r for r in summary}


def accuracy_table(results: Mapping[str, Any], method: str) -> list[str]:
    """Markdown rows: one per encoder, one column per K; the best mean per K in bold."""
    shots = results["protocol"]["shots"]
    encoders = [e["name"] for e in results["encoders"]]
    idx = _summary_index(results["summary"])
    best = {}
    for k in shots:
        means = [idx[(e, method, k)]["mean"] for e in encoders if (e, method, k) in idx]
        best[k] = max(means) if means else None
    lines = ["| encoder | " + " | ".join(f"K={k}" for k in shots) + " |",
             "|---|" + "---:|" * len(shots)]
    for e in encoders:
        cells = []
        for k in shots:
            row = idx.get((e, method, k))
            if row is None:
                cells.append("–")
                continue
            cell = format_cell(row)
            if best[k] is not None and row["mean"] == best[k] and len(encoders) > 1:
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines


def _short(v: Any, n: int = 12) -> str:
    return "–" if v in (None, "") else str(v)[:n]


def render_markdown(results: Mapping[str, Any]) -> str:
    out: list[str] = ["# Few-shot evaluation", ""]
    out.append(f"Created {results.get('created_at', '')}. Feature domain requested: "
               f"**{results['feature_domain']}** (per encoder below).")
    out.append("")
    out.extend(_data_section(results))
    out.extend(_protocol_section(results))
    out.extend(_encoders_section(results))
    for m in results["protocol"]["methods"]:
        out.append(f"## Accuracy (%): {METHOD_TITLES.get(m, m)}")
        out.append("")
        out.extend(accuracy_table(results, m))
        out.append("")
    for table in (paired_table(results), per_class_table(results)):
        if table:
            out.extend(table)
            out.append("")
    out.append(f"Figure: `{FIGURE_FILE}`; every seed's accuracy, per-class accuracy and confusion matrix: "
               f"`{RESULTS_FILE}`.")
    return "\n".join(out) + "\n"


def _data_section(results: Mapping[str, Any]) -> list[str]:
    split = results["split"]
    out = ["## Data and split", ""]
    out.append(f"- split: {split['kind']} — {split['description']}")
    out.append(f"- pool: {split['pool_size']} chips from `{split['pool_dataset']}` "
               f"(dataset {_short(split['pool_dataset_id'])}); test: {split['test_size']} chips from "
               f"`{split['test_dataset']}` (dataset {_short(split['test_dataset_id'])})")
    if split.get("dropped_bad_chips"):
        out.append(f"- dropped {split['dropped_bad_chips']} undecodable chip(s) from pool/test")
    out.append("")
    out.append("| class | pool | test |")
    out.append("|---|---:|---:|")
    for c in results["class_names"]:
        out.append(f"| {c} | {split['pool_per_class'].get(c, 0)} | {split['test_per_class'].get(c, 0)} |")
    out.append("")
    return out


def _protocol_section(results: Mapping[str, Any]) -> list[str]:
    proto = results["protocol"]
    seeds = int(proto["seeds"])
    out = ["## Protocol", ""]
    out.append(f"- all-way ({len(results['class_names'])} classes), K ∈ {proto['shots']} shots per class, "
               f"{seeds} seed(s) each; the support set of each (K, seed) is shared by every encoder "
               f"(paired comparisons); the whole test set is scored every time")
    for m in proto["methods"]:
        out.append(f"- {m}: {proto['method_details'][m]}")
    if seeds >= 2:
        out.append(f"- cells: mean ± 95% interval over seeds, mean ± t(0.975, {seeds - 1}) · sd/√{seeds} "
                   f"(t = {proto['t_quantile']:.3f}), accuracy in %; best mean per K in bold")
    else:
        out.append("- cells: accuracy in % of the single seed; with one seed the 95% interval is undefined "
                   "(no spread to estimate): run more seeds (fewshot.seeds) for intervals")
    out.append("")
    return out


def _encoders_section(results: Mapping[str, Any]) -> list[str]:
    out = ["## Encoders", ""]
    out.append("| encoder | source | features fed | dim | checkpoint_id | trained on dataset | run@step |")
    out.append("|---|---|---|---:|---|---|---|")
    for e in results["encoders"]:
        lin = e.get("lineage") or {}
        run = lin.get("run_name")
        runstep = f"{run}@{lin.get('step')}" if run else "–"
        out.append(f"| {e['name']} | {e['source']} | {e['domain_description']} | {e['feature_dim']} | "
                   f"{_short(lin.get('checkpoint_id'))} | {_short(lin.get('dataset_id'))} | {runstep} |")
    notes = [(e["name"], n) for e in results["encoders"] for n in e.get("notes", [])]
    if notes:
        out.append("")
        for name, n in notes:
            out.append(f"- {name}: {n}")
    out.append("")
    return out


def _signed_pp(v: float) -> str:
    return f"{100 * v:+.1f}"


def paired_table(results: Mapping[str, Any]) -> list[str]:
    """Encoder − reference, paired by (K, seed), in percentage points. References are the hand-made
    baselines (METHOD.md §5: beating these is the real test of pretraining) and random init (a
    pretrained encoder that cannot beat its untrained architecture has learned nothing usable)."""
    rows = results.get("paired") or []
    if not rows:
        return []
    proto = results["protocol"]
    shots = proto["shots"]
    idx = {(r["encoder"], r["reference"], r["method"], int(r["shots"])): r for r in rows}
    pairs = list(dict.fromkeys((r["encoder"], r["reference"]) for r in rows))
    lines = ["## Paired differences vs the references: hand-made baselines and random init (percentage points)",
             "", "Encoder minus reference on the same support sets, mean ± 95% t-interval over seeds; an interval "
             "entirely above 0 means the encoder beats the reference.", ""]
    lines.append("| method | encoder − reference | " + " | ".join(f"K={k}" for k in shots) + " |")
    lines.append("|---|---|" + "---:|" * len(shots))
    for m in proto["methods"]:
        for enc, ref in pairs:
            cells = []
            for k in shots:
                r = idx.get((enc, ref, m, int(k)))
                if r is None:
                    cells.append("–")
                elif r["half_width"] is None:
                    cells.append(f"{_signed_pp(r['mean'])} (no CI)")
                else:
                    cell = f"{_signed_pp(r['mean'])} ± {100 * r['half_width']:.1f}"
                    if r["low"] > 0 or r["high"] < 0:
                        cell = f"**{cell}**"
                    cells.append(cell)
            lines.append(f"| {m} | {enc} − {ref} | " + " | ".join(cells) + " |")
    return lines


def per_class_table(results: Mapping[str, Any]) -> list[str]:
    """Per-class accuracy (mean over seeds) at the largest K for the first method."""
    proto = results["protocol"]
    if not proto["methods"] or not results.get("runs"):
        return []
    method, k = proto["methods"][0], max(proto["shots"])
    names = results["class_names"]
    encoders = [e["name"] for e in results["encoders"]]
    lines = [f"## Per-class accuracy (%), {METHOD_TITLES.get(method, method)}, K={k}, mean over seeds", "",
             "| encoder | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for e in encoders:
        runs = [r for r in results["runs"] if r["encoder"] == e and r["method"] == method and r["shots"] == k]
        if not runs:
            continue
        cells = []
        for c in range(len(names)):
            vals = [r["per_class_accuracy"][c] for r in runs if r["per_class_accuracy"][c] is not None]
            cells.append(_pct(sum(vals) / len(vals)) if vals else "–")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines


def render_figure(results: Mapping[str, Any]) -> bytes:
    """PNG bytes: accuracy vs K, one panel per method, one line per encoder, interval bands."""
    # here, not at import: choosing the Agg backend must not happen to every process that imports the report
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    proto = results["protocol"]
    methods = proto["methods"]
    shots = sorted(proto["shots"])
    idx = _summary_index(results["summary"])
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.8), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], methods):
        for i, e in enumerate(results["encoders"]):
            rows = [idx.get((e["name"], m, k)) for k in shots]
            ks = [k for k, r in zip(shots, rows) if r is not None]
            rows = [r for r in rows if r is not None]
            if not rows:
                continue
            means = [100 * r["mean"] for r in rows]
            (line,) = ax.plot(ks, means, marker=_MARKERS[i % len(_MARKERS)], linestyle=_STYLES[i % len(_STYLES)],
                              label=e["name"])
            if all(r.get("half_width") is not None for r in rows):
                ax.fill_between(ks, [100 * r["low"] for r in rows], [100 * r["high"] for r in rows],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots)
        ax.set_xticklabels([str(k) for k in shots])
        ax.set_title(METHOD_TITLES.get(m, m))
        ax.set_xlabel("shots per class (K)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    seeds = int(proto["seeds"])
    band = f"bands: 95% t-interval over {seeds} seeds" if seeds > 1 else "one seed: no interval"
    fig.suptitle(f"few-shot accuracy ({results['feature_domain']} features; {band})", fontsize=10)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(out: str, results: Mapping[str, Any]) -> dict[str, str]:
    """Write the three files under ``out``; returns their URIs."""
    storage.makedirs(out)
    uris = {"results": storage.join(out, RESULTS_FILE), "report": storage.join(out, REPORT_FILE),
            "figure": storage.join(out, FIGURE_FILE)}
    storage.write_text(uris["results"], json.dumps(results, indent=1, default=str, allow_nan=True) + "\n")
    storage.write_text(uris["report"], render_markdown(results))
    storage.write_bytes(uris["figure"], render_figure(results))
    return uris
