"""The data layer imports without Ray: ingest, synth, inspect and the CLI never start or load it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", [
    "sarjepa_dist.data.badrows", "sarjepa_dist.data.shards", "sarjepa_dist.data.ingest",
    "sarjepa_dist.data.synth", "sarjepa_dist.data.inspect", "sarjepa_dist.data.pipeline",
])
def test_importing_the_data_layer_leaves_ray_out(module):
    # a fresh interpreter: this test process may have imported Ray already
    code = (f"import sys, {module}\n"
            "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "print(loaded)\n"
            "sys.exit(1 if loaded else 0)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"importing {module} imported Ray: {proc.stdout.strip()} {proc.stderr[-2000:]}"


def test_the_pipeline_module_leaves_torch_out_until_a_chip_is_transformed():
    """Ray Data's coordinators unpickle the dataset (this module's functions and the spec) and
    never transform a chip: importing the module must not import torch (seconds per process)."""
    code = ("import sys\n"
            "from sarjepa_dist.data import pipeline\n"
            "before = 'torch' in sys.modules\n"
            "import numpy as np\n"
            "from sarjepa_dist.config import DataConfig\n"
            "pipeline.transform_chip(np.ones((1, 8, 8), np.float32), DataConfig(img_size=8), training=False, "
            "epoch=0, chip_id='a')\n"
            "print(before, 'torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "True"], proc.stdout
