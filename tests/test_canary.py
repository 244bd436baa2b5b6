"""A canary secret in the environment never reaches an artefact of a run.

The AWS credentials are set to canary values before a Ray session of this module starts (so the
raylet and every worker hold them, as on a real node), then pretraining, few-shot evaluation and a
sweep run against the S3 endpoint. Every artefact is then searched for the canaries: Ray's own
session folder (logs of the driver, workers, raylet, GCS, runtime-env agent, ...), every object in
the bucket (manifests, checkpoints, TensorBoard events, reports, sweep tables) and local outputs.
A user:password inside a URI of the config is also checked to be written redacted.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

from sarjepa_dist import storage
from sarjepa_dist.config import config_from_dict

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

CANARY_SECRET = f"canarySecret{uuid.uuid4().hex}"
CANARY_KEY_ID = f"CANARYKEYID{uuid.uuid4().hex[:12].upper()}"
URI_PASSWORD = f"uriPassword{uuid.uuid4().hex[:10]}"
CANARIES = (CANARY_SECRET, CANARY_KEY_ID, URI_PASSWORD)


@pytest.fixture(scope="module")
def canary_ray(s3_endpoint):
    """A Ray session started with canary credentials in its environment, in its own temp folder."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET})
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must fit
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ[k] = v  # the endpoint fixture set them: put its values back


def _config(s3_bucket: str, local: Path, **sections):
    from sarjepa_dist.data.synth import SynthConfig, write_synthetic_dataset

    data = storage.join(s3_bucket, "data")
    write_synthetic_dataset(data, SynthConfig(num_classes=3, per_class=16, size=32, seed=0), command=["test"])
    tree = {
        "data": {"path": data, "img_size": 32, "batch_size": 8},
        "gradient": {"radii": [2, 4]},
        "mask": {"min_keep": 4},
        "model": {"patch_size": 8, "depth": 2, "predictor_dim": 32, "predictor_depth": 1, "predictor_heads": 2},
        "train": {"name": "canary", "steps": 4, "checkpoint_every": 2, "log_every": 2, "cpus_per_worker": 1,
                  "storage_path": storage.join(s3_bucket, "runs")},
        "fewshot": {"data": data, "out": storage.join(s3_bucket, "fewshot"), "split_column": "depression_deg",
                    "train_values": [17.0], "test_values": [15.0], "shots": [2], "seeds": 2,
                    "methods": ["prototype"]},
        "tune": {"name": "canary-sweep", "storage_path": str(local / "sweeps"),
                 "grid": {"mask.target_scale": [[0.1, 0.15], [0.15, 0.25]]}},
    }
    for name, section in sections.items():
        tree[name] = {**tree.get(name, {}), **section}
    return config_from_dict(tree)


def _leaks(paths: list[Path], s3_prefix: str | None) -> list[str]:
    """'<where>: <canary>' for every file (and every object under ``s3_prefix``) holding a canary."""
    found = []
    for root in paths:
        for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                data = f.read_bytes()
            except OSError:
                continue  # sockets and files Ray removed while we walked
            found += [f"{f}: {c[:12]}..." for c in CANARIES if c.encode() in data]
    if s3_prefix:
        for uri in storage.list_files(s3_prefix, recursive=True):
            data = storage.read_bytes(uri)
            found += [f"{uri}: {c[:12]}..." for c in CANARIES if c.encode() in data]
    return found


def test_no_canary_in_any_artefact_of_pretrain_and_fewshot(canary_ray, s3_bucket, tmp_path):
    from sarjepa_dist.fewshot.runner import run_fewshot
    from sarjepa_dist.train.export import export_checkpoint
    from sarjepa_dist.train.runner import run_pretrain

    cfg = _config(s3_bucket, tmp_path)
    result = run_pretrain(cfg)
    assert result.final_step == 4 and result.latest_checkpoint_uri.startswith("s3://")
    export_checkpoint(result.latest_checkpoint_uri, storage.join(s3_bucket, "export"))
    export_checkpoint(result.latest_checkpoint_uri, str(tmp_path / "export"))
    few = _config(s3_bucket, tmp_path, fewshot={"encoders": [result.latest_checkpoint_uri, "random-init"]})
    few_result = run_fewshot(few)
    assert storage.exists(few_result.results_uri)

    leaks = _leaks([Path(canary_ray), tmp_path], s3_bucket)
    assert not leaks, "canary found in:\n" + "\n".join(leaks)
    # the canaries are really in the processes' environment (the test would prove nothing otherwise)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == CANARY_SECRET


def test_uri_credentials_are_redacted_in_written_configs():
    """A user:password in a config URI is written as ***: the training loop writes checkpoint
    config.json, and few-shot results.json its config, through ``redact_tree``."""
    tree = {"data": {"path": f"s3://user:{URI_PASSWORD}@bucket/data"}, "n": 1, "l": [f"http://u:{URI_PASSWORD}@h/x"]}
    out = storage.redact_tree(tree)
    assert URI_PASSWORD not in repr(out)
    assert out["data"]["path"] == "s3://***@bucket/data" and out["n"] == 1 and out["l"] == ["http://***@h/x"]


@pytest.mark.faults
def test_no_canary_in_any_artefact_of_a_sweep(canary_ray, s3_bucket, tmp_path):
    from sarjepa_dist.tune import run_sweep

    # the probe (on the labelled training chips) is what a sweep ranks and stops trials by
    result = run_sweep(_config(s3_bucket, tmp_path, probe={"every": 2, "shots": 2, "episodes": 1}))
    assert len(result.rows) == 2
    leaks = _leaks([Path(canary_ray), tmp_path], s3_bucket)
    assert not leaks, "canary found in:\n" + "\n".join(leaks)
