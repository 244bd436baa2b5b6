"""Submit job specs (``jobs/*.job.yaml``) to a Ray cluster as Ray Jobs, and follow or stop them.

A job spec names one ``sarjepa`` command, its config file and overrides, and the runtime
environment. Ray's token authentication stays on: the client takes the cluster token from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` and switches its own Ray
client to token mode when one exists (Ray reads the mode once per process, so the switch has to
refresh Ray's cached config before the first request).

The job server address comes from ``--address``, else the spec's ``address``, else
``RAY_ADDRESS``, else the local head at ``http://127.0.0.1:8265``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from sarjepa_dist.config import Config, ConfigError, load_config, yaml_load
from sarjepa_dist.errors import JobRefusedError

log = logging.getLogger(__name__)

COMMANDS = ("pretrain", "sweep", "pipeline", "fewshot", "inspect")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# fewshot.encoders entries that name no path (sarjepa_dist.fewshot.sources resolves them)
NON_PATH_ENCODERS = ("random-init", "raw-pixels", "gradient-maps")
# The import names of the project's runtime dependencies (pyproject.toml): the job's `python`
# must find all of them, or every job dies at its first import.
RUNTIME_MODULES = ("ray", "torch", "torchvision", "timm", "pyarrow", "s3fs", "fsspec", "numpy", "yaml",
                   "safetensors", "tensorboardX", "tifffile", "PIL", "matplotlib", "pandas")
TOKEN_HELP = ("give this shell the cluster's token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
              "(docs/DEPLOY.md, 'The cluster token')")


class JobError(JobRefusedError):
    """A job could not be submitted, found or followed; the message says what to do (exit 1, no traceback)."""


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
    address: str | None = None  # the job server (dashboard) URL; --address and RAY_ADDRESS come first/after
    clusters: list[str] = field(default_factory=list)  # cluster configs this job is sized for (tests check the fit)

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


def storage_paths(cfg: Config, command: str, args: list[str]) -> dict[str, str]:
    """The config's data and output locations that ``command`` reads or writes, by dotted key."""
    paths: dict[str, str] = {}
    if command in ("pretrain", "sweep", "pipeline"):
        paths["data.path"] = cfg.data.path
        paths["train.storage_path"] = cfg.train.storage_path
        paths["probe.data"] = cfg.probe.data or ""
    if command in ("sweep", "pipeline"):
        paths["tune.storage_path"] = cfg.tune.storage_path
    if command in ("pipeline", "fewshot"):
        paths["fewshot.data"] = cfg.fewshot.data
        if cfg.fewshot.test_data:
            paths["fewshot.test_data"] = cfg.fewshot.test_data
        paths["fewshot.out"] = cfg.fewshot.out
    if command == "pipeline":
        paths["pipeline.out"] = cfg.pipeline.out
    if command == "fewshot":
        for i, enc in enumerate(cfg.fewshot.encoders):
            if enc not in NON_PATH_ENCODERS:
                paths[f"fewshot.encoders[{i}]"] = enc
    if command == "inspect":
        paths.update({f"args[{i}]": a for i, a in enumerate(args)})
    return {k: v for k, v in paths.items() if v}


def is_relative_local_path(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    if scheme == "file":
        return not urlparse(uri).path.startswith("/")
    return scheme == "" and not Path(uri).is_absolute()


def load_job_spec(path: str | Path, extra_set: list[str] | None = None) -> JobSpec:
    """Read and check a job spec (and its config, with ``extra_set`` overrides appended)."""
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
    spec.set = [*spec.set, *(extra_set or [])]
    if spec.command not in COMMANDS:
        raise ConfigError(f"job spec {str(path)!r}: command {spec.command!r} not in {list(COMMANDS)}")
    for name in spec.forward_env:
        if any(s in name for s in ("SECRET", "TOKEN", "PASSWORD")):
            raise ConfigError(f"job spec {str(path)!r}: forward_env {name!r} looks like a secret; give the "
                              f"cluster its own credentials (IAM role or Kubernetes secret) instead")
        if name.startswith("RAY_"):
            raise ConfigError(f"job spec {str(path)!r}: forward_env {name!r}: Ray sets its own RAY_* variables "
                              f"on the cluster; forwarding this shell's would point the job at the wrong cluster")
    cfg = None
    if spec.config:
        # validate before anything leaves this machine; the path is relative to the working dir
        cfg_path = path.parent / (spec.working_dir or ".") / spec.config
        cfg = load_config(cfg_path, spec.set)
    if cfg is not None or spec.args:
        for key, uri in storage_paths(cfg or Config(), spec.command, spec.args).items():
            if is_relative_local_path(uri):
                raise ConfigError(
                    f"job spec {str(path)!r}: {key} = {uri!r} is a relative path; a Ray job runs in a "
                    f"temporary copy of its working_dir, where inputs are absent and outputs are lost. "
                    f"Use s3://bucket/prefix (or an absolute path every node mounts; docs/DEPLOY.md, Storage)")
    return spec


def resolve_address(address: str | None = None, spec: JobSpec | None = None) -> str:
    return address or (spec.address if spec else None) or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def enable_token_auth_if_available() -> bool:
    """Switch this process's Ray client to token mode when a cluster token is at hand.

    An explicit ``RAY_AUTH_MODE`` is respected. Ray caches the mode at import, so the cached
    config and token are refreshed here; without that the first request goes out without a token.
    """
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or Path(token_path).is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import AuthenticationTokenLoader, Config as RayConfig

    RayConfig.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


@contextmanager
def _job_server(address: str, job_id: str | None = None) -> Iterator[Any]:
    """A JobSubmissionClient for ``address``; Ray's errors become one clear JobError."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token_mode = enable_token_auth_if_available()
    try:
        yield JobSubmissionClient(address)
    except AuthenticationError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "authentication failed"
        hint = TOKEN_HELP if token_mode else f"no cluster token found in this shell; {TOKEN_HELP}"
        raise JobError(f"the Ray job server at {address} refused the request ({reason}); {hint}") from None
    except (ConnectionError, requests.exceptions.ConnectionError) as exc:
        raise JobError(f"cannot reach a Ray job server at {address}: {str(exc).splitlines()[0].rstrip('.')}. Is the head "
                       f"up, and is this its dashboard URL (http://HOST:8265; through an SSH tunnel for "
                       f"a cloud cluster: docs/DEPLOY.md)?") from None
    except RuntimeError as exc:
        text = str(exc)
        if job_id and ("does not exist" in text or "404" in text):
            raise JobError(f"no job {job_id!r} on the Ray cluster at {address} (sarjepa jobs list)") from None
        if "Failed to connect" in text or "Connection refused" in text:
            raise JobError(f"cannot reach a Ray job server at {address}: {text.splitlines()[0]}") from None
        raise JobError(f"the Ray job server at {address} answered: {text.strip()[:1000]}") from None


def _submit_with_retry(client: Any, **kwargs: Any) -> str:
    agent_deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:
            # a freshly started head answers 500 until its job agent is up
            if "No available agent" not in str(exc) or time.time() > agent_deadline:
                raise
            time.sleep(2.0)


def _wait_for_end(client: Any, job_id: str, timeout_s: float, poll_s: float) -> str:
    deadline = time.time() + timeout_s
    status = str(client.get_job_status(job_id))
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(poll_s)
        status = str(client.get_job_status(job_id))
    return status


def python_probe_entrypoint() -> str:
    """A job entrypoint that prints which `python` it got and fails naming the modules it lacks."""
    probe = ("import importlib.util as u, sys; "
             f"missing = [m for m in {RUNTIME_MODULES!r} if u.find_spec(m) is None]; "
             "print('python:', sys.executable); "
             "sys.exit('missing: ' + ', '.join(missing) if missing else 0)")
    return f"python -c {shlex.quote(probe)}"


def check_cluster_python(client: Any, address: str, *, timeout_s: float = 300.0) -> str:
    """Run a probe job: the `python` a job's entrypoint gets must find the project's dependencies.

    Returns that interpreter's path. A head started from a virtual environment that was not
    activated gives its jobs whatever `python` its PATH finds, and every job then dies at import.
    """
    job_id = _submit_with_retry(client, entrypoint=python_probe_entrypoint(),
                                submission_id=f"sarjepa-python-check-{int(time.time() * 1000)}",
                                entrypoint_num_cpus=0, metadata={"sarjepa_check": "python"})
    status = _wait_for_end(client, job_id, timeout_s, 0.5)
    logs = client.get_job_logs(job_id)
    interpreter = next((ln.split(":", 1)[1].strip() for ln in logs.splitlines() if ln.startswith("python:")), "?")
    if status != "SUCCEEDED":
        missing = next((ln for ln in logs.splitlines() if ln.startswith("missing:")), logs.strip()[-300:])
        raise JobError(f"the Ray cluster at {address} runs jobs with `python` = {interpreter}, which cannot "
                       f"import the project's dependencies ({missing or status}). Start the head from the "
                       f"project's environment (bash infra/dev/cluster.sh up puts .venv/bin first on its PATH) "
                       f"or run the cluster image (infra/docker/Dockerfile)")
    return interpreter


def submit(spec: JobSpec, *, address: str | None = None, base_dir: Path = Path("."),
           wait: bool = True, timeout_s: float = 24 * 3600, poll_s: float = 2.0,
           check_python: bool = True, stream_logs: bool = False) -> tuple[str, str]:
    """Submit; with ``wait`` follow the job until it ends. Returns (submission id, status)."""
    address = resolve_address(address, spec)
    with _job_server(address) as client:
        if check_python:
            interpreter = check_cluster_python(client, address)
            log.info("the cluster's job interpreter is %s", interpreter)
        job_id = _submit_with_retry(
            client,
            entrypoint=spec.entrypoint(),
            runtime_env=spec.runtime_env(base_dir),
            submission_id=f"{spec.name}-{int(time.time())}",
            entrypoint_num_cpus=spec.entrypoint_num_cpus,
            entrypoint_num_gpus=spec.entrypoint_num_gpus,
            metadata={"sarjepa_job": spec.name},
        )
        log.info("submitted %s as %s to %s", spec.name, job_id, address)
        if not wait:
            return job_id, str(client.get_job_status(job_id))
        if stream_logs:
            _stream_logs(client, job_id)
        return job_id, _wait_for_end(client, job_id, timeout_s, poll_s)


def _stream_logs(client: Any, job_id: str) -> None:
    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(follow())


def submit_job_spec(path: str, *, address: str | None = None, wait: bool = False,
                    overrides: list[str] | None = None) -> int:
    """``sarjepa submit``: 0 once submitted, or with ``wait`` 0 only when the job succeeded."""
    spec = load_job_spec(path, overrides)
    address = resolve_address(address, spec)
    job_id, status = submit(spec, address=address, base_dir=Path(path).resolve().parent, wait=wait,
                            stream_logs=wait)
    print(f"{job_id}: {status}")
    if not wait:
        print(f"follow it with: sarjepa jobs logs {job_id} --follow --address {address}")
        return 0
    return 0 if status == "SUCCEEDED" else 1


def jobs_command(action: str, job_id: str | None, *, address: str | None = None, follow: bool = False) -> int:
    """``sarjepa jobs list|status|logs|stop``."""
    address = resolve_address(address)
    with _job_server(address, job_id) as client:
        if action == "list":
            jobs = sorted((j for j in client.list_jobs() if "sarjepa_check" not in (j.metadata or {})),
                          key=lambda j: j.start_time or 0)
            for job in jobs:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(job.start_time / 1000)) if job.start_time else "-"
                print(f"{job.submission_id or job.job_id}\t{job.status}\t{started}\t{job.entrypoint}")
            if not jobs:
                print(f"no jobs on {address}")
            return 0
        if action == "status":
            info = client.get_job_info(job_id)
            message = (info.message or "").splitlines()[0][:200] if info.message else ""
            print(f"{job_id}: {info.status}" + (f" ({message}; sarjepa jobs logs {job_id})" if message else ""))
            return 0 if str(info.status) in ("SUCCEEDED", "RUNNING", "PENDING") else 1
        if action == "logs":
            if follow:
                _stream_logs(client, job_id)
                status = str(client.get_job_status(job_id))
                print(f"{job_id}: {status}")
                return 0 if status == "SUCCEEDED" else 1
            print(client.get_job_logs(job_id), end="")
            return 0
        if action == "stop":
            stopped = client.stop_job(job_id)
            status = _wait_for_end(client, job_id, 60, 1.0) if stopped else str(client.get_job_status(job_id))
            print(f"{job_id}: {status}" + ("" if stopped else " (it had already ended)"))
            return 0
    raise AssertionError(action)
