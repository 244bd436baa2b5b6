"""The GPU path's step options, checked on the CPU: ``train.compile`` (torch.compile of the model the
step runs forward through) matches eager, and ``train.precision: bf16`` runs the step under CPU
autocast with a finite loss. The step is ``engine.train_step`` itself, wrapped the way the training
loop wraps it (``loop.autocast_dtype`` picks the dtype, the compiled module goes in ``ddp_model``).

Inductor compiles C++ kernels on the CPU, so the compile test needs a C++ compiler; without one it
falls back to the ``aot_eager`` backend (the same graph capture and autograd tracing, no codegen)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from sarjepa_dist.config import Config, ConfigError, config_from_dict
from sarjepa_dist.engine import build_method, train_step
from sarjepa_dist.masks import mask_generator
from sarjepa_dist.optim import Schedules, build_optimizer
from sarjepa_dist.train.loop import autocast_dtype

IMG, BATCH, STEPS = 32, 4, 3
COMPILE_BACKEND = "inductor" if (shutil.which("g++") or shutil.which("c++")) else "aot_eager"


def tiny_method_config(**train: object) -> Config:
    return config_from_dict({
        "data": {"img_size": IMG, "batch_size": BATCH},
        "gradient": {"radii": [2, 4]},
        "mask": {"min_keep": 4},
        "model": {"encoder": "vit_tiny", "patch_size": 4, "depth": 2, "predictor_dim": 32,
                  "predictor_depth": 1, "predictor_heads": 2},
        "optim": {"warmup_fraction": 0.0},
        "train": {"steps": STEPS, **train},
    })


def chip_inputs(need: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The ``need`` inputs of smooth random chips: enough structure for a non-trivial loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(BATCH, 1, 4, 4, generator=g), size=(IMG, IMG),
                                        mode="bilinear", align_corners=False)
    gy, gx = torch.gradient(x, dim=(2, 3))
    grad = torch.sqrt(gx ** 2 + gy ** 2) * 10
    inputs = {"x": x, "gx": grad, "gfeat": torch.cat([grad, grad.roll(1, dims=-1)], dim=1)}
    return {k: inputs[k] for k in need}


def run_steps(cfg: Config, *, compiled: bool) -> tuple[list[float], torch.nn.Module]:
    """STEPS optimiser steps from one seed, with one fixed mask batch (one compiled graph)."""
    torch.manual_seed(cfg.train.seed)
    model, sampler = build_method(cfg)
    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    schedules = Schedules(cfg.optim, cfg.train.steps)
    inputs = chip_inputs(model.required_inputs())
    masks = sampler.sample(BATCH, mask_generator(0, 0, 0))
    net = torch.compile(model, backend=COMPILE_BACKEND) if compiled else None
    dtype = autocast_dtype(cfg, torch.device("cpu"))
    losses = []
    for step in range(cfg.train.steps):
        metrics = train_step(model, optimizer, schedules, inputs, masks, step, grad_clip=cfg.optim.grad_clip,
                             autocast_dtype=dtype, ddp_model=net)
        losses.append(float(metrics.loss))
    return losses, model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_compiled_step_matches_eager():
    cfg = tiny_method_config(compile=True)
    eager_losses, eager_model = run_steps(cfg, compiled=False)
    torch._dynamo.reset()
    compiled_losses, compiled_model = run_steps(cfg, compiled=True)
    assert all(math.isfinite(v) for v in compiled_losses)
    # fused kernels reorder float sums: equal to rounding, not bitwise
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    eager_params = dict(eager_model.named_parameters())
    for name, p in compiled_model.named_parameters():
        torch.testing.assert_close(p, eager_params[name], rtol=1e-3, atol=1e-4, msg=name)
    # the step changed the weights (a no-op step would also "match")
    torch.manual_seed(cfg.train.seed)
    fresh, _ = build_method(cfg)
    moved = [n for n, p in fresh.named_parameters() if not torch.equal(p, eager_params[n])]
    assert moved


def test_bf16_cpu_autocast_runs_the_step_with_a_finite_loss():
    cfg = tiny_method_config(precision="bf16")
    assert autocast_dtype(cfg, torch.device("cpu")) is torch.bfloat16
    seen_dtypes: set[torch.dtype] = set()
    torch.manual_seed(0)
    probe_model, _ = build_method(cfg)
    linear = next(m for m in probe_model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda mod, args, out: seen_dtypes.add(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe_model(chip_inputs(probe_model.required_inputs()),
                    build_method(cfg)[1].sample(BATCH, mask_generator(0, 0, 0)))
    assert seen_dtypes == {torch.bfloat16}, "the autocast region did not run the Linear layers in bf16"

    bf16_losses, bf16_model = run_steps(cfg, compiled=False)
    assert all(math.isfinite(v) for v in bf16_losses), bf16_losses
    assert all(torch.isfinite(p).all() for p in bf16_model.parameters())
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters()), "autocast must keep fp32 weights"
    fp32_losses, _ = run_steps(tiny_method_config(precision="fp32"), compiled=False)
    assert bf16_losses != fp32_losses  # the bf16 path really ran reduced precision
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.05)


@pytest.mark.parametrize("precision, amp, device, expected", [
    ("auto", True, "cuda", torch.bfloat16), ("auto", True, "cpu", None), ("auto", False, "cuda", None),
    ("bf16", True, "cpu", torch.bfloat16), ("bf16", True, "cuda", torch.bfloat16),
    ("fp32", True, "cuda", None),
])
def test_autocast_dtype_follows_precision_and_amp(precision, amp, device, expected):
    cfg = tiny_method_config(precision=precision, amp=amp)
    assert autocast_dtype(cfg, torch.device(device)) is expected


def test_precision_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"train\.precision = 'fp16' is not allowed"):
        tiny_method_config(precision="fp16")
    with pytest.raises(ConfigError, match=r"train\.amp = false contradicts train\.precision = 'bf16'"):
        tiny_method_config(precision="bf16", amp=False)
