"""Job specs: validation, entrypoints, and a real submission to a local Ray head with token auth."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sarjepa_dist.config import ConfigError
from sarjepa_dist.jobs import JobSpec, load_job_spec, submit

REPO = Path(__file__).resolve().parents[1]


def test_shipped_job_specs_validate():
    for spec_path in sorted((REPO / "jobs").glob("*.job.yaml")):
        spec = load_job_spec(spec_path)
        assert spec.entrypoint().startswith("python -m sarjepa_dist.cli ")


def test_entrypoint_quotes_overrides():
    spec = JobSpec(name="x", command="pretrain", config="jobs/pretrain.yaml",
                   set=["fewshot.encoders=[a, b]"])
    assert "'fewshot.encoders=[a, b]'" in spec.entrypoint()


@pytest.mark.parametrize("body, needle", [
    ("name: a\ncommand: train\n", "command 'train'"),
    ("name: a\ncommand: pretrain\nbogus: 1\n", "unknown keys ['bogus']"),
    ("command: pretrain\n", "missing 'name'"),
    ("name: a\ncommand: pretrain\nforward_env: [AWS_SECRET_ACCESS_KEY]\n", "looks like a secret"),
    ("name: a\ncommand: pretrain\nconfig: c.yaml\nworking_dir: .\nset: ['optim.lr=-1']\n", "optim.lr"),
])
def test_bad_specs_name_the_problem(tmp_path, body, needle):
    (tmp_path / "c.yaml").write_text("train: {steps: 5}\n")
    p = tmp_path / "s.job.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_job_spec(p)


def test_forward_env_passes_names_not_secrets(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    spec = JobSpec(name="x", command="inspect", args=["d"], forward_env=["AWS_ENDPOINT_URL"], working_dir=".")
    env = spec.runtime_env(tmp_path)
    assert env["env_vars"]["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
    assert "very-secret-value" not in repr(env)


@pytest.mark.slow
@pytest.mark.ray
def test_submit_inspect_job_to_local_head(tmp_path, monkeypatch):
    """A real Ray Job: a head with the dashboard (job server), token auth left on, job runs `sarjepa inspect`."""
    from ray.cluster_utils import Cluster

    from sarjepa_dist.data.shards import ChipRecord, ShardWriter

    data = tmp_path / "ds"
    with ShardWriter(str(data), class_names=["a"], source="test") as w:
        for i in range(4):
            w.add(ChipRecord(f"c{i}", np.full((1, 8, 8), i + 1, np.uint8), 0, "a"))
        w.commit()
    work = tmp_path / "work"
    work.mkdir()
    spec_path = work / "inspect.job.yaml"
    spec_path.write_text(textwrap.dedent(f"""
        name: inspect-test
        command: inspect
        args: ["{data}"]
        working_dir: .
    """))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    from sarjepa_dist.local_s3 import free_port

    dash = free_port()
    # token auth as a `ray start` head has it by default (Ray caches the mode: refresh it); on a
    # fresh machine make the token the way `ray start` does (~/.ray/auth_token)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    from ray._private.authentication.authentication_token_setup import generate_and_save_token
    from ray._raylet import AuthenticationTokenLoader
    from ray._raylet import Config as RayConfig

    RayConfig.initialize("")
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        generate_and_save_token()
        AuthenticationTokenLoader.instance().reset_cache()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": dash, "dashboard_host": "127.0.0.1",
        "node_ip_address": "127.0.0.1", "dashboard_agent_listen_port": free_port()})
    try:
        job_id, status = submit(load_job_spec(spec_path), address=f"http://127.0.0.1:{dash}",
                                base_dir=work, timeout_s=300)
        from ray.job_submission import JobSubmissionClient

        logs = JobSubmissionClient(f"http://127.0.0.1:{dash}").get_job_logs(job_id)
        assert status == "SUCCEEDED", logs
        assert "4" in logs and "dataset" in logs.lower()
        # token auth stayed on: the job API refuses a caller without the token
        import requests

        anonymous = requests.get(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert anonymous.status_code in (401, 403), anonymous.status_code
    finally:
        cluster.shutdown()
