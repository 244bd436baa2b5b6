"""The training step: schedules applied, EMA after the step, DDP-compatible forward, input placement."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from sarjepa_dist.config import Config, DataConfig, GradientConfig, ModelConfig, OptimConfig
from sarjepa_dist.engine import StepMetrics, build_method, make_inputs_on_device, train_step, unwrap_model
from sarjepa_dist.masks import mask_generator
from sarjepa_dist.optim import Schedules, build_optimizer
from sarjepa_dist.transforms import prepare_inputs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(**model_kw) -> Config:
    model = dict(patch_size=4, depth=2, predictor_dim=32, predictor_depth=2, predictor_heads=2)
    model.update(model_kw)
    return Config(data=DataConfig(img_size=32, channels=1, batch_size=4), gradient=GradientConfig(radii=(2, 3)),
                  model=ModelConfig(**model), optim=OptimConfig(warmup_fraction=0.5)).validate()


def _setup(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    model, sampler = build_method(cfg)
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(4, 1, 32, 32, generator=g) * 100 + 1
    inputs = prepare_inputs(amp, cfg.data, cfg.gradient, model.required_inputs())
    masks = sampler.sample(4, mask_generator(seed, 0, 0))
    return model, inputs, masks


def test_build_method_matches_config():
    cfg = _cfg(target_mode="gradient-features")
    model, sampler = build_method(cfg)
    assert sampler.grid_size == model.encoder.grid_size == (8, 8)
    assert model.target_dim == 1 * 2 * 4 * 4  # channels * len(radii) * patch²


def test_train_step_updates_params_ema_and_reports():
    cfg = _cfg()
    model, inputs, masks = _setup(cfg)
    opt = build_optimizer(model, cfg.optim)
    sched = Schedules(cfg.optim, 10)
    enc0 = [p.detach().clone() for p in model.encoder.parameters()]
    tgt0 = [p.detach().clone() for p in model.target_encoder.parameters()]

    m = train_step(model, opt, sched, inputs, masks, 3, grad_clip=1.0)
    assert isinstance(m, StepMetrics) and m.loss.dim() == 0 and torch.isfinite(m.loss)
    assert m.lr == pytest.approx(sched.lr(3)) and m.wd == pytest.approx(sched.weight_decay(3))
    assert m.tau == pytest.approx(sched.ema(3))
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.lr(3))
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none)
    changed = [not torch.equal(a, p) for a, p in zip(enc0, model.encoder.parameters()) if p.requires_grad]
    assert all(changed)
    for t0, e0, t, e in zip(tgt0, enc0, model.target_encoder.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(t, m.tau * t0 + (1 - m.tau) * e.detach())  # EMA after the step
    d = m.to_dict()
    assert set(d) == {"loss", "grad_norm", "lr", "wd", "tau"} and d["grad_norm"] > 0


def test_train_step_keeps_its_own_outputs_of_the_first_chips():
    cfg = _cfg()
    model, inputs, masks = _setup(cfg)
    opt = build_optimizer(model, cfg.optim)
    sub = {k: v[:2] for k, v in inputs.items()}
    with torch.no_grad():  # the same weights the step's forward sees, before its update
        expected = model.eval()(sub, type(masks)(masks.context[:2], masks.targets[:2]))
    model.train()
    m = train_step(model, opt, Schedules(cfg.optim, 10), inputs, masks, 0, grad_clip=1.0, keep_outputs=2)
    assert set(m.outputs) == {"target", "pred"}
    for key in ("target", "pred"):
        assert m.outputs[key].shape[0] == 2 and not m.outputs[key].requires_grad
        torch.testing.assert_close(m.outputs[key], expected[key], rtol=1e-5, atol=1e-5)
    assert train_step(model, opt, Schedules(cfg.optim, 10), inputs, masks, 1, grad_clip=1.0).outputs is None


def _grad_norm_seen_by_optimizer(opt) -> list[float]:
    """Wrap ``opt.step`` to record the global L2 norm of the gradients it is about to apply."""
    seen: list[float] = []
    step = opt.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        return step(*args, **kwargs)

    opt.step = recording_step
    return seen


def test_grad_clip_zero_reports_norm_without_clipping():
    cfg = _cfg()
    model, inputs, masks = _setup(cfg)
    opt = build_optimizer(model, cfg.optim)
    applied = _grad_norm_seen_by_optimizer(opt)
    m = train_step(model, opt, Schedules(cfg.optim, 10), inputs, masks, 0, grad_clip=0.0)
    assert float(m.grad_norm) > 0
    assert applied[0] == pytest.approx(float(m.grad_norm), rel=1e-5)  # applied as computed


def test_grad_clip_scales_the_applied_gradient_and_reports_the_pre_clip_norm():
    cfg = _cfg()
    model, inputs, masks = _setup(cfg)
    opt = build_optimizer(model, cfg.optim)
    applied = _grad_norm_seen_by_optimizer(opt)
    m = train_step(model, opt, Schedules(cfg.optim, 10), inputs, masks, 0, grad_clip=1e-3)
    assert float(m.grad_norm) > 1e-2  # the pre-clip norm is reported ...
    assert applied[0] == pytest.approx(1e-3, rel=1e-3)  # ... and the optimizer got the clipped one


def test_autocast_step_runs():
    cfg = _cfg()
    model, inputs, masks = _setup(cfg)
    opt = build_optimizer(model, cfg.optim)
    m = train_step(model, opt, Schedules(cfg.optim, 10), inputs, masks, 0, grad_clip=1.0,
                   autocast_dtype=torch.bfloat16)
    assert torch.isfinite(m.loss) and m.loss.dtype == torch.float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_forward_matches_plain_step():
    """Through torch DDP (gloo, one rank) the step gives the same numbers as without it, and DDP's
    unused-parameter check passes on the second iteration (every trainable parameter got a grad)."""
    cfg = _cfg()
    plain, inputs, masks = _setup(cfg)
    wrapped, _, _ = _setup(cfg)
    sched = Schedules(cfg.optim, 10)
    opt_a, opt_b = build_optimizer(plain, cfg.optim), build_optimizer(wrapped, cfg.optim)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(wrapped)
        assert unwrap_model(ddp) is wrapped
        for step in range(2):
            a = train_step(plain, opt_a, sched, inputs, masks, step, grad_clip=1.0)
            b = train_step(wrapped, opt_b, sched, inputs, masks, step, grad_clip=1.0, ddp_model=ddp)
            torch.testing.assert_close(a.loss, b.loss)
    finally:
        dist.destroy_process_group()
    for pa, pb in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(pa, pb)


def test_make_inputs_device_and_data_placements_agree():
    cfg = _cfg(target_mode="gradient-features")
    amp = torch.rand(2, 1, 32, 32) * 50 + 1
    need = ("gfeat", "x")
    on_device = make_inputs_on_device({"amplitude": amp}, cfg.data, cfg.gradient, need, "cpu")
    data_cfg = DataConfig(img_size=32, channels=1, transform_placement="data")
    pre = prepare_inputs(amp, cfg.data, cfg.gradient, need)
    moved = make_inputs_on_device(dict(pre), data_cfg, cfg.gradient, need, "cpu")
    assert set(on_device) == set(moved) == set(need)
    for k in need:
        torch.testing.assert_close(on_device[k], moved[k])
    assert on_device["gfeat"].shape == (2, 2, 32, 32)
    with pytest.raises(KeyError, match="amplitude"):
        make_inputs_on_device({"x": amp}, cfg.data, cfg.gradient, need)
    with pytest.raises(KeyError, match="gfeat"):
        make_inputs_on_device({"x": amp}, data_cfg, cfg.gradient, need)
