import json

from sarjepa_dist.train.history import format_curve, plot_curve, read_history

ROWS = [
    {"step": 10, "loss": 0.9, "eff_rank_target": 12.0},
    {"step": 20, "loss": 0.8, "probe_knn": 0.41, "probe_eff_rank": 30.5, "eff_rank_target": 11.0},
    {"step": 30, "loss": 0.7, "probe_knn": 0.55, "probe_eff_rank": 33.0, "eff_rank_target": 10.5},
]


def test_read_history_and_table(tmp_path):
    (tmp_path / "metrics_history.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    rows = read_history(str(tmp_path))
    assert rows == ROWS
    table = format_curve(rows).splitlines()
    assert table[0].split() == ["step", "loss", "probe_knn", "probe_eff_rank", "eff_rank_target"]
    assert table[1].split() == ["10", "0.9", "-", "-", "12"]
    assert table[3].split() == ["30", "0.7", "0.55", "33", "10.5"]
    assert len(format_curve(rows, every=2).splitlines()) == 1 + 2  # rows 0 and 2 (the last)


def test_missing_history_says_so(tmp_path):
    assert read_history(str(tmp_path)) == []
    assert "no metrics history" in format_curve([])


def test_plot_writes_a_png(tmp_path):
    dest = tmp_path / "curve.png"
    plot_curve(ROWS, str(dest), title="run")
    assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
