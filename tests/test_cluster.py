"""The runners' Ray session: what workers inherit, how a cluster is joined or started, and that a
session shuts down only the cluster it started (Ray itself replaced: no cluster is started here)."""

from __future__ import annotations

import logging

import pytest
import ray

from sarjepa_dist import cluster
from sarjepa_dist.config import RayConfig


def test_worker_env_carries_storage_and_project_vars_only():
    environ = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
               "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "SARJEPA_FAULT_AT_STEP": "3", "HOME": "/root",
               "AWS_SESSION_TOKEN": ""}
    env = cluster.worker_env(environ)
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    assert env["SARJEPA_FAULT_AT_STEP"] == "3"
    assert "HOME" not in env and "AWS_SESSION_TOKEN" not in env  # unrelated / empty
    public = cluster.worker_env(environ, secrets=False)
    assert "AWS_SECRET_ACCESS_KEY" not in public and "AWS_ACCESS_KEY_ID" not in public
    assert public["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9" and public["SARJEPA_FAULT_AT_STEP"] == "3"
    described = cluster.describe_env(env)
    assert "AWS_SECRET_ACCESS_KEY" in described and "s3cr3t-value" not in described


def test_ray_init_exports_storage_env_but_never_secrets(monkeypatch, caplog):
    secret = "very-secret-key-123"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE9")
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    with caplog.at_level(logging.DEBUG):
        where = cluster.ray_init(RayConfig(address="127.0.0.1:6379"))
        cluster.ray_init(RayConfig(num_cpus=3))
    assert "127.0.0.1:6379" in where
    assert calls[0]["address"] == "127.0.0.1:6379"
    env = calls[0]["runtime_env"]["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["RAY_ADDRESS"] == "127.0.0.1:6379"
    # Ray records a job's runtime_env (job table, dashboard): credentials stay out of it
    assert "AWS_SECRET_ACCESS_KEY" not in env and "AWS_ACCESS_KEY_ID" not in env
    assert secret not in repr(calls)
    assert calls[1]["num_cpus"] == 3 and calls[1]["address"] == "local"  # never joins a stray cluster
    assert secret not in caplog.text and "AKIDEXAMPLE9" not in caplog.text
    assert "AWS_ENDPOINT_URL" in caplog.text  # the names are logged, so operators can check


def test_ray_init_keeps_an_existing_connection(monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("must not re-initialise Ray"))
    assert "already connected" in cluster.ray_init(RayConfig(address="127.0.0.1:6390"))


BY_ADDRESS = RayConfig(address="127.0.0.1:6390")  # joins by address: nothing pinned in this process's environment


def _fake_ray(monkeypatch, connected: bool) -> list[str]:
    """Ray's connection calls replaced by a recorder; returns the list of calls made."""
    calls: list[str] = []
    state = {"up": connected}

    def init(**kw):
        calls.append("init")
        state["up"] = True

    def shutdown():
        calls.append("shutdown")
        state["up"] = False

    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    return calls


def test_a_session_shuts_down_only_the_cluster_it_started(monkeypatch):
    calls = _fake_ray(monkeypatch, connected=False)
    with cluster.ray_session(BY_ADDRESS):
        assert calls == ["init"]
    assert calls == ["init", "shutdown"]

    calls = _fake_ray(monkeypatch, connected=True)  # the caller's connection (a fixture, a Ray job)
    with cluster.ray_session(BY_ADDRESS):
        pass
    assert calls == []


def test_a_session_shuts_down_its_cluster_when_the_block_fails(monkeypatch):
    calls = _fake_ray(monkeypatch, connected=False)
    with pytest.raises(RuntimeError, match="boom"):
        with cluster.ray_session(BY_ADDRESS):
            raise RuntimeError("boom")
    assert calls == ["init", "shutdown"]


def test_a_lazy_session_connects_on_first_use_only(monkeypatch):
    calls = _fake_ray(monkeypatch, connected=False)
    with cluster.ray_session(BY_ADDRESS, lazy=True):
        pass
    assert calls == []  # never needed: no cluster started
    with cluster.ray_session(BY_ADDRESS, lazy=True) as connect:
        connect()
        connect()
        assert calls == ["init"]
    assert calls == ["init", "shutdown"]
