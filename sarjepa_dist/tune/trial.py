"""A Tune trial: a driver function that runs one pretraining (Train V2 ``TorchTrainer``) whose
reports, the online probe's among them, stream to Tune through ``TuneReportCallback``.

The trial's run is ``<train.storage_path>/<tune.name>-<trial id>``; a retried or resumed trial
relaunches the same run, so Ray Train starts it from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from ray import tune
from ray.tune.execution import class_cache
from ray.tune.integration.ray_train import TuneReportCallback

from sarjepa_dist.cluster import SECRET_ENV_VARS
from sarjepa_dist.config import Config, config_from_dict
from sarjepa_dist.train.loop import StepHook
from sarjepa_dist.train.runner import run_pretrain
from sarjepa_dist.tune.space import apply_point, point_of

# Ray Tune also copies this one (an older name of the session token) into every trial's runtime_env.
_TUNE_SECRET_ENV_VARS = frozenset(SECRET_ENV_VARS) | {"AWS_SECURITY_TOKEN"}


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trial_config(base_tree: dict[str, Any], point: dict[str, Any], run_name: str) -> Config:
    tree = apply_point(base_tree, point)
    tree.setdefault("train", {})["name"] = run_name
    return config_from_dict(tree)


def run_trial(point: dict[str, Any], sweep_name: str, base: dict[str, Any],
              step_hooks: Sequence[StepHook] = ()) -> None:
    """Tune's trainable (bound with ``tune.with_parameters``): ``point`` is the trial's config."""
    name = trial_run_name(sweep_name, tune.get_context().get_trial_id())
    cfg = trial_config(base, point_of(point), name)
    run_pretrain(cfg, callbacks=[TuneReportCallback()], step_hooks=step_hooks)


@contextlib.contextmanager
def tune_withholds_credentials() -> Iterator[None]:
    """Keep AWS credentials out of the trial actors' runtime_env while a sweep runs.

    Ray Tune copies ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` from the
    driver's environment into every trial actor's runtime_env (``class_cache.ENV_VARS_TO_PROPAGATE``),
    and the runtime-env agent logs that in plain text. Trials get credentials as pretraining's
    workers do: inherited on a local cluster, the nodes' own environment, profile or role elsewhere.
    """
    propagated = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - _TUNE_SECRET_ENV_VARS
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = propagated
