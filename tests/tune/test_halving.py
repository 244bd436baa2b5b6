"""Synchronous successive halving (``tune.scheduler: hyperband``): rungs in steps, the settings it
refuses, and a real 4-trial sweep on a local Ray cluster whose trials pause at rungs and resume
from their checkpoints."""

from __future__ import annotations

import pytest

from sarjepa_dist.config import ConfigError, config_from_dict
from sarjepa_dist.tune.halving import check_halving, halving_depth, rung_steps


def test_the_first_bracket_holds_reduction_factor_to_the_depth_trials():
    assert halving_depth(16, 4) == 2  # 16 trials: 16 -> 4 -> 1
    assert halving_depth(8, 2) == 3
    assert halving_depth(4, 2) == 2
    assert halving_depth(10, 2) == 3  # 8 in the first bracket, 2 in the next
    assert halving_depth(3, 4) == 1  # never fewer than one halving


def test_rungs_are_judged_at_the_first_probe_at_or_after_them():
    # 16 trials, η 4, 600 steps: rungs at 37.5, 150, 600 steps, probes every 100
    assert rung_steps(600, 4, 2, 100)[0] == [100, 200, 600]
    assert rung_steps(600, 4, 2, 100)[1:] == [[200, 600], [600]]  # Tune's later, less aggressive brackets
    assert rung_steps(24, 2, 2, 6)[0] == [6, 12, 24]


@pytest.mark.parametrize("kwargs, message", [
    ({"reduction_factor": 2.5}, r"tune.reduction_factor = 2.5: .* give an integer >= 2"),
    ({"trials": 1}, r"hyperband with 1 trial: there is nothing to halve"),
    ({"probe_every": 200}, r"rungs at steps \[200, 200, 600\] .* two of them fall on the same probe; lower probe.every"),
])
def test_settings_that_cannot_halve_are_refused_naming_the_key(kwargs, message):
    args = {"trials": 16, "total_steps": 600, "reduction_factor": 4, "probe_every": 100, **kwargs}
    with pytest.raises(ConfigError, match=message):
        check_halving(**args)


def test_a_hyperband_sweep_needs_a_checkpoint_at_every_probe():
    from sarjepa_dist.tune import check_sweep

    tree = {"data": {"path": "x"}, "probe": {"every": 50}, "train": {"steps": 400, "checkpoint_every": 40},
            "tune": {"scheduler": "hyperband", "search": {"train.seed": [0, 1, 2, 3]}}}
    with pytest.raises(ConfigError, match="train.checkpoint_every = 40 must divide probe.every = 50"):
        check_sweep(config_from_dict(tree))
    tree["train"]["checkpoint_every"] = 25
    check_sweep(config_from_dict(tree))


@pytest.mark.slow
@pytest.mark.ray
def test_hyperband_halves_synchronously_and_resumes_the_best_from_their_checkpoints(tmp_path):
    """Scripted probe 0.9 - 0.1·seed, 4 trials, η 2, two at a time: seeds 2 and 3 stop at the first
    rung, seed 1 at the second, seed 0 runs to the end; every rung is judged on all four (or two)
    trials, and a trial that goes on continues from its checkpoint at the rung. The sweep starts
    its own local cluster (with the State API a paused trial's CPUs are freed through)."""
    from sarjepa_dist.train.export import find_checkpoint
    from sarjepa_dist.train.history import read_history
    from sarjepa_dist.tune import run_sweep

    from _tune_helpers import ScriptedProbe, tiny_sweep_config, write_labelled_chips

    data = write_labelled_chips(str(tmp_path / "chips"))
    runs = str(tmp_path / "runs")
    steps = 24
    cfg = tiny_sweep_config(data, runs, "halving",
                            train={"steps": steps, "checkpoint_every": 6},
                            probe={"every": 6},
                            tune={"search": {"train.seed": {"grid": [0, 1, 2, 3]}}, "scheduler": "hyperband",
                                  "max_concurrent_trials": 2})
    result = run_sweep(cfg, step_hooks=[ScriptedProbe()])

    by_seed = {r["params"]["train.seed"]: r for r in result.rows}
    assert by_seed[0]["stopped"] == "completed" and by_seed[0]["steps"] == steps
    for seed in (1, 2, 3):
        assert by_seed[seed]["stopped"] == "stopped at a rung by hyperband", by_seed[seed]
    # synchronous: the losers of the first rung were judged there, before anyone went past it
    assert by_seed[2]["steps"] < 12 and by_seed[3]["steps"] < 12
    assert 12 <= by_seed[1]["steps"] < steps
    assert result.best is by_seed[0]
    history = read_history(find_checkpoint(by_seed[0]["run"]).uri)
    resumed = sorted({row["resumed_from_step"] for row in history if row.get("resumed_from_step", -1) > 0})
    assert resumed and all(r % 6 == 0 for r in resumed), \
        f"the winner resumed from rung checkpoints: {resumed}"

    # relaunching it would restart every paused trial at once: refused, naming the key
    with pytest.raises(ConfigError, match="tune.name = 'halving': .* a hyperband sweep cannot be resumed"):
        run_sweep(cfg)


@pytest.mark.ray
def test_hyperband_on_a_cluster_without_the_state_api_is_refused_before_any_trial(ray_local, tmp_path):
    """``ray_local`` has no dashboard: a paused trial's placement group would never be freed."""
    from sarjepa_dist.tune import run_sweep

    from _tune_helpers import tiny_sweep_config, write_labelled_chips

    data = write_labelled_chips(str(tmp_path / "chips"), per_class=8)
    cfg = tiny_sweep_config(data, str(tmp_path / "runs"), "no-state-api", train={"steps": 24, "checkpoint_every": 6},
                            probe={"every": 6}, tune={"search": {"train.seed": [0, 1]}, "scheduler": "hyperband"})
    with pytest.raises(ConfigError, match="tune.scheduler = hyperband pauses trials.*include-dashboard"):
        run_sweep(cfg)
    assert not (tmp_path / "runs" / "no-state-api").exists(), "no trial started"


def test_no_trial_is_created_while_the_running_limit_is_full(tmp_path):
    """The searcher side of the limit: pending and running trials count, paused ones do not."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from sarjepa_dist.tune.halving import ActiveTrials, GatedVariants

    active = ActiveTrials(limit=2, total=4)
    statuses = [Trial.RUNNING, Trial.PENDING, Trial.PAUSED]
    active.watch(SimpleNamespace(get_trials=lambda: [SimpleNamespace(status=s) for s in statuses]))
    from ray import tune
    from ray.tune.experiment import Experiment

    gen = GatedVariants(active)
    gen.add_configurations(Experiment("gate", lambda config: None, config={"a": tune.grid_search([1, 2])},
                                      storage_path=str(tmp_path)))
    assert active.full() and gen.next_trial() is None
    statuses[1] = Trial.PAUSED
    assert not active.full() and gen.next_trial() is not None
    # Tune pickles its searcher and scheduler with the experiment: the controller stays out
    import pickle

    assert pickle.loads(pickle.dumps(active))._controller is None


def test_optuna_under_hyperband_is_gated_by_the_same_limit():
    from sarjepa_dist.tune.halving import ActiveTrials, GatedSearch
    from sarjepa_dist.tune.sweep import _search_alg

    pytest.importorskip("optuna")
    cfg = config_from_dict({"tune": {"search_alg": "optuna", "scheduler": "hyperband",
                                     "search": {"optim.lr": {"loguniform": [1e-4, 1e-3]}}}})
    active = ActiveTrials(limit=1, total=4)
    alg = _search_alg(cfg, active)
    assert isinstance(alg, GatedSearch) and alg.active is active
