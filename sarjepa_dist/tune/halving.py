"""Synchronous successive halving for sweeps: Ray Tune's ``HyperBandScheduler``, fitted to trials
that report the online probe every ``probe.every`` steps and run at most ``tune.max_concurrent_trials``
at a time.

Every trial of a bracket reaches a rung before any goes on; then the best ``1/reduction_factor``
resume from the checkpoint at that rung and the rest stop. Asynchronous ASHA instead lets a trial
pass a rung against the few trials that reached it before, so early trials pass more often.

Three adaptations of Tune's scheduler, each kept here:

- **Rungs in steps, halving first.** HyperBand's most aggressive bracket holds ``η^s`` trials when
  ``max_t`` is ``η^s`` time units (Tune sizes brackets as ``ceil((s_max+1)/(s+1) · η^s)``), so a
  sweep of ``N`` trials gets ``s = floor(log_η N)`` and a unit of ``train.steps / η^s`` steps:
  rungs at ``train.steps · η^-s, …, train.steps``. Trials report ``step``; the scheduler reads it
  in units. Tune fills a band's brackets least aggressive first (the first trials would all run
  to the end); here the halving bracket comes first.
- **Only probe results count.** Between probes a trial's reports carry no probe figure; they are
  passed over, so a rung is judged on the probe at or just after it.
- **Running trials, not live ones, are limited.** A searcher's concurrency limit counts paused
  trials, so with pauses it would never create the rest of a bracket. Here the searcher creates a
  trial, and the scheduler resumes a paused one, only while fewer than the limit are pending or
  running; and a bracket is halved only once all its trials (or all the sweep's) have arrived.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers import HyperBandScheduler, TrialScheduler
from ray.tune.search import SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator

from sarjepa_dist.config import ConfigError

UNITS = "halving_units"  # the result key the scheduler reads: step / steps per unit
_ACTIVE = (Trial.PENDING, Trial.RUNNING)


def halving_depth(trials: int, reduction_factor: int) -> int:
    """``s``: the number of halvings of the first bracket (it holds ``η^s`` of the ``trials``)."""
    return max(1, int(math.floor(math.log(max(trials, 1)) / math.log(reduction_factor) + 1e-9)))


def rung_steps(total_steps: int, reduction_factor: int, depth: int, probe_every: int) -> list[list[int]]:
    """Per bracket (``s = depth … 0``), the steps at which its rungs are judged: the first probe at
    or after ``total_steps · η^(i-s)`` (the last rung is the end of training)."""
    unit = total_steps / reduction_factor ** depth
    brackets = []
    for s in range(depth, -1, -1):
        r0 = int(reduction_factor ** depth * reduction_factor ** -s)  # Tune's r0, in units
        rungs = [min(r0 * reduction_factor ** i, reduction_factor ** depth) * unit for i in range(s + 1)]
        brackets.append([min(math.ceil(r / probe_every - 1e-9) * probe_every, total_steps) for r in rungs])
    return brackets


def check_halving(trials: int, total_steps: int, reduction_factor: float, probe_every: int) -> None:
    """Refuse settings under which the halving could not be synchronous (named keys to change)."""
    if reduction_factor != int(reduction_factor) or reduction_factor < 2:
        raise ConfigError(f"tune.reduction_factor = {reduction_factor}: tune.scheduler hyperband keeps "
                          f"the best 1/reduction_factor of a bracket; give an integer >= 2")
    if trials < 2:
        raise ConfigError(f"tune.scheduler = hyperband with {trials} trial: there is nothing to halve; "
                          f"raise tune.num_samples or add search axes, or use tune.scheduler: none")
    eta = int(reduction_factor)
    for rungs in rung_steps(total_steps, eta, halving_depth(trials, eta), probe_every):
        if any(b <= a for a, b in zip(rungs, rungs[1:])):
            raise ConfigError(
                f"tune.scheduler = hyperband: rungs at steps {rungs} (train.steps = {total_steps}, "
                f"reduction_factor = {eta}, {trials} trials) are judged on the probe every {probe_every} "
                f"steps, and two of them fall on the same probe; lower probe.every or raise train.steps")


def require_state_api(timeout_s: float = 15.0) -> None:
    """A paused trial's Ray Train run is killed with its trial; its placement group (the CPUs it
    held) is freed by Ray Train's placement-group cleaner, which polls Ray's State API (served by
    the dashboard). Without it the resumed trials would wait forever for those CPUs."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=timeout_s, raise_on_missing_output=False)
    except Exception as exc:
        raise ConfigError(
            "tune.scheduler = hyperband pauses trials, and Ray Train frees a paused trial's CPUs through "
            f"Ray's State API, which this cluster does not serve ({type(exc).__name__}); start the "
            "cluster with its dashboard (ray start --head --include-dashboard=true; a cluster sarjepa "
            "starts has it) or use tune.scheduler: asha") from None


class ActiveTrials:
    """How many of the sweep's trials are pending or running, shared by the scheduler (which sees
    Tune's controller) and the searcher (which creates trials)."""

    def __init__(self, limit: int, total: int):
        self.limit, self.total = limit, total
        self.added = 0
        self._controller: Any = None

    def watch(self, controller: Any) -> None:
        self._controller = controller

    def full(self) -> bool:
        if self._controller is None:
            return False
        return sum(t.status in _ACTIVE for t in self._controller.get_trials()) >= self.limit

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its scheduler and searcher: not the controller
        return {"limit": self.limit, "total": self.total, "added": self.added, "_controller": None}


class SyncHalving(HyperBandScheduler):
    """``HyperBandScheduler`` on the online probe, rungs in steps, running trials limited."""

    def __init__(self, *, total_steps: int, reduction_factor: int, active: ActiveTrials):
        depth = halving_depth(active.total, reduction_factor)
        super().__init__(time_attr=UNITS, max_t=reduction_factor ** depth, reduction_factor=reduction_factor,
                         stop_last_trials=True)
        self.steps_per_unit = total_steps / reduction_factor ** depth
        self.active = active

    def _create_bracket(self, s: int) -> Any:
        # Tune creates a band's brackets from s = 0 (every trial straight to max_t) upwards; a sweep
        # wants the halving bracket first, so its first η^depth trials are halved.
        return super()._create_bracket(self._s_max_1 - 1 - s)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self.active.watch(tune_controller)
        self.active.added += 1
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        self.active.watch(tune_controller)
        if result.get(self._metric) is None or result.get("step") is None:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial,
                                       {**result, UNITS: result["step"] / self.steps_per_unit})

    def _process_bracket(self, tune_controller: Any, bracket: Any) -> str:
        # Tune halves a bracket once its trials so far reach the rung; with trials created a few at
        # a time that would halve the first few alone. Wait for the bracket's last trial.
        if not bracket.filled() and self.active.added < self.active.total:
            return TrialScheduler.PAUSE
        return super()._process_bracket(tune_controller, bracket)

    def choose_trial_to_run(self, tune_controller: Any) -> Optional[Trial]:
        self.active.watch(tune_controller)
        if self.active.full():
            return None
        return super().choose_trial_to_run(tune_controller)


class _CreateWhileRoom:
    """Mixin for a search algorithm: no new trial while ``active`` is full."""

    active: ActiveTrials

    def next_trial(self) -> Any:
        if self.active.full():
            return None
        return super().next_trial()  # type: ignore[misc]


class GatedVariants(_CreateWhileRoom, BasicVariantGenerator):
    def __init__(self, active: ActiveTrials, **kwargs: Any):
        super().__init__(**kwargs)
        self.active = active


class GatedSearch(_CreateWhileRoom, SearchGenerator):
    def __init__(self, searcher: Any, active: ActiveTrials):
        super().__init__(searcher)
        self.active = active
