"""Resume-equivalence without Ray: a run stopped at step k, saved with the loop's checkpoint writer
and resumed into a fresh model, ends with the parameters of an uninterrupted run (max abs
difference <= 1e-6), with the same lr, tau, masks and augmented chips after the resume.

The loop's pieces are used as the loop uses them: ``build_method`` / ``build_optimizer`` /
``Schedules`` (restored from ``state.json``), ``mask_generator(seed, rank, step)``,
``transform_chip`` (per-chip augmentation seeded by (seed, epoch, chip id)), ``train_step`` and
``model.io.save_checkpoint_dir`` / ``load_checkpoint_dir``. The data order is fixed here; the Ray
runs in test_reliability.py check the step bookkeeping of the real loop.
"""

from __future__ import annotations

import numpy as np
import torch

from _train_helpers import IMG, tiny_config
from sarjepa_dist.data.pipeline import transform_chip
from sarjepa_dist.data.synth import SynthConfig, generate
from sarjepa_dist.engine import build_method, make_inputs_on_device, train_step
from sarjepa_dist.masks import mask_generator
from sarjepa_dist.model.io import load_checkpoint_dir, save_checkpoint_dir
from sarjepa_dist.model.jepa import required_inputs
from sarjepa_dist.optim import Schedules, build_optimizer

STEPS, STOP_AT, BATCH = 8, 3, 4


def _batches(cfg):
    """STEPS batches of augmented chips (epoch 0 for the first half, 1 after), as the pipeline makes them."""
    chips = generate(SynthConfig(num_classes=2, per_class=BATCH * STEPS // 2, size=IMG, seed=3)).chips
    out = []
    for step in range(STEPS):
        epoch = step * 2 // STEPS
        ids = [f"c{step * BATCH + i:04d}" for i in range(BATCH)]
        amps = [transform_chip(chips[step * BATCH + i], cfg.data, training=True, epoch=epoch, chip_id=cid)
                for i, cid in enumerate(ids)]
        out.append({"amplitude": torch.stack(amps).numpy(), "chip_id": ids})
    return out


def _run(cfg, batches, start: int, stop: int, state=None, with_optimizer: bool = True):
    """Steps [start, stop) like the loop's _Trainer (rank 0 of 1); returns model, optimizer,
    schedules and what each step saw (lr, tau, mask hash, input hash)."""
    torch.manual_seed(cfg.train.seed)
    model, sampler = build_method(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    schedules = Schedules(cfg.optim, STEPS, lr_scale=cfg.optim.scale_for(cfg.data.batch_size))
    if state is not None:
        saved, _ = load_checkpoint_dir(state, model, optimizer if with_optimizer else None)
        schedules.load_state_dict(saved["schedules"])
        assert saved["step"] == start
    torch.manual_seed(cfg.train.seed * 1_000_003 + start)  # the loop's reseed on (re)start
    need = required_inputs(cfg.model)
    seen = []
    for step in range(start, stop):
        inputs = make_inputs_on_device(batches[step], cfg.data, cfg.gradient, need, "cpu")
        masks = sampler.sample(BATCH, mask_generator(cfg.train.seed, 0, step))
        metrics = train_step(model, optimizer, schedules, inputs, masks, step, grad_clip=cfg.optim.grad_clip)
        seen.append((metrics.lr, metrics.tau, masks.context.sum().item(), masks.targets.sum().item(),
                     float(inputs[need[0]].sum())))
    return model, optimizer, schedules, seen


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    cfg = tiny_config("unused", str(tmp_path), "resume-eq",
                      data={"batch_size": BATCH, "transform_placement": "device"}, train={"steps": STEPS})
    torch.set_num_threads(1)  # one summation order for both runs
    batches = _batches(cfg)
    full, _, _, seen_full = _run(cfg, batches, 0, STEPS)

    first, optimizer, schedules, seen_first = _run(cfg, batches, 0, STOP_AT)
    ckpt = tmp_path / "checkpoint_00000003"
    save_checkpoint_dir(ckpt, first, optimizer, {"step": STOP_AT, "schedules": schedules.state_dict()},
                        cfg.to_dict(), {"step": STOP_AT})
    del first, optimizer  # nothing survives but the checkpoint
    resumed, _, _, seen_rest = _run(cfg, batches, STOP_AT, STEPS, state=ckpt)

    assert seen_first + seen_rest == seen_full  # lr, tau, masks and inputs step by step
    worst = max((a - b).abs().max().item() for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    assert worst <= 1e-6, f"max abs parameter difference {worst:g} after resuming at step {STOP_AT}"
    # a positive control: a resume that forgets the optimizer state (AdamW moments) does differ
    lost, _, _, _ = _run(cfg, batches, STOP_AT, STEPS, state=ckpt, with_optimizer=False)
    drift = max((a - b).abs().max().item() for a, b in zip(full.state_dict().values(), lost.state_dict().values()))
    assert np.isfinite(drift) and drift > 1e-5  # ten times the tolerance above
