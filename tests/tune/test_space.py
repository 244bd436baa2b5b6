"""Search spaces (parsing, Tune samplers, validation before any trial) and the checks a sweep makes
before Ray starts."""

from __future__ import annotations

import pytest

from sarjepa_dist.config import ConfigError, config_from_dict
from sarjepa_dist.tune.space import (GRID_POINT, apply_point, check_search_alg, check_space, param_space, point_of,
                                    sweep_axes)


def _cfg(**tune):
    return config_from_dict({"probe": {"every": 5}, "tune": tune})


def test_axes_come_from_search_and_the_older_grid_and_map_onto_tune_samplers():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = _cfg(grid={"mask.target_scale": [[0.1, 0.15], [0.15, 0.2]]},
               search={"optim.lr": {"loguniform": [1e-4, 3e-3]}, "mask.num_target_blocks": {"randint": [2, 5]},
                       "optim.ema[0]": {"uniform": [0.99, 0.999]}, "optim.weight_decay": [0.02, 0.05]})
    axes = sweep_axes(cfg.tune)
    assert [a.key for a in axes] == ["mask.num_target_blocks", "mask.target_scale", "optim.ema[0]",
                                     "optim.lr", "optim.weight_decay"]
    space = param_space(axes)
    assert space["mask.target_scale"] == {"grid_search": [[0.1, 0.15], [0.15, 0.2]]}
    assert space["optim.weight_decay"] == {"grid_search": [0.02, 0.05]}
    assert isinstance(space["optim.lr"], Float) and isinstance(space["mask.num_target_blocks"], Integer)
    assert space["mask.num_target_blocks"].lower == 2 and space["mask.num_target_blocks"].upper == 5
    assert not isinstance(space["optim.ema[0]"], Categorical)
    check_space(axes, cfg)  # every edge of this space is a valid config


def test_a_shuffled_grid_walks_every_point_once_in_a_seeded_order():
    cfg = _cfg(search={"mask.target_scale": {"grid": [[0.1, 0.15], [0.2, 0.3]]},
                       "optim.lr": {"grid": [1e-3, 3e-3, 1e-2]}})
    axes = sweep_axes(cfg.tune)
    nested = [{"mask.target_scale": s, "optim.lr": lr} for lr in (1e-3, 3e-3, 1e-2)
              for s in ([0.1, 0.15], [0.2, 0.3])]
    orders = {seed: param_space(axes, shuffle_seed=seed, shuffle=True)[GRID_POINT]["grid_search"] for seed in range(6)}
    for points in orders.values():
        assert sorted(map(repr, points)) == sorted(map(repr, nested)), "every grid point exactly once"
    assert orders[0] == param_space(axes, shuffle_seed=0, shuffle=True)[GRID_POINT]["grid_search"], "seeded"
    assert len({repr(p) for p in orders.values()}) > 1, "the seed changes the order"
    # the trial's point reads back the same whichever form Tune handed it
    assert point_of({GRID_POINT: nested[3]}) == nested[3] == point_of(nested[3])
    # a space with a sampled axis keeps one Tune sampler per axis
    mixed = sweep_axes(_cfg(search={"optim.lr": {"grid": [1e-3, 3e-3]}, "optim.ema[0]": {"uniform": [0.99, 0.999]}}).tune)
    assert GRID_POINT not in param_space(mixed, shuffle_seed=0, shuffle=True)


def test_a_pair_element_key_sets_one_element():
    tree = config_from_dict({}).to_dict()
    out = apply_point(tree, {"optim.ema[0]": 0.95, "optim.lr": 2e-3})
    assert out["optim"]["ema"] == [0.95, 1.0] and out["optim"]["lr"] == 2e-3
    assert tree["optim"]["ema"] != [0.95, 1.0], "the base tree is left alone"
    with pytest.raises(ConfigError, match=r"optim.lr\[1\].*not a list"):
        apply_point(tree, {"optim.lr[1]": 1.0})


@pytest.mark.parametrize("search, message", [
    ({"optim.ema[0]": {"uniform": [0.99, 1.2]}}, r"tune.search.optim.ema\[0\]: the value 1.2 is invalid"),
    ({"optim.lr": {"loguniform": [1e-4, 20.0]}}, r"tune.search.optim.lr: the value 20.0 is invalid: optim.lr"),
    ({"mask.target_scale": {"choice": [[0.1, 0.15], [0.3, 0.2]]}},
     r"tune.search.mask.target_scale: the value \[0.3, 0.2\] is invalid: .*low > high"),
    ({"mask.bogus": {"choice": [1, 2]}}, r"tune.search.mask.bogus: .*unknown config key 'mask.bogus'"),
    ({"mask.num_target_blocks": {"randint": [0, 3]}}, r"tune.search.mask.num_target_blocks: the value 0"),
    ({"mask.target_scale[0]": {"uniform": [0.05, 0.18]}, "mask.target_scale[1]": {"uniform": [0.16, 0.3]}},
     r"the sweep point .*'mask.target_scale\[0\]': 0.18, 'mask.target_scale\[1\]': 0.16.* low > high"),
    ({"train.storage_path": ["a", "b"]}, r"tune.search.train.storage_path: a sweep cannot vary"),
])
def test_an_invalid_point_is_refused_before_any_trial_naming_the_key(search, message):
    cfg = _cfg(search=search)
    with pytest.raises(ConfigError, match=message):
        check_space(sweep_axes(cfg.tune), cfg)


@pytest.mark.parametrize("tune, message", [
    ({"search": {"optim.lr": {"lognormal": [1, 2]}}}, r"tune.search.optim.lr sampler = 'lognormal' is not allowed"),
    ({"search": {"optim.lr": {"uniform": [1e-3]}}}, r"tune.search.optim.lr.uniform = \[0.001\] takes 2 numbers"),
    ({"search": {"optim.lr": {"uniform": [3e-3, 1e-3]}}}, r"needs low < high"),
    ({"search": {"optim.lr": {"loguniform": [0.0, 1e-3]}}}, r"tune.search.optim.lr.loguniform\[0\] = 0.0"),
    ({"search": {"mask.num_target_blocks": {"randint": [1.5, 4]}}}, r"must be integers"),
    ({"search": {"optim.lr": {"choice": []}}}, r"tune.search.optim.lr.choice = \[\] must be a non-empty list"),
    ({"metric": "loss"}, r"tune.metric = 'loss': a sweep stops and ranks trials by the online probe"),
    ({"grid": {"optim.lr": [1e-3]}, "search": {"optim.lr": [2e-3]}}, r"optim.lr is both in tune.grid and tune.search"),
    ({"reduction_factor": 1.0}, r"tune.reduction_factor"),
])
def test_a_malformed_search_config_is_refused_naming_the_key(tune, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**tune)


def test_optuna_takes_no_grid_and_no_pair_choices():
    cfg = _cfg(search_alg="optuna", search={"optim.lr": [1e-3, 2e-3]})
    with pytest.raises(ConfigError, match=r"tune.search.optim.lr: tune.search_alg = optuna has no grid axes"):
        check_search_alg(sweep_axes(cfg.tune), cfg.tune)
    cfg = _cfg(search_alg="optuna", search={"mask.target_scale": {"choice": [[0.1, 0.15], [0.15, 0.2]]}})
    with pytest.raises(ConfigError, match=r"mask.target_scale\[0\] and mask.target_scale\[1\]"):
        check_search_alg(sweep_axes(cfg.tune), cfg.tune)
    cfg = _cfg(search_alg="optuna", search={"optim.lr": {"loguniform": [1e-4, 1e-3]}})
    check_search_alg(sweep_axes(cfg.tune), cfg.tune)


def test_the_sweep_needs_the_probe_it_stops_and_ranks_by():
    from sarjepa_dist.tune import check_sweep

    base = {"data": {"path": "x"}, "tune": {"search": {"optim.lr": [1e-3]}}}
    with pytest.raises(ConfigError, match="probe.every = 0: a sweep stops and ranks trials by the online probe"):
        check_sweep(config_from_dict(base))
    with pytest.raises(ConfigError, match=r"tune.metric = 'probe_linear' is not reported: probe.methods = \['knn'\]"):
        check_sweep(config_from_dict({**base, "probe": {"every": 5}, "tune": {**base["tune"], "metric": "probe_linear"}}))
    with pytest.raises(ConfigError, match=r"tune.grace_period = 50 .* exceeds train.steps = 20"):
        check_sweep(config_from_dict({**base, "probe": {"every": 50}, "train": {"steps": 20}}))
    with pytest.raises(ConfigError, match="the sweep has no axes"):
        check_sweep(config_from_dict({"data": {"path": "x"}, "probe": {"every": 5}}))


def test_optuna_tpe_samples_the_space_within_its_bounds():
    pytest.importorskip("optuna")
    from sarjepa_dist.tune.sweep import _search_alg

    cfg = _cfg(search_alg="optuna", seed=3,
               search={"optim.lr": {"loguniform": [1e-4, 1e-3]}, "optim.ema[0]": {"uniform": [0.99, 0.999]},
                       "mask.num_target_blocks": {"randint": [2, 5]}, "data.conditioning": {"choice": ["log", "db"]}})
    searcher = _search_alg(cfg)
    assert searcher.set_search_properties(cfg.tune.metric, cfg.tune.mode, param_space(sweep_axes(cfg.tune)))
    for i in range(4):
        point = searcher.suggest(f"t{i}")
        assert 1e-4 <= point["optim.lr"] <= 1e-3 and 0.99 <= point["optim.ema[0]"] <= 0.999
        assert point["mask.num_target_blocks"] in (2, 3, 4) and point["data.conditioning"] in ("log", "db")


@pytest.mark.parametrize("tune, shuffled", [
    ({}, True),  # ASHA, shuffled by default
    ({"grid_order": "as-written"}, False),
    ({"scheduler": "none"}, False),  # every trial runs to the end: order cannot matter
])
def test_the_sweep_shuffles_a_grid_only_where_asha_would_see_its_order(tune, shuffled):
    from sarjepa_dist.tune.sweep import sweep_param_space

    cfg = _cfg(search={"train.seed": {"grid": [0, 1, 2, 3, 4, 5]}}, **tune)
    space = sweep_param_space(cfg, sweep_axes(cfg.tune))
    assert (GRID_POINT in space) is shuffled
    if shuffled:
        order = [p["train.seed"] for p in space[GRID_POINT]["grid_search"]]
        assert sorted(order) == [0, 1, 2, 3, 4, 5] and order != [0, 1, 2, 3, 4, 5]
        unseeded = _cfg(search={"train.seed": {"grid": [0, 1, 2, 3, 4, 5]}}, seed=None, **tune)
        assert sweep_param_space(unseeded, sweep_axes(unseeded.tune)) == sweep_param_space(
            unseeded, sweep_axes(unseeded.tune)), "a relaunch without tune.seed sees the same order"


def test_an_unknown_grid_order_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="tune.grid_order"):
        _cfg(grid_order="sorted")
