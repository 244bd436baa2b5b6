"""Checkpoint round trip, atomic save, export to plain timm, and every load_encoder spec."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from _model_helpers import one_thread, CHANS, IMG, tiny_cfg, tiny_inputs, tiny_masks  # noqa: F401
from sarjepa_dist.config import Config, DataConfig, GradientConfig
from sarjepa_dist.engine import build_method, train_step
from sarjepa_dist.model import io as mio
from sarjepa_dist.optim import Schedules, build_optimizer


def _cfg(**model_kw) -> Config:
    return Config(data=DataConfig(img_size=IMG, channels=CHANS), gradient=GradientConfig(radii=(2, 3)),
                  model=tiny_cfg(**model_kw)).validate()


def _trained(cfg: Config, steps: int = 2):
    torch.manual_seed(0)
    model, _ = build_method(cfg)
    opt = build_optimizer(model, cfg.optim)
    sched = Schedules(cfg.optim, 10)
    inputs, masks = tiny_inputs(4), tiny_masks(4)
    inputs = {k: inputs[k] for k in model.required_inputs()}
    for s in range(steps):
        train_step(model, opt, sched, inputs, masks, s, grad_clip=1.0)
    model.ema_update(0.5)  # make the EMA encoder differ clearly from the context encoder
    return model, opt


def _save(tmp_path, cfg, model, opt, name="ckpt"):
    return mio.save_checkpoint_dir(tmp_path / name, model, opt, {"step": 2, "epoch": 0}, cfg.to_dict(),
                                   {"run_name": "unit", "step": 2, "dataset_id": "ds-123"})


def test_round_trip_restores_params_optimizer_and_step(tmp_path):
    cfg = _cfg()
    model, opt = _trained(cfg)
    meta = _save(tmp_path, cfg, model, opt)
    d = tmp_path / "ckpt"
    assert {p.name for p in d.iterdir()} == {"model.safetensors", "optimizer.pt", "state.json", "rng.pt",
                                             "config.json", "meta.json"}
    assert len(meta["checkpoint_id"]) >= 8 and meta["dataset_id"] == "ds-123"

    torch.manual_seed(1)
    fresh, _ = build_method(cfg)
    fresh_opt = build_optimizer(fresh, cfg.optim)
    state, meta2 = mio.load_checkpoint_dir(d, fresh, fresh_opt)
    assert state["step"] == 2 and meta2["checkpoint_id"] == meta["checkpoint_id"]
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k, v in sa["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(v[name], sb["state"][k][name])
    assert json.loads((d / "config.json").read_text()) == cfg.to_dict()


def test_rng_state_round_trip(tmp_path):
    cfg = _cfg()
    model, opt = _trained(cfg, steps=0)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    np.random.randn()  # leave a cached gaussian
    _save(tmp_path, cfg, model, opt)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    mio.load_checkpoint_dir(tmp_path / "ckpt", model, restore_rng=True)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    saved = torch.load(tmp_path / "ckpt" / "rng.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in saved.values())


def test_crash_mid_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg()
    model, opt = _trained(cfg, steps=0)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mio.torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _save(tmp_path, cfg, model, opt)
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary sibling


def test_resave_replaces_existing_checkpoint(tmp_path):
    cfg = _cfg()
    model, opt = _trained(cfg, steps=0)
    first = _save(tmp_path, cfg, model, opt)
    second = _save(tmp_path, cfg, model, opt)
    assert first["checkpoint_id"] != second["checkpoint_id"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["checkpoint_id"] == second["checkpoint_id"]


def test_export_loads_into_plain_timm_with_identical_embeddings(tmp_path):
    cfg = _cfg()
    model, opt = _trained(cfg)
    _save(tmp_path, cfg, model, opt)
    out = mio.export_encoder(tmp_path / "ckpt", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "encoder.safetensors"]
    info = json.loads((out / "encoder.json").read_text())
    assert info["weights"] == "ema-target" and info["lineage"]["dataset_id"] == "ds-123"
    assert info["lineage"]["step"] == 2 and info["lineage"]["run_name"] == "unit"
    assert info["conditioning"] == "log" and info["gradient"]["radii"] == [2, 3]
    assert info["context_domain"] == "raw" and info["target_mode"] == "ema-gradient"

    x = tiny_inputs(3)["x"]
    model.eval()
    with torch.no_grad():
        ref = model.target_encoder.forward_features_pooled(x)
        assert not torch.allclose(ref, model.encoder.forward_features_pooled(x))  # it is the EMA one
        for path in (out, out / "encoder.safetensors"):
            vit = mio.load_timm_from_export(path)
            assert type(vit).__name__ == "VisionTransformer"
            torch.testing.assert_close(vit(x), ref)
            assert torch.allclose(vit.forward_features(x).mean(1), ref, atol=1e-6)


def test_load_encoder_specs(tmp_path):
    cfg = _cfg()
    model, opt = _trained(cfg)
    _save(tmp_path, cfg, model, opt)
    mio.export_encoder(tmp_path / "ckpt", tmp_path / "export")
    x = tiny_inputs(2)["x"]
    with torch.no_grad():
        ref = model.target_encoder.eval().forward_features_pooled(x)
        for spec, source in ((tmp_path / "ckpt", "checkpoint"), (tmp_path / "export", "export"),
                             (tmp_path / "export" / "encoder.safetensors", "export")):
            enc, info = mio.load_encoder(spec)
            assert info["source"] == source and info["weights"] == "ema-target"
            assert info["lineage"]["checkpoint_id"] and info["img_size"] == IMG
            torch.testing.assert_close(enc.forward_features_pooled(x), ref)
            assert not enc.training

    a, info = mio.load_encoder("random-init", model_cfg=tiny_cfg(), img_size=IMG, in_chans=CHANS, seed=3)
    b, _ = mio.load_encoder("random-init", model_cfg=tiny_cfg(), img_size=IMG, in_chans=CHANS, seed=3)
    assert info["weights"] == "random"
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    state = torch.get_rng_state()
    s, _ = mio.load_encoder("random-init:vit_small", model_cfg=tiny_cfg(), img_size=IMG, in_chans=CHANS)
    assert s.embed_dim == 384 and torch.equal(state, torch.get_rng_state())  # global RNG untouched
    with pytest.raises(ValueError, match="img_size"):
        mio.load_encoder("random-init")
    with pytest.raises(FileNotFoundError):
        mio.load_encoder(tmp_path / "nope")


def test_gradient_features_export_uses_context_encoder(tmp_path):
    cfg = _cfg(target_mode="gradient-features")
    model, opt = _trained(cfg, steps=1)
    _save(tmp_path, cfg, model, opt)
    enc, info = mio.load_encoder(tmp_path / "ckpt")
    assert info["weights"] == "context"
    x = tiny_inputs(2)["x"]
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features_pooled(x), model.encoder.eval().forward_features_pooled(x))


# --------------------------------------------------------------------------- integrity


class _RunsCode:
    """A pickle payload that would run code when unpickled (it touches a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rehash(d) -> None:
    """What an attacker who also edits meta.json does: record the tampered files' hashes."""
    meta = json.loads((d / "meta.json").read_text())
    meta["files"] = {name: mio.file_sha256(d / name) for name in meta["files"]}
    (d / "meta.json").write_text(json.dumps(meta))


def test_meta_records_every_files_sha256(tmp_path):
    cfg = _cfg()
    model, opt = _trained(cfg, steps=0)
    meta = mio.save_checkpoint_dir(tmp_path / "ckpt", model, opt, {"step": 0}, cfg.to_dict(), {},
                                   extra_files={"notes.jsonl": "{}\n"})
    d = tmp_path / "ckpt"
    assert set(meta["files"]) == {p.name for p in d.iterdir()} - {"meta.json"}
    assert meta["files"]["notes.jsonl"] == mio.file_sha256(d / "notes.jsonl")
    assert json.loads((d / "meta.json").read_text())["files"] == meta["files"]


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "config.json", "state.json"])
def test_tampered_checkpoint_is_refused_naming_the_file(tmp_path, victim):
    cfg = _cfg()
    model, opt = _trained(cfg, steps=0)
    _save(tmp_path, cfg, model, opt)
    d = tmp_path / "ckpt"
    data = bytearray((d / victim).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (d / victim).write_bytes(bytes(data))
    fresh, _ = build_method(cfg)
    with pytest.raises(mio.CheckpointIntegrityError, match=f"{victim}: its sha256 differs"):
        mio.load_checkpoint_dir(d, fresh, build_optimizer(fresh, cfg.optim))
    with pytest.raises(mio.CheckpointIntegrityError, match=victim):
        mio.export_encoder(d, tmp_path / "export")
    with pytest.raises(mio.CheckpointIntegrityError, match=victim):
        mio.load_encoder(d)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng.pt"])
def test_pickled_payload_is_refused_and_never_runs(tmp_path, victim):
    cfg = _cfg()
    model, opt = _trained(cfg, steps=0)
    _save(tmp_path, cfg, model, opt)
    d = tmp_path / "ckpt"
    marker = tmp_path / "payload-ran"
    torch.save({"state": _RunsCode(str(marker))}, d / victim)
    _rehash(d)  # the hashes agree: only the tensors-only loader stands between the payload and us
    fresh, _ = build_method(cfg)
    with pytest.raises(mio.CheckpointIntegrityError, match=f"{victim}: refused: it holds pickled objects"):
        mio.load_checkpoint_dir(d, fresh, build_optimizer(fresh, cfg.optim), restore_rng=True)
    assert not marker.exists()


def test_tampered_export_is_refused(tmp_path):
    cfg = _cfg()
    model, opt = _trained(cfg, steps=0)
    _save(tmp_path, cfg, model, opt)
    out = mio.export_encoder(tmp_path / "ckpt", tmp_path / "export")
    assert json.loads((out / mio.EXPORT_INFO).read_text())["weights_sha256"] == mio.file_sha256(out / mio.EXPORT_WEIGHTS)
    mio.load_timm_from_export(out)  # untouched: loads
    data = bytearray((out / mio.EXPORT_WEIGHTS).read_bytes())
    data[-5] ^= 0x01
    (out / mio.EXPORT_WEIGHTS).write_bytes(bytes(data))
    for load in (mio.load_timm_from_export, mio.load_encoder):
        with pytest.raises(mio.CheckpointIntegrityError, match="encoder.safetensors: its sha256 differs"):
            load(out)


_KILLED_WRITER = """
import sys, time, torch
from safetensors import torch as st
sys.path.insert(0, {tests!r})
from test_io import _cfg, _trained, _save
from sarjepa_dist.model import io as mio
cfg = _cfg()
model, opt = _trained(cfg, steps=0)
from pathlib import Path
_save(Path({tmp!r}), cfg, model, opt, name="checkpoint_00000004_aaaa")
real_save = torch.save
def slow_save(*args, **kwargs):
    real_save(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)  # killed here, mid-checkpoint
mio.torch.save = slow_save
_save(Path({tmp!r}), cfg, model, opt, name="checkpoint_00000008_bbbb")
"""


def test_kill_during_checkpoint_write_leaves_the_previous_one_latest(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from sarjepa_dist.train.export import find_checkpoint

    code = _KILLED_WRITER.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    choice = find_checkpoint(str(tmp_path))
    assert choice.step == 2 and choice.uri.endswith("checkpoint_00000004_aaaa")  # _save's step is 2
    assert not (tmp_path / "checkpoint_00000008_bbbb").exists()  # only a hidden temporary sibling
    cfg = _cfg()
    fresh, _ = build_method(cfg)
    state, _ = mio.load_checkpoint_dir(choice.uri, fresh, build_optimizer(fresh, cfg.optim))
    assert state["step"] == 2


def test_saved_config_section_keeps_what_the_checkpoint_lacks_absent(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert mio.saved_config_section(ckpt, "model") is None  # no config saved
    (ckpt / mio.CONFIG_FILE).write_text(json.dumps({"model": {"depth": 2, "target_mode": "ema-pixel"}}))
    assert mio.saved_config_section(ckpt, "model") == {"depth": 2, "target_mode": "ema-pixel"}
    assert mio.saved_config_section(ckpt, "optim") == {}
