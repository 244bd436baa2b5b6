"""Single-worker pretraining on a local Ray cluster with local storage.

One module-scoped pair of short runs (transform placement ``data`` and ``device``) feeds the checks
on checkpoints, lineage, metrics, TensorBoard files and export; the failure-restart run is its own.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

from _train_helpers import (
    NUM_BAD, FailOnce, RecordChips, RecordEvery, assert_finite_losses, bad_chip_ids, read_json, read_records,
    tiny_config, write_chip_dataset,
)
from sarjepa_dist import storage
from sarjepa_dist.train import runner

pytestmark = [pytest.mark.ray]

PLACEMENTS = ("data", "device")
REQUIRED_METRICS = ("step", "loss", "lr", "wd", "tau", "grad_norm", "chips_per_s", "data_wait_fraction",
                    "std_target", "eff_rank_target", "std_pred", "eff_rank_pred", "bad_rows_total",
                    "bad_rows_seen", "epoch", "chips_seen")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train-data") / "chips")
    manifest = write_chip_dataset(root)
    return root, manifest


@pytest.fixture(scope="module")
def runs(train_ray, dataset, tmp_path_factory):
    """placement -> (cfg, PretrainResult) for an 8-step run of each transform placement, reading the
    chips in a fixed order (data.preserve_order) so that the two runs can be compared step by step."""
    from sarjepa_dist.train.runner import run_pretrain

    root, _ = dataset
    storage_path = str(tmp_path_factory.mktemp("train-runs"))
    out = {}
    for placement in PLACEMENTS:
        # the online probe runs in the device run only, every 4 steps (and at the last)
        probe = {"every": 4 if placement == "device" else 0, "shots": 5, "episodes": 2, "max_per_class": 20,
                 # relative, as in jobs/*.yaml: the worker loads it from another working directory
                 "data": os.path.relpath(root)}
        cfg = tiny_config(root, storage_path, f"local-{placement}",
                          data={"transform_placement": placement, "preserve_order": True}, probe=probe,
                          # keep one checkpoint in one run, two in the other: num_to_keep is honoured
                          train={"num_to_keep": 1 if placement == "data" else 2})
        os.makedirs(chip_records(cfg))
        out[placement] = (cfg, run_pretrain(cfg, step_hooks=[RecordEvery(3), RecordChips(chip_records(cfg))]))
    return out


def chip_records(cfg) -> str:
    """Where the ``runs`` fixture records a run's chip ids (``RecordChips``)."""
    return os.path.join(cfg.train.storage_path, f"chips-{cfg.train.name}")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_single_worker_run(runs, dataset, placement):
    cfg, result = runs[placement]
    _, manifest = dataset
    assert result.final_step == cfg.train.steps == 8
    assert result.dataset_id == manifest.dataset_id
    assert result.storage_path == os.path.join(cfg.train.storage_path, cfg.train.name)

    # every log_every steps one report, each with the figures the issue lists
    history = result.metrics_history
    assert [h["step"] for h in history] == [2, 4, 6, 8]
    assert_finite_losses(history)
    for h in history:
        missing = [k for k in REQUIRED_METRICS if k not in h]
        assert not missing, missing
        assert 0.0 <= h["data_wait_fraction"] <= 1.0 and h["chips_per_s"] > 0
        assert h["transform_placement"] == placement and h["resumed_from_step"] == -1
        assert 0 <= h["bad_rows_total"] <= NUM_BAD
    assert history[-1]["ranks_in_sync"] is True
    # a step hook's metrics join the next report, once: RecordEvery(3) fires after steps 3 and 6
    assert [h.get("hook_step") for h in history] == [None, 3, 6, None]
    # the runner's docstring, which operators read, names every figure the loop reports
    documented = set(re.findall(r"``([\w/<>]+)``", runner.__doc__))
    reported = {"bad_rows/<reason>" if k.startswith("bad_rows/") else k for h in history for k in h}
    assert reported - {"hook_step"} <= documented, sorted(reported - documented)
    assert result.metrics["step"] == 8  # Ray's own record of the latest checkpoint's report

    # the latest checkpoint holds weights, optimizer, loop state and lineage
    ckpt = result.latest_checkpoint_uri
    assert ckpt and os.path.isdir(ckpt)
    for name in ("model.safetensors", "optimizer.pt", "state.json", "rng.pt", "config.json", "meta.json",
                 "metrics_history.jsonl"):
        assert os.path.exists(os.path.join(ckpt, name)), name
    state = read_json(os.path.join(ckpt, "state.json"))
    assert state["step"] == 8 and state["epoch"] == 0 and state["batches_in_epoch"] == 8
    assert state["schedules"]["total_steps"] == 8
    meta = read_json(os.path.join(ckpt, "meta.json"))
    assert meta["dataset_id"] == manifest.dataset_id and meta["run_name"] == cfg.train.name
    assert meta["step"] == 8 and meta["checkpoint_id"] == os.path.basename(ckpt)
    assert read_json(os.path.join(ckpt, "config.json"))["data"]["transform_placement"] == placement

    run_dir = result.storage_path
    kept = [d for d in os.listdir(run_dir) if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, d))]
    assert len(kept) == cfg.train.num_to_keep, kept
    tb = os.listdir(os.path.join(run_dir, "tensorboard"))
    assert any(f.startswith("events.out.tfevents") for f in tb)


def test_online_probe_reports_and_lands_in_the_checkpoint(runs):
    cfg, result = runs["device"]
    history = result.metrics_history
    # probed after steps 4 and 8: those figures join the reports at steps 4 and 8, never others
    assert [h.get("probe_step") for h in history] == [None, 4, None, 8]
    for h in (history[1], history[3]):
        assert 0.0 <= h["probe_knn"] <= 1.0 and h["probe_seconds"] > 0
        assert 1.0 <= h["probe_eff_rank"] <= 192 and h["probe_feat_std"] > 0
    assert not any("probe_knn" in h for h in runs["data"][1].metrics_history)  # probe.every: 0
    meta = read_json(os.path.join(result.latest_checkpoint_uri, "meta.json"))
    assert meta["probe"]["probe_step"] == 8 and meta["probe"]["probe_knn"] == history[3]["probe_knn"]


def test_probe_on_an_unlabelled_dataset_is_refused_before_ray(tmp_path):
    from sarjepa_dist.config import ConfigError
    from sarjepa_dist.data import shards
    from sarjepa_dist.train.runner import run_pretrain

    root = str(tmp_path / "unlabelled")
    with shards.ShardWriter(root, command=["test"]) as w:
        for i in range(4):
            w.add(shards.ChipRecord(f"u{i}", torch.rand(1, 32, 32).numpy()))
        w.commit()
    cfg = tiny_config(root, str(tmp_path / "runs"), "probe-unlabelled", probe={"every": 2})
    with pytest.raises(ConfigError, match="probe.data: .* labelled class"):
        run_pretrain(cfg)


def test_probe_with_too_few_chips_per_class_is_refused_before_ray(dataset, tmp_path):
    from sarjepa_dist.config import ConfigError
    from sarjepa_dist.train.runner import run_pretrain

    root, _ = dataset  # 40 chips per class (one or two of them bad)
    cfg = tiny_config(root, str(tmp_path / "runs"), "probe-short", probe={"every": 2, "shots": 30,
                                                                            "max_per_class": None})
    with pytest.raises(ConfigError, match=r"probe.shots = 30 but class '\w+' of .* leaves only 28 pool chip"):
        run_pretrain(cfg)


def test_placements_read_the_same_chips_and_agree_step_by_step(runs, dataset):
    """Same seed, same data, same chip order: the placements differ only in where ∇x is computed
    (the Ray Data workers or the train worker), so every step sees the same chips and the losses
    agree to float32 rounding. Each of the 8 steps is a full batch of epoch 0, no chip twice, no bad chip."""
    _, manifest = dataset
    order = {}
    for p in PLACEMENTS:
        rows = read_records(chip_records(runs[p][0]))
        assert [(r["step"], r["epoch"], len(r["chips"])) for r in rows] == [(s, 0, 8) for s in range(1, 9)], p
        order[p] = [r["chips"] for r in rows]
        chips = [c for batch in order[p] for c in batch]
        assert len(set(chips)) == len(chips) == 64, p
        assert not set(chips) & set(bad_chip_ids(manifest.num_chips)), p
    assert order["data"] == order["device"]
    losses = {p: [h["loss"] for h in runs[p][1].metrics_history] for p in PLACEMENTS}
    assert len(losses["data"]) == len(losses["device"]) >= 2
    for a, b in zip(losses["data"], losses["device"]):
        assert math.isclose(a, b, rel_tol=1e-3), losses


def test_export_from_trained_checkpoint_matches_plain_timm(runs, tmp_path):
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    from sarjepa_dist.engine import build_method
    from sarjepa_dist.model.io import load_checkpoint_dir
    from sarjepa_dist.train.export import export_checkpoint

    cfg, result = runs["device"]
    out = str(tmp_path / "export")
    assert export_checkpoint(result.latest_checkpoint_uri, out) == out
    info = read_json(os.path.join(out, "encoder.json"))
    assert info["lineage"]["step"] == 8 and info["lineage"]["dataset_id"] == result.dataset_id
    assert info["weights"] == "ema-target"

    vit = VisionTransformer(**info["timm_kwargs"])  # plain timm, no project code
    vit.load_state_dict(load_file(os.path.join(out, "encoder.safetensors")), strict=True)
    vit.eval()
    model, _ = build_method(cfg)
    load_checkpoint_dir(result.latest_checkpoint_uri, model)
    x = torch.rand(3, cfg.data.channels, cfg.data.img_size, cfg.data.img_size)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(x), model.target_encoder.vit.eval().forward_features(x))
        assert torch.equal(vit(x), model.target_encoder.vit(x))


@pytest.mark.slow
def test_failed_worker_restarts_from_checkpoint(train_ray, dataset, tmp_path):
    """Fail once after step 6 (checkpoint at 4): FailureConfig restarts from step 4 and finishes.
    With drop-path on, the collapse figures come from an eval forward of their own (still reported)."""
    from sarjepa_dist.train.runner import run_pretrain

    root, _ = dataset
    marker = tmp_path / "fault-marker"
    cfg = tiny_config(root, str(tmp_path / "runs"), "local-fail", train={"max_failures": 1},
                      model={"drop_path": 0.1})
    result = run_pretrain(cfg, step_hooks=[FailOnce(step=6, marker=str(marker))])
    assert marker.exists(), "the fault was never injected"
    assert result.final_step == 8
    history = result.metrics_history
    assert [h["step"] for h in history] == [2, 4, 6, 8]  # the pre-failure step-6 report never happened
    assert [h["resumed_from_step"] for h in history] == [-1, -1, 4, 4]
    assert_finite_losses(history)
    assert all(h["eff_rank_target"] >= 1.0 and h["std_pred"] > 0 for h in history)
    state = read_json(storage.join(result.latest_checkpoint_uri, "state.json"))
    assert state["step"] == 8


def test_epochs_started_ahead_deliver_every_epoch_whole_and_in_order(train_ray, tmp_path):
    """Each next epoch's stream starts during the one before (train/batches.EpochStream): every
    epoch still delivers its own chips, each once, and the steps' epochs never interleave."""
    from sarjepa_dist.train.runner import run_pretrain

    root = str(tmp_path / "chips")
    write_chip_dataset(root, num_classes=2, per_class=24, num_bad=0)  # 48 chips: 6 steps an epoch
    records = tmp_path / "records"
    records.mkdir()
    cfg = tiny_config(root, str(tmp_path / "runs"), "epochs-ahead", train={"steps": 15, "checkpoint_every": 15})
    result = run_pretrain(cfg, step_hooks=[RecordChips(str(records))])
    assert result.final_step == 15
    rows = read_records(str(records))
    assert [r["epoch"] for r in rows] == [0] * 6 + [1] * 6 + [2] * 3
    for epoch in (0, 1):
        chips = [c for r in rows if r["epoch"] == epoch for c in r["chips"]]
        assert len(chips) == len(set(chips)) == 48, epoch


def test_relaunch_with_another_predictor_context_is_refused_naming_the_setting(runs):
    """A relaunch resumes from the run's checkpoint; the shared and per-block predictors have the
    same weights, so only the saved config can tell that the method changed."""
    import dataclasses

    from sarjepa_dist.cli import expected_failure
    from sarjepa_dist.config import ConfigError
    from sarjepa_dist.train.runner import run_pretrain

    cfg, first = runs["data"]
    assert cfg.model.predictor_context == "shared"
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, predictor_context="per-block"),
                                train=dataclasses.replace(cfg.train, steps=cfg.train.steps + 4))
    with pytest.raises(Exception) as e:
        run_pretrain(other)
    failure = expected_failure(e.value)
    assert isinstance(failure, ConfigError), e.value
    assert "model.predictor_context = 'per-block' here but 'shared' in the checkpoint" in str(failure)
    assert read_json(storage.join(first.latest_checkpoint_uri, "state.json"))["step"] == cfg.train.steps
