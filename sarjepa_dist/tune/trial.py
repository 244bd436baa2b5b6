"""A Tune trial: one pretraining, run one of two ways (``tune.trial_executor``).

* ``trial-process`` (``auto`` for a one-worker trial): the training loop runs in the trial's own
  process. Its reports and checkpoints go to Tune (``tune.report``), which keeps them in the
  trial's folder ``<tune.storage_path>/<tune.name>/<trial id>`` (TensorBoard events beside them)
  and hands the latest back to a retried, resumed or un-paused trial (``tune.get_checkpoint``).
  Nothing else starts: no Ray Train controller, worker group or dataset coordinator, each a new
  Python process importing torch (~20 s of start-up per trial on a 2-core machine), and with
  ``reuse_actors`` the trial processes themselves outlive their trials.
* ``torch-trainer`` (``auto`` for several workers): the trial is a driver function that runs a
  Train V2 ``TorchTrainer`` whose reports stream to Tune through ``TuneReportCallback``. Its run
  is ``<train.storage_path>/<tune.name>-<trial id>``; a retried or resumed trial relaunches the
  same run, so Ray Train starts it from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import ray
import torch
from ray import tune
from ray.tune.execution import class_cache
from ray.tune.integration.ray_train import TuneReportCallback

from sarjepa_dist import storage
from sarjepa_dist.cluster import SECRET_ENV_VARS
from sarjepa_dist.config import Config, config_from_dict
from sarjepa_dist.train.entry import train_loop_per_worker
from sarjepa_dist.train.loop import StepHook
from sarjepa_dist.train.runner import prepare_run, run_pretrain
from sarjepa_dist.tune.space import apply_point, point_of

# Ray Tune also copies this one (an older name of the session token) into every trial's runtime_env.
_TUNE_SECRET_ENV_VARS = frozenset(SECRET_ENV_VARS) | {"AWS_SECURITY_TOKEN"}


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trial_config(base_tree: dict[str, Any], point: dict[str, Any], run_name: str) -> Config:
    tree = apply_point(base_tree, point)
    tree.setdefault("train", {})["name"] = run_name
    return config_from_dict(tree)


def in_trial_process(cfg: Config) -> bool:
    """Whether a trial of this sweep runs its training loop in the trial's own process."""
    executor = cfg.tune.trial_executor
    return executor == "trial-process" or (executor == "auto" and cfg.train.num_workers == 1)


def trial_folder(cfg: Config, trial_id: str) -> str:
    """Tune's folder of one trial (``sweep._trial_dirname`` names it by the trial id)."""
    return storage.join(cfg.tune.storage_path, cfg.tune.name, trial_id)


def trial_run_uri(cfg: Config, trial_id: str) -> str:
    """Where a trial's checkpoints and TensorBoard events are."""
    if in_trial_process(cfg):
        return trial_folder(cfg, trial_id)
    return storage.join(cfg.train.storage_path, trial_run_name(cfg.tune.name, trial_id))


def run_trial(point: dict[str, Any], sweep_name: str, base: dict[str, Any],
              step_hooks: Sequence[StepHook] = ()) -> None:
    """Tune's trainable (bound with ``tune.with_parameters``): ``point`` is the trial's config."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, point_of(point), trial_run_name(sweep_name, trial_id))
    if not in_trial_process(cfg):
        run_pretrain(cfg, callbacks=[TuneReportCallback()], step_hooks=step_hooks)
        return
    run = prepare_run(cfg, step_hooks, run_uri_override=trial_folder(cfg, trial_id))
    device = torch.device("cuda") if cfg.train.use_gpu else torch.device("cpu")
    train_loop_per_worker(run.loop_config(), session=TrialSession(run.dataset, device))


class TrialSession:
    """The training loop's host in a trial's own process: one rank; checkpoints kept by Tune."""

    rank = 0
    world_size = 1

    def __init__(self, dataset: Any, device: torch.device):
        self._dataset = dataset
        self.device = device

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def restored_checkpoint(self) -> tune.Checkpoint | None:
        return tune.get_checkpoint()

    def first_dataset(self) -> Any:
        return self._dataset.iterator()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None,
               checkpoint_id: str | None = None) -> None:
        # Tune names the folder checkpoint_<n>; the checkpoint's meta.json keeps checkpoint_id.
        checkpoint = None if checkpoint_dir is None else tune.Checkpoint.from_directory(checkpoint_dir)
        tune.report(metrics, checkpoint=checkpoint)


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
