"""AdamW groups and the step-indexed schedules."""

from __future__ import annotations

import math

import pytest
import torch

from sarjepa_dist.config import ModelConfig, OptimConfig
from sarjepa_dist.model.jepa import SarJEPA
from sarjepa_dist.optim import Schedules, build_optimizer, param_groups

CFG = OptimConfig(lr=1e-3, start_lr=2e-4, final_lr=1e-6, warmup_fraction=0.1, weight_decay=0.04,
                  final_weight_decay=0.4, ema=(0.996, 1.0))


def _model() -> SarJEPA:
    torch.manual_seed(0)
    return SarJEPA(ModelConfig(patch_size=8, depth=1, predictor_dim=32, predictor_depth=1, predictor_heads=2), 32, 1)


def test_schedules_at_key_steps():
    s = Schedules(CFG, 1000)
    assert s.warmup_steps == 100
    assert s.lr(0) == pytest.approx(2e-4)
    assert s.lr(50) == pytest.approx(6e-4)
    assert s.lr(100) == pytest.approx(1e-3)
    assert s.lr(550) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert s.lr(1000) == pytest.approx(1e-6)
    assert s.lr(5000) == pytest.approx(1e-6)  # past the end: stays at the floor
    assert s.weight_decay(0) == pytest.approx(0.04)
    assert s.weight_decay(500) == pytest.approx(0.22)
    assert s.weight_decay(1000) == pytest.approx(0.4)
    assert s.ema(0) == pytest.approx(0.996)
    assert s.ema(500) == pytest.approx(0.998)
    assert s.ema(1000) == pytest.approx(1.0)
    lrs = [s.lr(i) for i in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone cosine decay after warm-up


def test_no_warmup_and_resume_is_stateless():
    s = Schedules(OptimConfig(warmup_fraction=0.0), 10)
    assert s.lr(0) == pytest.approx(OptimConfig().lr)
    a, b = Schedules(CFG, 1000), Schedules(CFG, 1000)
    b.load_state_dict(a.state_dict())
    assert [a.lr(i) for i in (0, 333, 999)] == [b.lr(i) for i in (0, 333, 999)]
    with pytest.warns(UserWarning, match="total steps"):
        Schedules(CFG, 500).load_state_dict(a.state_dict())


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = _model()
    groups = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["apply_wd"] and not groups[1]["apply_wd"]
    assert all(not n.endswith(".bias") for n in decay)
    assert all("norm" not in n for n in decay)
    assert "predictor.mask_token" in no_decay and "encoder.vit.blocks.0.norm1.weight" in no_decay
    assert "encoder.vit.blocks.0.attn.qkv.weight" in decay and "encoder.vit.patch_embed.proj.weight" in decay
    grouped = decay | no_decay
    assert not any(n.startswith("target_encoder.") for n in grouped)  # EMA-only, never optimised
    assert "encoder.vit.pos_embed" not in grouped  # fixed sin-cos
    assert grouped == {n for n, p in model.named_parameters() if p.requires_grad}


def test_apply_sets_lr_and_wd_per_group():
    model = _model()
    opt = build_optimizer(model, CFG)
    s = Schedules(CFG, 1000)
    lr, wd = s.apply(opt, 500)
    assert opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"] == lr
    assert opt.param_groups[0]["weight_decay"] == wd == pytest.approx(0.22)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert tuple(opt.param_groups[0]["betas"]) == CFG.betas
    assert math.isclose(lr, s.lr(500))


def test_linear_lr_scaling_follows_the_global_batch():
    from sarjepa_dist.config import OptimConfig
    from sarjepa_dist.optim import Schedules

    cfg = OptimConfig(lr=1e-3, start_lr=2e-4, final_lr=1e-6, warmup_fraction=0.1)
    assert cfg.scale_for(32) == 32 / 256 and OptimConfig(lr_scaling="none").scale_for(32) == 1.0
    plain, scaled = Schedules(cfg, 100), Schedules(cfg, 100, lr_scale=cfg.scale_for(64))
    for step in (0, 5, 10, 50, 100):
        assert abs(scaled.lr(step) - plain.lr(step) * 0.25) < 1e-15
    assert abs(scaled.lr(10) - 2.5e-4) < 1e-12  # peak = 1e-3 x 64/256



def test_optimizer_uses_the_fused_adamw_kernel_on_cpu_and_matches_the_default_one():
    import copy

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    fused = build_optimizer(model, CFG)
    assert fused.defaults["fused"] is True
    default = torch.optim.AdamW(param_groups(twin), lr=CFG.start_lr, betas=tuple(CFG.betas),
                                weight_decay=CFG.weight_decay)  # torch's default: the per-tensor loop on CPU
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in ((model, fused), (twin, default)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
