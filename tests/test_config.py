"""Typed config: YAML loading, --set overrides, and errors that name the key and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from sarjepa_dist.config import (
    AugmentConfig, Config, ConfigError, config_from_dict, load_config, parse_override, to_plain,
)


def test_defaults_validate_and_round_trip():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.augment == AugmentConfig()
    tree = cfg.to_dict()
    assert tree["data"]["augment"]["crop_scale"] == [0.6, 1.0]  # tuples become YAML/JSON lists
    assert config_from_dict(tree) == cfg


@pytest.mark.parametrize("text, key, value", [
    ("data.img_size=128", "data.img_size", 128),
    ("optim.lr=1e-3", "optim.lr", 1e-3),  # YAML 1.1 would read this as a string
    ("optim.lr=2.5E-4", "optim.lr", 2.5e-4),
    ("optim.betas=[0.9, 0.999]", "optim.betas", [0.9, 0.999]),
    ("fewshot.shots=[1,5,10]", "fewshot.shots", [1, 5, 10]),
    ("ray.address=null", "ray.address", None),
    ("ray.address=~", "ray.address", None),
    ("train.use_gpu=true", "train.use_gpu", True),
    ("train.name=run-a=b", "train.name", "run-a=b"),  # only the first '=' splits
    ("data.path=", "data.path", ""),
])
def test_parse_override(text, key, value):
    assert parse_override(text) == (key, value)


def test_set_overrides_apply_with_types():
    cfg = load_config(overrides=[
        "data.img_size=128", "optim.lr=1e-3", "optim.betas=[0.9, 0.999]", "fewshot.shots=[1, 5]",
        "ray.address=null", "ray.num_cpus=4", "data.augment.flips=false", "data.augment.crop_scale=[0.5, 1]",
        "gradient.radii=[3, 5]", "tune.grid={mask.target_scale: [[0.1, 0.15]]}",
    ])
    assert cfg.data.img_size == 128 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.betas == (0.9, 0.999) and isinstance(cfg.optim.betas, tuple)
    assert cfg.fewshot.shots == [1, 5] and cfg.ray.address is None and cfg.ray.num_cpus == 4
    assert cfg.data.augment.flips is False and cfg.data.augment.crop_scale == (0.5, 1.0)
    assert cfg.data.augment.rot90 is False and cfg.data.augment.vertical_flips is False  # untouched siblings keep defaults
    assert cfg.gradient.radii == (3, 5)
    assert cfg.tune.grid == {"mask.target_scale": [[0.1, 0.15]]}


def test_yaml_file_with_nested_augment_and_set_precedence(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "data:\n"
        "  img_size: 96\n"
        "  conditioning: db\n"
        "  augment:\n"
        "    rot90: true\n"
        "    crop_scale: [0.3, 0.9]\n"
        "model:\n"
        "  patch_size: 16\n"
        "optim:\n"
        "  lr: 5e-4\n"
        "  ema: [0.99, 1.0]\n"
    )
    cfg = load_config(path, overrides=["data.img_size=128"])
    assert cfg.data.img_size == 128  # --set beats the file
    assert cfg.data.conditioning == "db" and cfg.model.patch_size == 16
    assert cfg.data.augment.rot90 is True and cfg.data.augment.flips is True
    assert cfg.data.augment.crop_scale == (0.3, 0.9)
    assert cfg.optim.lr == pytest.approx(5e-4) and cfg.optim.ema == (0.99, 1.0)
    base = {"train": {"steps": 7}, "data": {"img_size": 64}}
    cfg2 = load_config(path, base=base)
    assert cfg2.train.steps == 7 and cfg2.data.img_size == 96  # file beats base


@pytest.mark.parametrize("overrides, match", [
    (["data.img_sise=64"], r"unknown config key 'data.img_sise'; known keys here: \[.*'img_size'"),
    (["dta.img_size=64"], r"unknown config key 'dta'"),
    (["data.augment.flip=false"], r"unknown config key 'data.augment.flip'.*'flips'"),
])
def test_unknown_keys_are_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


@pytest.mark.parametrize("override, match", [
    ("data.img_size=4", r"data.img_size = 4 is out of range; allowed: \[8, 4096\]"),
    ("data.max_bad_fraction=1.5", r"data.max_bad_fraction = 1.5 is out of range; allowed: \[0, 1\]"),
    ("optim.lr=0", r"optim.lr = 0.0 is out of range; allowed: \(0, 10\]"),
    ("model.drop_path=1.0", r"model.drop_path = 1.0 is out of range; allowed: \[0, 1\)"),
    ("data.augment.crop_scale=[0.01, 1]",
     r"data.augment.crop_scale\[0\] = 0.01 is out of range; allowed: \[0.05, 1\]"),
    ("data.augment.crop_scale=[0.9, 0.5]", r"data.augment.crop_scale = \[0.9, 0.5\] has low > high"),
    ("data.augment.crop_scale=[0.5]", r"data.augment.crop_scale = \[0.5\] must have 2 items"),
    ("mask.target_scale=[0.3, 0.2]", r"mask.target_scale = \[0.3, 0.2\] has low > high"),
    ("data.conditioning=linear",
     r"data.conditioning = 'linear' is not allowed; choose one of \['amplitude', 'log', 'db'\]"),
    ("data.img_size=big", r"data.img_size = 'big' must be an integer"),
    ("optim.lr=fast", r"optim.lr = 'fast' must be a number"),
    ("train.use_gpu=1", r"train.use_gpu = 1 must be true or false"),
    ("gradient.radii=[]", r"gradient.radii is empty"),
    ("gradient.radii=[5, 100]", r"gradient.radii\[1\] = 100 is out of range; allowed: \[1, 64\]"),
    ("data.augment=3", r"data.augment must be a mapping of fields"),
    ("model.patch_size=12", r"model.patch_size = 12 is not allowed"),
    ("data.img_size=100", r"data.img_size = 100 must be a multiple of model.patch_size = 8"),
    ("fewshot.split_column=depression_deg", r"fewshot.split_column = 'depression_deg' needs both"),
    ("fewshot.train_values=[17]", r"fewshot.train_values/test_values need fewshot.split_column"),
    ("storage.endpoint_url=localhost:9000", r"storage.endpoint_url = 'localhost:9000' needs a scheme"),
])
def test_invalid_values_name_key_and_allowed(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("data.img_size")
    with pytest.raises(ConfigError, match="has no key"):
        parse_override("=3")
    with pytest.raises(ConfigError, match="cannot parse value"):
        parse_override("data.path=[unclosed")
    with pytest.raises(ConfigError, match=r"data.img_size = \{'x': 1\} must be an integer"):
        load_config(overrides=["data.img_size=64", "data.img_size.x=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config()


def test_to_plain_handles_nested_containers():
    assert to_plain({"a": (1, 2), "b": [AugmentConfig()]}) == {
        "a": [1, 2], "b": [{"flips": True, "vertical_flips": False, "rot90": False, "crop_scale": [0.6, 1.0]}]}


def test_predictor_context_defaults_to_shared():
    # the evidence: README, "Measured" (level with per-block on MSTAR, a cheaper step)
    from sarjepa_dist.config import ModelConfig
    assert ModelConfig().predictor_context == "shared"


def test_predictor_context_choice_is_validated():
    from sarjepa_dist.config import ConfigError, ModelConfig
    ModelConfig(predictor_context="shared").validate()
    with pytest.raises(ConfigError, match="model.predictor_context"):
        ModelConfig(predictor_context="once").validate()


def test_the_mstar_cpu_job_trains_the_recipe_the_learning_curves_measured():
    """jobs/pretrain_mstar_cpu.yaml is what the README's MSTAR figures measured
    (benchmarks/learning_curves.py's base recipe): the two must not drift apart."""
    import importlib.util
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("learning_curves", repo / "benchmarks" / "learning_curves.py")
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    job = load_config(repo / "jobs" / "pretrain_mstar_cpu.yaml")
    measured = curves.variant_config(curves.VARIANTS["base"], job.train.steps)
    for section in ("model", "optim", "mask", "gradient"):
        assert getattr(job, section) == getattr(measured, section), section
    for key in ("img_size", "batch_size", "channels", "conditioning", "augment"):
        assert getattr(job.data, key) == getattr(measured.data, key), f"data.{key}"
    assert job.train.cpus_per_worker == 2 and job.probe.pooling == measured.fewshot.pooling


def test_with_absolute_paths_anchors_local_paths_to_this_directory_and_leaves_uris(tmp_path, monkeypatch):
    from sarjepa_dist.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"data": {"path": "runs/data/chips"}, "probe": {"data": "s3://bucket/probe"},
                            "train": {"storage_path": "runs"}})
    out = with_absolute_paths(cfg)
    assert out.data.path == str(tmp_path / "runs" / "data" / "chips")
    assert out.probe.data == "s3://bucket/probe" and out.train.storage_path == "runs"
    assert with_absolute_paths(cfg, ("train.storage_path",)).train.storage_path == str(tmp_path / "runs")
    assert with_absolute_paths(config_from_dict({})).probe.data is None


def test_resume_refuses_a_checkpoint_of_another_method():
    from sarjepa_dist.config import ConfigError, ModelConfig
    cfg = ModelConfig()
    cfg.check_resumes(dataclasses.asdict(cfg), where="ckpt")  # the same method: fine
    cfg.check_resumes({**dataclasses.asdict(cfg), "drop_path": 0.2}, where="ckpt")  # regularisation may change
    saved = {**dataclasses.asdict(cfg), "predictor_context": "per-block", "target_mode": "ema-pixel"}
    with pytest.raises(ConfigError) as e:
        cfg.check_resumes(saved, where="runs/x/checkpoint_4")
    msg = str(e.value)
    assert "runs/x/checkpoint_4" in msg
    assert "model.predictor_context = 'shared' here but 'per-block' in the checkpoint" in msg
    assert "--set model.predictor_context=per-block" in msg and "--set model.target_mode=ema-pixel" in msg


def test_a_checkpoint_from_before_predictor_context_existed_trained_per_block():
    from sarjepa_dist.config import ConfigError, ModelConfig
    old = {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k != "predictor_context"}
    ModelConfig(predictor_context="per-block").check_resumes(old, where="ckpt")
    with pytest.raises(ConfigError, match="model.predictor_context"):
        ModelConfig().check_resumes(old, where="ckpt")
