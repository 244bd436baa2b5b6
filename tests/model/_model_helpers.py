"""Tiny-model fixtures shared by the model tests (small enough that the suite runs in seconds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sarjepa_dist.config import MaskConfig, ModelConfig
from sarjepa_dist.masks import MaskBatch, MultiBlockMaskSampler, mask_generator
from sarjepa_dist.model.jepa import SarJEPA

IMG = 32
PATCH = 4  # 8x8 grid: the default mask settings are feasible on it
CHANS = 1
SCALES = 2


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(encoder="vit_tiny", patch_size=PATCH, depth=2, predictor_dim=32, predictor_depth=2,
                predictor_heads=2)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw) -> SarJEPA:
    torch.manual_seed(seed)
    return SarJEPA(tiny_cfg(**kw), IMG, CHANS, num_grad_scales=SCALES)


def tiny_masks(batch: int, seed: int = 0, grid: tuple[int, int] = (IMG // PATCH, IMG // PATCH)) -> MaskBatch:
    return MultiBlockMaskSampler(grid, MaskConfig()).sample(batch, mask_generator(seed, 0, 0))


def tiny_inputs(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stand-in inputs with structure (smooth blobs), so there is something to predict."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, CHANS, IMG // 8, IMG // 8, generator=g)
    x = torch.nn.functional.interpolate(base, size=(IMG, IMG), mode="bilinear", align_corners=False)
    gy, gx_ = torch.gradient(x, dim=(2, 3))
    gx = torch.sqrt(gx_ ** 2 + gy ** 2)
    gfeat = torch.cat([gx, gx.roll(1, dims=-1)], dim=1)  # (B, C*S, H, W)
    return {"x": x, "gx": gx * 10, "gfeat": gfeat}


def replace(cfg: ModelConfig, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, **kw)


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every model test runs on one intra-op thread (conftest ``one_torch_thread``)."""
    yield
