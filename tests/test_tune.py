"""Sweeps: grid expansion and validation, trial naming, the table; a real two-trial Ray Tune sweep."""

from __future__ import annotations

import json

import pytest

from sarjepa_dist.config import ConfigError, config_from_dict
from sarjepa_dist.tune import format_table, grid_points, trial_config, _trial_name


def test_grid_points_are_the_product_of_the_axes():
    base = config_from_dict({})
    pts = grid_points({"mask.target_scale": [[0.1, 0.15], [0.15, 0.2]], "optim.ema": [[0.99, 1.0]]}, base)
    assert len(pts) == 2
    assert {tuple(p["mask.target_scale"]) for p in pts} == {(0.1, 0.15), (0.15, 0.2)}


def test_an_invalid_grid_point_is_named_before_anything_runs():
    base = config_from_dict({})
    with pytest.raises(ConfigError, match=r"tune.grid point .*mask.target_scale"):
        grid_points({"mask.target_scale": [[0.1, 0.15], [0.3, 0.2]]}, base)
    with pytest.raises(ConfigError, match="unknown config key 'mask.bogus'"):
        grid_points({"mask.bogus": [1]}, base)


def test_trial_config_applies_the_point_and_names_the_run():
    base = config_from_dict({}).to_dict()
    cfg = trial_config(base, {"optim.ema": [0.99, 1.0]}, "sweep--ema=0.99-1.0")
    assert cfg.optim.ema == (0.99, 1.0) and cfg.train.name == "sweep--ema=0.99-1.0"
    assert "/" not in _trial_name("s", {"mask.target_scale": [0.1, 0.15]})


def test_table_ranks_by_accuracy_and_marks_errors():
    rows = [{"optim.ema": [0.99, 1.0], "fewshot_acc": 0.4, "final_loss": 0.2, "final_step": 5, "checkpoint_uri": "a"},
            {"optim.ema": [0.996, 1.0], "fewshot_acc": 0.6, "final_loss": 0.3, "final_step": 5, "checkpoint_uri": "b"},
            {"optim.ema": [0.9, 1.0], "fewshot_acc": None, "final_loss": None, "final_step": None,
             "checkpoint_uri": None}]
    lines = format_table(rows, {"optim.ema": []}).splitlines()
    assert "60.0%" in lines[2] and "40.0%" in lines[3] and "error" in lines[4]


@pytest.mark.slow
@pytest.mark.ray
def test_two_trial_sweep_ranks_by_fewshot_accuracy(ray_local, tmp_path):
    from sarjepa_dist import storage
    from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset
    from sarjepa_dist.tune import run_sweep

    data = str(tmp_path / "synth")
    write_synthetic_dataset(data, SynthConfig(num_classes=3, per_class=24, size=32, seed=0))
    cfg = config_from_dict({
        "data": {"path": data, "img_size": 32, "batch_size": 8},
        "gradient": {"radii": [2, 4]},
        "mask": {"min_keep": 4},
        "model": {"patch_size": 8, "depth": 2, "predictor_dim": 32, "predictor_depth": 1, "predictor_heads": 2},
        "train": {"steps": 4, "checkpoint_every": 4, "log_every": 2, "cpus_per_worker": 1,
                  "storage_path": str(tmp_path / "runs")},
        "tune": {"name": "t-sweep", "storage_path": str(tmp_path / "runs"),
                 "grid": {"mask.target_scale": [[0.1, 0.15], [0.15, 0.25]]}},
        "fewshot": {"data": data, "split_column": "depression_deg", "train_values": [17.0],
                    "test_values": [15.0], "shots": [2], "seeds": 2, "methods": ["prototype"]},
    })
    result = run_sweep(cfg)
    assert len(result.rows) == 2 and all(r["error"] is None for r in result.rows)
    assert all(0.0 <= r["fewshot_acc"] <= 1.0 and r["final_step"] == 4 for r in result.rows)
    assert result.best["fewshot_acc"] == max(r["fewshot_acc"] for r in result.rows)
    table = json.loads(storage.read_text(result.table_uri))
    assert table["best"]["checkpoint_uri"].endswith(result.best["checkpoint_uri"].split("/")[-1])
    assert {tuple(r["mask.target_scale"]) for r in table["trials"]} == {(0.1, 0.15), (0.15, 0.25)}
    for r in result.rows:  # each trial's checkpoint carries the dataset's lineage
        assert r["dataset_id"] and storage.exists(storage.join(r["checkpoint_uri"], "meta.json"))
