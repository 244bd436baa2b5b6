"""The trial driver's pieces that need no cluster: run names, configs, and credentials kept out of
the trial actors' runtime_env."""

from __future__ import annotations

from sarjepa_dist.config import config_from_dict
from sarjepa_dist.tune.trial import trial_config, trial_run_name, tune_withholds_credentials


def test_trial_config_applies_the_point_and_names_the_run():
    base = config_from_dict({}).to_dict()
    cfg = trial_config(base, {"optim.ema[0]": 0.99, "mask.num_target_blocks": 3}, trial_run_name("s", "ab12_00001"))
    assert cfg.optim.ema == (0.99, 1.0) and cfg.mask.num_target_blocks == 3
    assert cfg.train.name == "s-ab12_00001"


def test_tune_does_not_copy_credentials_into_trial_actors(monkeypatch):
    from ray.tune.execution import class_cache

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.setenv(key, f"secret-{key}")

    class Trainable:
        pass

    class Other:
        pass

    with tune_withholds_credentials():
        env = class_cache._ActorClassCache().get(Trainable)._default_options["runtime_env"]["env_vars"]
    assert not [k for k in env if k.startswith("AWS_")], env
    # outside the sweep Tune's own behaviour is back (it would copy them)
    env = class_cache._ActorClassCache().get(Other)._default_options["runtime_env"]["env_vars"]
    assert env.get("AWS_SECRET_ACCESS_KEY") == "secret-AWS_SECRET_ACCESS_KEY"


def test_a_one_worker_trial_trains_in_the_trial_process_and_keeps_its_checkpoints_in_its_tune_folder():
    from sarjepa_dist.tune.trial import in_trial_process, trial_run_uri

    one = config_from_dict({"tune": {"name": "s", "storage_path": "/sweeps"},
                            "train": {"storage_path": "/runs"}})
    assert in_trial_process(one)
    assert trial_run_uri(one, "ab12_00001") == "/sweeps/s/ab12_00001"
    two = config_from_dict({"tune": {"name": "s", "storage_path": "/sweeps"},
                            "train": {"storage_path": "/runs", "num_workers": 2}})
    assert not in_trial_process(two)
    assert trial_run_uri(two, "ab12_00001") == "/runs/s-ab12_00001"
    forced = config_from_dict({"tune": {"trial_executor": "torch-trainer"}})
    assert not in_trial_process(forced)


def test_a_trial_process_executor_with_several_workers_is_refused_naming_the_keys(tmp_path):
    import pytest

    from sarjepa_dist.config import ConfigError
    from sarjepa_dist.tune.sweep import check_sweep

    cfg = config_from_dict({"data": {"path": str(tmp_path)}, "probe": {"every": 4},
                            "train": {"num_workers": 2},
                            "tune": {"trial_executor": "trial-process", "search": {"train.seed": {"grid": [0, 1]}}}})
    with pytest.raises(ConfigError, match="tune.trial_executor = trial-process .* train.num_workers = 2"):
        check_sweep(cfg)
    with pytest.raises(ConfigError, match="tune.trial_executor"):
        config_from_dict({"tune": {"trial_executor": "threads"}})
