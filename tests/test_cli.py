"""The ``sarjepa`` command line: each subcommand parses, calls its runner, and reports errors clearly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sarjepa_dist.cli import main


def test_synth_then_inspect(tmp_path, capsys):
    ds = tmp_path / "synth"
    assert main(["synth", str(ds), "--classes", "3", "--per-class", "4", "--size", "32", "--seed", "1"]) == 0
    assert "12 synthetic chips" in capsys.readouterr().out
    assert main(["inspect", str(ds)]) == 0
    text = capsys.readouterr().out
    # whole lines, so nothing can match inside the (digit-laden) temporary path
    assert re.search(r"^  chips +12 × 1x32x32 float32 ", text, re.M), text
    assert re.search(r"^ +0: class_00 +4 / 4$", text, re.M) and re.search(r"^ +2: class_02 +4 / 4$", text, re.M), text
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
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"checkpoint: {ckpt}"
    assert {"  run_name: cli-test", "  step: 7", "  dataset_id: abc123"} <= set(lines), lines
    assert main(["inspect", str(tmp_path / "enc")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"export: {tmp_path / 'enc'}"
    assert {"  lineage.run_name: cli-test", "  lineage.step: 7", f"  lineage.checkpoint: {ckpt}"} <= set(lines), lines


def _tiny_method():
    from sarjepa_dist.config import config_from_dict
    from sarjepa_dist.engine import build_method

    cfg = config_from_dict({"data": {"img_size": 32}, "model": {"depth": 2, "predictor_dim": 32,
                                                                "predictor_depth": 1, "predictor_heads": 2}})
    model, _ = build_method(cfg)
    return cfg, model


def test_export_of_a_run_folder_takes_its_latest_checkpoint(tmp_path, capsys):
    """By step, not by name: unpadded names sort 'checkpoint_9' after 'checkpoint_10'; Ray's own
    checkpoint_manager_snapshot.json and an incomplete folder with a higher step are not checkpoints."""
    import torch

    from sarjepa_dist.model.io import MODEL_FILE, load_timm_from_export, save_checkpoint_dir

    torch.manual_seed(0)
    cfg, model = _tiny_method()
    run = tmp_path / "run"
    expected = None
    for step in (10, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)  # each checkpoint holds different weights
        save_checkpoint_dir(run / f"checkpoint_{step}_abcdef", model, None, {"step": step}, cfg.to_dict(),
                            {"run_name": "runs-latest", "step": step})
        if step == 10:
            x = torch.rand(2, 1, 32, 32)
            with torch.no_grad():
                expected = model.target_encoder.forward_features_pooled(x)
    incomplete = run / "checkpoint_00000011_0f0f0f"
    incomplete.mkdir()
    (incomplete / MODEL_FILE).write_bytes(b"half an upload")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")

    assert main(["export", str(run), str(tmp_path / "enc")]) == 0
    out = capsys.readouterr().out
    chosen = run / "checkpoint_10_abcdef"
    assert f"exporting its latest checkpoint {chosen} (step 10, the latest of 2 complete checkpoint(s))" in out
    info = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert info["lineage"]["step"] == 10 and info["lineage"]["checkpoint"] == str(chosen)
    with torch.no_grad():
        assert torch.allclose(load_timm_from_export(str(tmp_path / "enc"))(x), expected, atol=1e-6)


def test_export_of_a_run_folder_on_s3(s3_bucket, tmp_path, capsys):
    import torch

    from sarjepa_dist.model.io import save_checkpoint_dir
    from sarjepa_dist.storage import upload_dir

    torch.manual_seed(0)
    cfg, model = _tiny_method()
    run = f"{s3_bucket}/runs/r1"
    for step in (200, 1000):
        local = tmp_path / f"checkpoint_{step:08d}_abcdef"
        save_checkpoint_dir(local, model, None, {"step": step}, cfg.to_dict(), {"run_name": "r1", "step": step})
        upload_dir(local, f"{run}/{local.name}")
    assert main(["export", run, str(tmp_path / "enc")]) == 0
    assert f"{run}/checkpoint_00001000_abcdef (step 1000, the latest of 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "enc" / "encoder.json").read_text())["lineage"]["step"] == 1000


def test_output_to_a_file_gets_no_control_sequences(tmp_path, monkeypatch, capsys):
    """Under capsys stderr is not a terminal: Ray Data's progress bars and Ray's coloured log prefixes
    go off, unless the user chose otherwise."""
    for name in ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX"):
        monkeypatch.setenv(name, "placeholder")  # restored (removed) after the test
        monkeypatch.delenv(name)
    assert main(["synth", str(tmp_path / "ds1"), "--classes", "2", "--per-class", "2", "--size", "16"]) == 0
    assert (os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"], os.environ["RAY_COLOR_PREFIX"]) == ("1", "0")
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    assert main(["synth", str(tmp_path / "ds2"), "--classes", "2", "--per-class", "2", "--size", "16"]) == 0
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


def test_inspect_of_a_run_folder_prints_and_plots_its_learning_curve(tmp_path, capsys):
    from sarjepa_dist.model.io import save_checkpoint_dir

    cfg, model = _tiny_method()
    run = tmp_path / "run"
    history = [{"step": s, "loss": 1.0 / s, "eff_rank_target": 10.0 + s} for s in (10, 20, 30, 40)]
    for row, knn in ((history[1], 0.312), (history[3], 0.4567)):
        row.update(probe_knn=knn, probe_eff_rank=20.0, probe_step=row["step"])
    for step in (20, 40):
        folder = run / f"checkpoint_{step:08d}_abcdef"
        save_checkpoint_dir(folder, model, None, {"step": step}, cfg.to_dict(), {"run_name": "curvy", "step": step})
        (folder / "metrics_history.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in history if r["step"] <= step))
    png = tmp_path / "curve.png"
    assert main(["inspect", str(run), "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"run: {run}"
    assert f"  latest_checkpoint: {run / 'checkpoint_00000040_abcdef'}" in lines
    assert "learning curve (4 reports):" in lines
    header = lines[lines.index("learning curve (4 reports):") + 1].split()
    assert header == ["step", "loss", "probe_knn", "probe_eff_rank", "eff_rank_target"]
    assert lines[-2].split()[:3] == ["40", "0.025", "0.4567"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    # a checkpoint folder shows the curve up to its own step
    assert main(["inspect", str(run / "checkpoint_00000020_abcdef"), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "learning curve (2 reports):" in out and "0.312" in out and "0.4567" not in out


def _pretrain_as_a_process(tmp_path, name: str, *flags: str) -> str:
    """``sarjepa pretrain`` in a child process, stdout and stderr into one pipe (not a terminal), with
    none of the quieting variables the test scripts set: the CLI must make it quiet by itself."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_COLOR_PREFIX", "RAY_ADDRESS", "SARJEPA_VERBOSE")}
    env.update(PYTHONPATH=str(repo), RAY_USAGE_STATS_ENABLED="0")
    sets = {"data.path": str(tmp_path / "ds"), "data.img_size": 32, "data.batch_size": 8, "data.shuffle_buffer": 8,
            "gradient.radii": "[2, 4]", "mask.min_keep": 4, "model.patch_size": 4, "model.depth": 1,
            "model.predictor_dim": 32, "model.predictor_depth": 1, "model.predictor_heads": 2,
            "train.name": name, "train.storage_path": str(tmp_path / "runs"), "train.steps": 4,
            "train.log_every": 2, "train.checkpoint_every": 4, "train.cpus_per_worker": 0.5, "ray.num_cpus": 2}
    argv = ["pretrain", *flags, *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    proc = subprocess.run([sys.executable, "-m", "sarjepa_dist.cli", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


@pytest.mark.ray
def test_pretrain_is_quiet_by_default_and_detailed_with_v(tmp_path):
    """Into a log file: the project's progress lines and result, no Ray Train metrics dict per
    report, no cursor-control or colour sequences; ``-v`` brings Ray's detail (and that dict) back."""
    assert main(["synth", str(tmp_path / "ds"), "--classes", "2", "--per-class", "12", "--size", "32"]) == 0
    quiet = _pretrain_as_a_process(tmp_path, "quiet")
    progress = [line for line in quiet.splitlines() if "[sarjepa] " in line]
    assert len(progress) == 2 and "step 4/4" in progress[-1], quiet
    assert re.search(r"^pretraining quiet: step 4, latest checkpoint ", quiet, re.M), quiet
    assert "\x1b[" not in quiet, repr(quiet)
    assert "Reporting training result" not in quiet and "'loss': " not in quiet, quiet  # the metrics dict

    detailed = _pretrain_as_a_process(tmp_path, "detailed", "-v")  # (Ray colours its dashboard URL then)
    assert "Reporting training result" in detailed and "'loss': " in detailed, detailed
    assert len(detailed.splitlines()) > len(quiet.splitlines())
