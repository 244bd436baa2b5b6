"""The sweep's outputs from trial results: ranking, why each trial stopped, tables, plot, best YAML."""

from __future__ import annotations

import csv
import io

from sarjepa_dist.config import config_from_dict, load_config
from sarjepa_dist.tune.results import (best_config_yaml, format_csv, format_markdown, format_text, plot_sweep,
                                       rank_rows, table_cells, trial_row)


def _history(steps, accs):
    return [{"step": s, "loss": 1.0 / s, **({"probe_knn": a} if a is not None else {})} for s, a in zip(steps, accs)]


def _rows():
    return [
        trial_row("t0", "runs/s-t0", {"optim.lr": 1e-3}, _history([2, 4, 6, 8], [None, 0.4, 0.4, 0.5]), None,
                  "probe_knn", 8, "asha"),
        trial_row("t1", "runs/s-t1", {"optim.lr": 3e-3}, _history([2, 4], [None, 0.3]), None, "probe_knn", 8, "asha"),
        trial_row("t2", "runs/s-t2", {"optim.lr": 1e-4}, _history([2], [None]), "RuntimeError: boom", "probe_knn",
                  8, "asha"),
        trial_row("t3", "runs/s-t3", {"optim.lr": 2e-3}, _history([2, 4, 6, 8], [None, 0.5, 0.6, 0.7]), None,
                  "probe_knn", 8, "asha"),
    ]


def test_a_row_says_how_far_the_trial_got_and_why_it_stopped():
    t0, t1, t2, _ = _rows()
    assert (t0["probe_knn"], t0["steps"], t0["stopped"]) == (0.5, 8, "completed")
    assert t0["curve"] == [[4, 0.4], [6, 0.4], [8, 0.5]] and len(t0["loss_curve"]) == 4
    assert (t1["steps"], t1["stopped"]) == (4, "stopped early by ASHA")
    assert (t2["probe_knn"], t2["stopped"], t2["error"]) == (None, "error", "RuntimeError: boom")
    fifo = trial_row("t", "r", {}, _history([2], [0.1]), None, "probe_knn", 8, "none")
    assert fifo["stopped"] == "stopped before train.steps"


def test_trials_rank_by_the_probe_and_errors_come_last_in_every_format():
    ranked = rank_rows(_rows(), "probe_knn", "max")
    assert [r["trial_id"] for r in ranked] == ["t3", "t0", "t1", "t2"]
    assert [r["trial_id"] for r in rank_rows(_rows(), "probe_knn", "min")] == ["t0", "t3", "t1", "t2"]
    early_high = trial_row("t4", "r", {"optim.lr": 1.0}, _history([2, 4], [0.9, 0.95]), None, "probe_knn", 8, "asha")
    assert rank_rows([early_high, *_rows()], "probe_knn", "max")[0]["trial_id"] == "t3", \
        "a figure at an earlier rung does not outrank the trials that ran to the end"
    cells = table_cells(ranked, ["optim.lr"], "probe_knn")
    assert cells[0] == ["rank", "trial", "optim.lr", "probe_knn", "steps", "stopped", "error"]
    assert cells[1][:6] == ["1", "t3", "0.002", "0.7000", "8", "completed"]
    parsed = list(csv.reader(io.StringIO(format_csv(cells))))
    assert parsed == cells
    md = format_markdown(cells).splitlines()
    assert md[1] == "|---|---|---|---|---|---|---|" and md[-1].endswith("| error | RuntimeError: boom |")
    assert format_text(cells).splitlines()[3].split()[-1] == "ASHA"


def test_the_best_config_yaml_loads_into_pretrain_as_it_stands(tmp_path):
    cfg = config_from_dict({"optim": {"lr": 2e-3}, "train": {"name": "s-best"}, "tune": {"search": {"optim.lr": [1]}}})
    path = tmp_path / "best.yaml"
    path.write_text(best_config_yaml(cfg.to_dict(), "best point of sweep s\nsecond line"))
    text = path.read_text()
    assert text.startswith("# best point of sweep s\n# second line\n") and "tune:" not in text
    loaded = load_config(path)
    assert loaded.to_dict() == {**cfg.to_dict(), "tune": loaded.to_dict()["tune"]}
    assert loaded.optim.lr == 2e-3 and loaded.train.name == "s-best"


def test_the_plot_is_a_png(tmp_path):
    rows = _rows()
    rows[0]["params"]["mask.target_scale"] = [0.1, 0.15]
    dest = str(tmp_path / "sweep.png")
    plot_sweep(rows, ["optim.lr", "mask.target_scale"], "probe_knn", dest, "sweep s")
    assert open(dest, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_trial_row_carries_its_wall_time_and_its_start_up():
    # 12 s before the first step, then 0.5 s per step
    history = [{"step": s, "time_total_s": 12.0 + 0.5 * s, **({"probe_knn": 0.3} if s % 20 == 0 else {})}
               for s in (10, 20, 30, 40)]
    row = trial_row("t", "r", {}, history, None, "probe_knn", 40, "asha")
    assert row["wall_s"] == 32.0 and row["startup_s"] == 12.0
    assert trial_row("t", "r", {}, [{"step": 5}], None, "probe_knn", 40, "asha")["startup_s"] is None
