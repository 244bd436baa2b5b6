"""Submit job specs (``jobs/*.job.yaml``) to a Ray cluster as Ray Jobs.

A job spec names one ``sarjepa`` command, its config file and overrides, and the runtime
environment. Ray's token authentication stays on: the client reads the cluster token from
``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token`` and we set ``RAY_AUTH_MODE=token`` when one exists.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sarjepa_dist.config import ConfigError, load_config, yaml_load
from sarjepa_dist.errors import JobRefusedError, SarjepaError
from sarjepa_dist.storage import redact

log = logging.getLogger(__name__)

COMMANDS = ("pretrain", "sweep", "fewshot", "inspect")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass
class JobSpec:
    name: str
    command: str
    config: str | None = None
    set: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)  # positional args (inspect)
    working_dir: str | None = ".."  # relative to the spec file; uploaded to the cluster
    forward_env: list[str] = field(default_factory=list)  # names only; values come from the submitter's env
    pip: list[str] = field(default_factory=list)
    entrypoint_num_cpus: float = 0.0
    entrypoint_num_gpus: float = 0.0

    def entrypoint(self) -> str:
        parts = ["python", "-m", "sarjepa_dist.cli", self.command]
        if self.config:
            parts += ["--config", self.config]
        for s in self.set:
            parts += ["--set", s]
        parts += self.args
        return " ".join(shlex.quote(p) for p in parts)

    def runtime_env(self, base_dir: Path) -> dict[str, Any]:
        env: dict[str, Any] = {}
        if self.working_dir:
            env["working_dir"] = str((base_dir / self.working_dir).resolve())
            # .gitignore'd paths (.venv, runs/, demo_out/) are skipped by Ray already
            env["excludes"] = [".git", "benchmarks/results", "**/__pycache__"]
        env_vars = {k: os.environ[k] for k in self.forward_env if k in os.environ}
        env_vars.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        env["env_vars"] = env_vars
        if self.pip:
            env["pip"] = list(self.pip)
        return env


def load_job_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"job spec {str(path)!r} does not exist")
    data = yaml_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"job spec {str(path)!r} must be a mapping")
    known = set(JobSpec.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"job spec {str(path)!r}: unknown keys {unknown}; known: {sorted(known)}")
    for req in ("name", "command"):
        if req not in data:
            raise ConfigError(f"job spec {str(path)!r}: missing {req!r}")
    spec = JobSpec(**data)
    if spec.command not in COMMANDS:
        raise ConfigError(f"job spec {str(path)!r}: command {spec.command!r} not in {list(COMMANDS)}")
    for name in spec.forward_env:
        if any(s in name for s in ("SECRET", "TOKEN", "PASSWORD")):
            raise ConfigError(f"job spec {str(path)!r}: forward_env {name!r} looks like a secret; give the "
                              f"cluster its own credentials (IAM role or Kubernetes secret) instead")
    if spec.config:
        # validate before anything leaves this machine; the path is relative to the working dir
        cfg_path = path.parent / (spec.working_dir or ".") / spec.config
        load_config(cfg_path, spec.set)
    return spec


def _enable_token_auth_if_available() -> None:
    token_file = Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.exists():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def submit(spec: JobSpec, *, address: str | None = None, base_dir: Path = Path("."),
           wait: bool = True, timeout_s: float = 24 * 3600, poll_s: float = 2.0) -> tuple[str, str]:
    """Submit; with ``wait`` stream logs until the job ends. Returns (submission id, final status)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _enable_token_auth_if_available()
    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, AuthenticationError, RuntimeError) as exc:
        raise JobRefusedError(f"job {spec.name!r}: the Ray job server at {redact(address)} refused the "
                              f"connection: {redact(str(exc))}") from exc
    submission_id = f"{spec.name}-{int(time.time())}"
    agent_deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(
                entrypoint=spec.entrypoint(),
                runtime_env=spec.runtime_env(base_dir),
                submission_id=submission_id,
                entrypoint_num_cpus=spec.entrypoint_num_cpus,
                entrypoint_num_gpus=spec.entrypoint_num_gpus,
                metadata={"sarjepa_job": spec.name},
            )
            break
        except (RuntimeError, AuthenticationError) as exc:
            # a freshly started head answers 500 until its job agent is up
            if "No available agent" not in str(exc) or time.time() > agent_deadline:
                raise JobRefusedError(f"job {spec.name!r}: the Ray job server at {redact(address)} refused "
                                      f"it: {redact(str(exc))}") from exc
            time.sleep(2.0)
    log.info("submitted %s as %s to %s", spec.name, job_id, address)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    deadline = time.time() + timeout_s
    status = client.get_job_status(job_id)
    while str(status) not in TERMINAL and time.time() < deadline:
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    return job_id, str(status)


def submit_job_spec(path: str, *, address: str | None = None, wait: bool = True) -> int:
    spec = load_job_spec(path)
    job_id, status = submit(spec, address=address, base_dir=Path(path).resolve().parent, wait=wait)
    print(f"{job_id}: {status}")
    if wait:
        from ray.job_submission import JobSubmissionClient

        logs = JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265").get_job_logs(job_id)
        print(logs[-4000:])
        if status != "SUCCEEDED":
            raise SarjepaError(f"job {job_id} ended {status}; the end of its log is above")
    return 0
