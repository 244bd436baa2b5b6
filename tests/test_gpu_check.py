"""``benchmarks/gpu_check.sh``: without a GPU it stops with one clear error; ``--dry-run`` runs its four
parts (CUDA tests, ∇x device vs CPU, gpu_bench, a Ray Train pretrain) tiny on the CPU, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_script(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "SARJEPA_PYTHON": python, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=500)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_clearly_without_a_gpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_script("--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("sarjepa: error: benchmarks/gpu_check.sh needs a CUDA GPU")
    assert "--dry-run" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_environment_says_to_bootstrap(tmp_path):
    proc = run_script(python=str(tmp_path / "no-venv" / "python"))
    assert proc.returncode == 2
    assert "sarjepa: error:" in proc.stderr and "infra/dev/bootstrap.sh" in proc.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_dry_run_runs_every_part_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_script("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True
    parts = report["parts"]
    assert list(parts) == ["cuda_tests", "gradient", "gpu_bench", "pretrain"]
    assert all(p["ok"] for p in parts.values()), parts
    # on the CPU the CUDA tests are the ones skipped; on a GPU a skip fails the check
    assert parts["cuda_tests"]["skipped"] >= 2 and parts["cuda_tests"]["failures"] == 0
    assert all("cuda" in name for name in parts["cuda_tests"]["skipped_tests"])
    assert max(parts["gradient"]["max_abs_diff"].values()) <= 1e-4
    bench_rows = [r for r in parts["gpu_bench"]["results"] if "step_ms" in r]
    assert bench_rows and all(r["img_per_s"] > 0 and math.isfinite(r["final_loss"]) for r in bench_rows)
    pretrain = parts["pretrain"]
    assert pretrain["steps"] == 4 and pretrain["transform_placement"] == "device"
    assert all(math.isfinite(r["loss"]) for r in pretrain["reports"])
