"""Connecting to (or starting) the Ray cluster a run executes on.

One rule for every runner: ``cfg.ray.address`` wins, then ``RAY_ADDRESS``, else a fresh local
cluster sized by ``cfg.ray.num_cpus`` / ``num_gpus``. A process that already called ``ray.init``
(a test fixture, a notebook, ``sarjepa`` inside a Ray job) keeps its connection: re-initialising
would drop the caller's cluster and every object it holds. Runners hold their connection in a
:func:`ray_session`, which shuts down only a cluster it started itself.

Workers on other nodes do not inherit the driver's environment, yet they read shards from, and
write checkpoints to, the same S3-compatible store as the driver. So the non-secret storage
variables (endpoint, region, profile) travel in the job's ``runtime_env`` ``env_vars``.
Credentials never do: Ray records a job's runtime_env in its job table and dashboard. On a local
cluster the workers inherit them from this process; a remote cluster must hold its own (an IAM
role, or a Kubernetes secret as in ``cluster/kuberay/storage.yaml``). Only the *names* of
exported variables are ever logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Callable, Iterator, Mapping

import ray

from sarjepa_dist import storage
from sarjepa_dist.config import RayConfig, StorageConfig

__all__ = ["STORAGE_ENV_VARS", "SECRET_ENV_VARS", "PROJECT_ENV_PREFIX", "VERBOSE_ENV", "describe_env", "worker_env",
           "quiet_train_worker_console", "ray_init", "ray_session", "ray_train_log_level", "verbose_console"]

_log = logging.getLogger(__name__)

# What a worker needs to reach the same store as the driver (storage.py reads exactly these).
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)
# Project switches (e.g. the fault-injection hooks the failure tests use) travel with the job too.
PROJECT_ENV_PREFIX = "SARJEPA_"
# Quiet Ray Data in worker logs; harmless when already set.
_QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# The console is quiet by default: the project's own lines (progress, results), warnings and
# errors. "1" (``sarjepa -v``) adds Ray's detail: its start-up lines, Ray Train's controller log
# and the whole metrics dict of every report. Set by the CLI; travels to workers as a SARJEPA_* switch.
VERBOSE_ENV = "SARJEPA_VERBOSE"


def verbose_console() -> bool:
    return os.environ.get(VERBOSE_ENV, "") == "1"


def ray_train_log_level() -> str:
    """The console level of Ray Train's own ``ray.train`` logs (``RunConfig.logging_config``): at
    INFO every ``ray.train.report`` prints its whole metrics dict beside the loop's progress line."""
    return "INFO" if verbose_console() else "WARNING"


# Never put these where Ray records them as run metadata (see ``worker_env(secrets=False)``).
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def worker_env(environ: Mapping[str, str] | None = None, *, secrets: bool = True) -> dict[str, str]:
    """Environment variables that workers of this job must see, taken from ``environ``.

    Returns storage variables that are set, ``SARJEPA_*`` switches and quiet-logging defaults.
    With ``secrets=True`` the result holds credentials: pass it to Ray's job ``runtime_env`` only,
    never to a logger (use :func:`describe_env`). ``secrets=False`` leaves credentials out, for
    places Ray exports as run state (Train V2 publishes ``RunConfig.worker_runtime_env`` in its
    state API / dashboard).
    """
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in _QUIET_ENV.items() if k not in environ}
    env.update({k: environ[k] for k in STORAGE_ENV_VARS
                if environ.get(k) and (secrets or k not in SECRET_ENV_VARS)})
    env.update({k: v for k, v in environ.items() if k.startswith(PROJECT_ENV_PREFIX)})
    return env


_pinned_api_address: str | None = None


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def describe_env(env: Mapping[str, str]) -> str:
    """The variable names only, for logs."""
    return ", ".join(sorted(env)) or "(none)"


def ray_init(ray_cfg: RayConfig, storage_cfg: StorageConfig | None = None, *, log_to_driver: bool = True) -> str:
    """Make sure this process is connected to a Ray cluster; return a one-line description.

    ``storage_cfg`` (endpoint/region from the config file) is applied to this process first, so
    the exported environment carries it to the workers as well.
    """
    if storage_cfg is not None:
        storage.configure(storage_cfg.endpoint_url, storage_cfg.region)
    _ray_data_console()
    if ray.is_initialized():
        where = "the Ray cluster this process is already connected to"
        _log.info("using %s", where)
        return where

    global _pinned_api_address
    if _pinned_api_address and os.environ.get("RAY_API_SERVER_ADDRESS") == _pinned_api_address:
        os.environ.pop("RAY_API_SERVER_ADDRESS")  # pinned for an earlier local cluster of this process
    env = worker_env(secrets=False)
    runtime_env = {"env_vars": env}
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        if not address.startswith("ray://") and address not in ("auto", "local"):
            # Ray's own helper actors (e.g. Train's placement-group cleaner) find "their" cluster
            # through the State API, which guesses the newest cluster on the machine unless
            # RAY_ADDRESS says otherwise; with several clusters on one host it can guess wrong.
            env["RAY_ADDRESS"] = address
        # Inside a Ray job (`sarjepa submit`) ray.init merges this runtime_env into the job's and
        # refuses any env_vars key the job already sets, even with an equal value. Equal ones reach
        # the workers through the job anyway; a value this driver changed (storage.region from the
        # config) must win, which Ray allows only through its override switch.
        import json

        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        job_env_vars = (job_config.get("runtime_env") or {}).get("env_vars") or {}
        for key in [k for k, v in env.items() if job_env_vars.get(k) == v]:
            del env[key]
        if env.keys() & job_env_vars.keys():
            os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
        _log.info("connecting to Ray at %s; exporting to workers: %s", storage.redact(address), describe_env(env))
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver,
                 logging_level=_ray_log_level())
        return f"Ray cluster at {storage.redact(address)}"
    _log.info("starting a local Ray cluster (num_cpus=%s, num_gpus=%s); exporting to workers: %s",
              ray_cfg.num_cpus, ray_cfg.num_gpus, describe_env(env))
    # address="local": without it ray.init() joins whatever cluster /tmp/ray/ray_current_cluster
    # names (any `ray start` head on this host), silently ignoring num_cpus/num_gpus.
    # The dashboard (on loopback) also serves the State API that Train V2's placement-group
    # cleaner polls; without it that actor warns every few seconds for the whole run. The cleaner
    # finds "its" State API by guessing the newest cluster on the host unless told: with two
    # clusters on one machine it can ask the other one, conclude its controller is dead and remove
    # a live run's placement group. So pin the dashboard port and tell every process of this job.
    dashboard_port = _free_loopback_port()
    api = f"http://127.0.0.1:{dashboard_port}"
    env["RAY_API_SERVER_ADDRESS"] = api
    os.environ["RAY_API_SERVER_ADDRESS"] = _pinned_api_address = api
    ray.init(address="local", num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus, runtime_env=runtime_env,
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             log_to_driver=log_to_driver, logging_level=_ray_log_level())
    return "a new local Ray cluster"


def quiet_train_worker_console() -> None:
    """In a Ray Train worker, unless verbose: no "Reporting training result <i>: <the whole metrics
    dict>" line per report. Ray Train names that module's logger by its file path, outside the
    ``ray.train`` tree, so ``RunConfig.logging_config`` does not reach it."""
    if verbose_console():
        return
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _ray_data_console() -> None:
    """Ray Data's banner at the start of every execution (two lines per epoch: the dataset's id and
    execution plan) only with -v. Ray Train hands the driver's DataContext to its workers, where
    the later epochs' datasets are built."""
    from ray.data import DataContext

    DataContext.get_current().print_on_execution_start = verbose_console()


def _ray_log_level() -> int:
    """Level of the driver's ``ray`` logger (start-up lines, the dashboard's address, ...)."""
    return logging.INFO if verbose_console() else logging.WARNING


@contextlib.contextmanager
def ray_session(ray_cfg: RayConfig, storage_cfg: StorageConfig | None = None, *, log_to_driver: bool = True,
                lazy: bool = False) -> Iterator[Callable[[], None]]:
    """Connect to Ray (:func:`ray_init`) for the ``with`` block; on leaving it, shut down the cluster
    connection only when this session made it, never the caller's.

    Yields ``connect()``. With ``lazy=True`` nothing happens until ``connect()`` is first called,
    and it does nothing when Ray is already up: a job that may need no cluster at all (few-shot
    features all in the cache) starts none.
    """
    started = False

    def connect() -> None:
        nonlocal started
        if not ray.is_initialized():
            ray_init(ray_cfg, storage_cfg, log_to_driver=log_to_driver)
            started = True

    if not lazy:
        started = not ray.is_initialized()
        ray_init(ray_cfg, storage_cfg, log_to_driver=log_to_driver)
    try:
        yield connect
    finally:
        if started:
            ray.shutdown()
