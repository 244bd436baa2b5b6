"""Job specs: validation, entrypoints, and a real submission to a local Ray head with token auth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sarjepa_dist.cli import build_parser, main
from sarjepa_dist.config import ConfigError
from sarjepa_dist.jobs import (JobError, JobSpec, check_cluster_python, enable_token_auth_if_available,
                               load_job_spec, python_probe_entrypoint, resolve_address, submit)

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


@pytest.mark.parametrize("key, value", [
    ("data.path", "runs/data/synth64"), ("train.storage_path", "runs"), ("data.path", "./runs/data")])
def test_relative_storage_paths_are_refused(tmp_path, key, value):
    (tmp_path / "c.yaml").write_text("data: {path: s3://b/d}\ntrain: {storage_path: s3://b/runs}\n")
    p = tmp_path / "s.job.yaml"
    p.write_text(f"name: a\ncommand: pretrain\nconfig: c.yaml\nworking_dir: .\nset: ['{key}={value}']\n")
    with pytest.raises(ConfigError, match=rf"{key} = '{value}' is a relative path.*s3://"):
        load_job_spec(p)


def test_s3_and_absolute_storage_paths_pass(tmp_path):
    (tmp_path / "c.yaml").write_text(f"data: {{path: s3://b/d}}\ntrain: {{storage_path: {tmp_path}/runs}}\n")
    p = tmp_path / "s.job.yaml"
    p.write_text("name: a\ncommand: pretrain\nconfig: c.yaml\nworking_dir: .\n")
    assert load_job_spec(p, ["data.path=file:///mnt/shared/d"]).set == ["data.path=file:///mnt/shared/d"]


def test_few_shot_encoder_paths_are_checked_but_builtin_names_pass(tmp_path):
    (tmp_path / "c.yaml").write_text("fewshot: {data: s3://b/d, out: s3://b/out, encoders: [random-init, gradient-maps]}\n")
    p = tmp_path / "s.job.yaml"
    p.write_text("name: a\ncommand: fewshot\nconfig: c.yaml\nworking_dir: .\n")
    load_job_spec(p)
    with pytest.raises(ConfigError, match=r"fewshot.encoders\[1\] = 'out/encoder'"):
        load_job_spec(p, ["fewshot.encoders=[random-init, out/encoder]"])


def test_forwarding_ray_variables_is_refused(tmp_path):
    p = tmp_path / "s.job.yaml"
    p.write_text("name: a\ncommand: inspect\nargs: [s3://b/d]\nforward_env: [RAY_ADDRESS]\n")
    with pytest.raises(ConfigError, match="RAY_ADDRESS"):
        load_job_spec(p)


def test_address_precedence(monkeypatch):
    spec = JobSpec(name="a", command="pretrain", address="http://10.0.0.5:8265")
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.9:8265")
    assert resolve_address("http://flag:8265", spec) == "http://flag:8265"
    assert resolve_address(None, spec) == "http://10.0.0.5:8265"
    assert resolve_address(None, JobSpec(name="a", command="pretrain")) == "http://10.0.0.9:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(None, None) == "http://127.0.0.1:8265"


@pytest.fixture
def ray_auth_env(monkeypatch):
    """Leaves Ray's cached auth config as it found it (the tests below change the process's mode)."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    from ray._raylet import AuthenticationTokenLoader, Config as RayConfig

    RayConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def test_token_file_switches_the_client_to_token_mode(ray_auth_env, tmp_path):
    """The switch takes effect in this process (Ray caches the mode at import): the bug was that
    setting the variable alone left the first request without a token."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    token = tmp_path / "auth_token"
    token.write_text("a" * 32)
    ray_auth_env.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert enable_token_auth_if_available() is True
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert get_auth_headers_if_auth_enabled({}) == {"authorization": "Bearer " + "a" * 32}


def test_explicit_auth_mode_is_respected(ray_auth_env, tmp_path):
    token = tmp_path / "auth_token"
    token.write_text("a" * 32)
    ray_auth_env.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    ray_auth_env.setenv("RAY_AUTH_MODE", "disabled")
    assert enable_token_auth_if_available() is False


class ShellJobServer:
    """Runs each submitted entrypoint through a shell with the given PATH, as Ray's job supervisor does."""

    def __init__(self, path: str):
        self.path, self.jobs = path, {}

    def submit_job(self, *, entrypoint, submission_id, **_):
        done = subprocess.run(entrypoint, shell=True, capture_output=True, text=True, timeout=120,
                              env={"PATH": self.path, "HOME": os.environ.get("HOME", "/")})
        self.jobs[submission_id] = ("SUCCEEDED" if done.returncode == 0 else "FAILED", done.stdout + done.stderr)
        return submission_id

    def get_job_status(self, job_id):
        return self.jobs[job_id][0]

    def get_job_logs(self, job_id):
        return self.jobs[job_id][1]


def test_python_check_names_the_interpreter_and_what_it_lacks(tmp_path):
    """A head whose PATH finds an interpreter without the project's packages (here: this one
    with its site-packages switched off) fails the probe with a message that says so."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").write_text(f"#!/bin/sh\nexec '{sys.executable}' -S \"$@\"\n")
    (bare / "python").chmod(0o755)
    with pytest.raises(JobError, match=r"`python` = .*cannot import the project's dependencies \(missing: ray, "
                                       r"torch.*pyarrow.*infra/dev/cluster.sh up"):
        check_cluster_python(ShellJobServer(f"{bare}:/usr/bin:/bin"), "http://127.0.0.1:8265")
    good = ShellJobServer(f"{Path(sys.executable).parent}:/usr/bin:/bin")
    assert check_cluster_python(good, "http://127.0.0.1:8265") == sys.executable
    assert "'pyarrow'" in python_probe_entrypoint()


def test_ray_init_inside_a_job_leaves_out_the_jobs_env_vars(monkeypatch):
    """Ray refuses a ray.init runtime_env that repeats a key of the job's env_vars, even with an
    equal value; a value the driver changed (storage.region from the config) must still win."""
    import ray
    from ray.runtime_env.runtime_env import _merge_runtime_env  # what ray.init applies

    from sarjepa_dist import storage
    from sarjepa_dist.config import RayConfig, StorageConfig
    from sarjepa_dist import cluster

    job_env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "us-east-1",
               "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": job_env}}))
    for k, v in job_env.items():
        monkeypatch.setenv(k, v)  # the job supervisor gives the driver the job's env_vars
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("RAY_OVERRIDE_JOB_RUNTIME_ENV", "")  # so that teardown removes what ray_init sets
    monkeypatch.delenv("RAY_OVERRIDE_JOB_RUNTIME_ENV")
    monkeypatch.setattr(storage, "_settings_override", storage._settings_override)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))

    cluster.ray_init(RayConfig(), StorageConfig())
    env_vars = calls[-1]["runtime_env"]["env_vars"]
    assert not env_vars.keys() & job_env.keys(), env_vars
    assert _merge_runtime_env({"env_vars": job_env}, calls[-1]["runtime_env"]) is not None
    assert "RAY_OVERRIDE_JOB_RUNTIME_ENV" not in os.environ

    cluster.ray_init(RayConfig(), StorageConfig(region="eu-west-1"))  # the config overrides the region
    env_vars = calls[-1]["runtime_env"]["env_vars"]
    assert env_vars["AWS_REGION"] == "eu-west-1" and "AWS_ENDPOINT_URL" not in env_vars
    merged = _merge_runtime_env({"env_vars": job_env}, calls[-1]["runtime_env"],
                                override=os.environ.get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1")
    assert merged is not None and merged["env_vars"]["AWS_REGION"] == "eu-west-1"


def test_jobs_subcommands_parse():
    args = build_parser().parse_args(["jobs", "logs", "pretrain-1", "--follow", "--address", "http://h:8265"])
    assert (args.jobs_action, args.job_id, args.follow, args.address) == ("logs", "pretrain-1", True, "http://h:8265")
    args = build_parser().parse_args(["submit", "jobs/pretrain.job.yaml", "--wait", "--set", "train.steps=2"])
    assert args.wait and args.overrides == ["train.steps=2"]


def test_unreachable_job_server_is_one_clear_line(capsys):
    from sarjepa_dist.local_s3 import free_port

    assert main(["jobs", "list", "--address", f"http://127.0.0.1:{free_port()}"]) != 0
    err = capsys.readouterr().err
    assert "cannot reach a Ray job server at http://127.0.0.1:" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.ray
def test_submit_inspect_job_to_local_head(tmp_path, ray_auth_env):
    """A real Ray Job: a head with the dashboard (job server), token auth left on, job runs `sarjepa inspect`.

    This shell has the cluster token but no RAY_AUTH_MODE, as after `ray start` on a fresh machine:
    submit's own switch must turn token mode on, or the job server refuses it."""
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
    monkeypatch = ray_auth_env
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
        # the head runs in token mode; this process forgets it, keeping only the token file
        monkeypatch.delenv("RAY_AUTH_MODE")
        RayConfig.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        with pytest.raises(AuthenticationError):  # without the switch the job server refuses this shell
            JobSubmissionClient(f"http://127.0.0.1:{dash}").list_jobs()
        job_id, status = submit(load_job_spec(spec_path), address=f"http://127.0.0.1:{dash}",
                                base_dir=work, timeout_s=300)
        assert os.environ.get("RAY_AUTH_MODE") == "token", "submit did not switch the client to token mode"
        logs = JobSubmissionClient(f"http://127.0.0.1:{dash}").get_job_logs(job_id)
        assert status == "SUCCEEDED", logs
        assert "4" in logs and "dataset" in logs.lower()
        # token auth stayed on: the job API refuses a caller without the token
        import requests

        anonymous = requests.get(f"http://127.0.0.1:{dash}/api/jobs/", timeout=10)
        assert anonymous.status_code in (401, 403), anonymous.status_code
    finally:
        cluster.shutdown()
