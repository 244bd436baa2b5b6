"""The ``sarjepa`` command line: each subcommand parses, calls its runner, and reports errors clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sarjepa_dist.cli import main


def test_synth_then_inspect(tmp_path, capsys):
    ds = tmp_path / "synth"
    assert main(["synth", str(ds), "--classes", "3", "--per-class", "4", "--size", "32", "--seed", "1"]) == 0
    assert "12 synthetic chips" in capsys.readouterr().out
    assert main(["inspect", str(ds)]) == 0
    text = capsys.readouterr().out
    assert "class_00" in text and "12" in text
    assert main(["inspect", str(ds), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "dataset" and info["counts"]["total"] == 12
    assert info["counts"]["per_class"] == {"class_00": 4, "class_01": 4, "class_02": 4}
    assert info["problems"] == []


def test_ingest_arrays_reports_quarantine(tmp_path, capsys):
    chips = np.random.default_rng(0).rayleigh(size=(6, 16, 16)).astype(np.float32)
    chips[2] = np.nan
    np.savez(tmp_path / "stack.npz", chips=chips, labels=np.array([0, 1, 0, 1, 0, 1]))
    rc = main(["ingest", "arrays", str(tmp_path / "stack.npz"), str(tmp_path / "ds"), "--max-bad-fraction", "0.5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 5 chips" in out and "nan_or_inf" in out


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=-1", "optim.lr = -1.0 is out of range"),
    ("model.bogus=1", "unknown config key 'model.bogus'"),
    ("data.conditioning=linear", "choose one of"),
])
def test_config_errors_exit_2_and_name_the_key(override, needle, capsys):
    assert main(["pretrain", "--set", override]) == 2
    assert needle in capsys.readouterr().err


def test_export_and_inspect_lineage(tmp_path, capsys):
    import torch

    from sarjepa_dist.config import config_from_dict
    from sarjepa_dist.engine import build_method
    from sarjepa_dist.model.io import load_timm_from_export, save_checkpoint_dir

    cfg = config_from_dict({"data": {"img_size": 32}, "model": {"depth": 2, "predictor_dim": 32,
                                                                "predictor_depth": 1, "predictor_heads": 2}})
    torch.manual_seed(0)
    model, _ = build_method(cfg)
    ckpt = tmp_path / "checkpoint_00000007"
    save_checkpoint_dir(ckpt, model, None, {"step": 7}, cfg.to_dict(),
                        {"run_name": "cli-test", "step": 7, "dataset_id": "abc123"})
    assert main(["export", str(ckpt), str(tmp_path / "enc")]) == 0
    capsys.readouterr()
    vit = load_timm_from_export(str(tmp_path / "enc"))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(x), model.target_encoder.forward_features_pooled(x), atol=1e-6)
    assert main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "checkpoint" in text and "abc123" in text and "cli-test" in text
    assert main(["inspect", str(tmp_path / "enc")]) == 0
    assert "export" in capsys.readouterr().out
