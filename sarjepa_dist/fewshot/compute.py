"""Per-batch feature computation, pure torch/numpy: amplitude chips → one feature vector per chip.

A :class:`FeatureRecipe` says everything besides weights that turns chips into features: the
centre crop/resize, the conditioning and gradient settings that ``prepare_inputs`` applies, which
of its outputs feeds the encoder or baseline, and the pooling (``fewshot.pooling`` of the patch tokens for an
encoder, over the test-time views ``fewshot.tta``; ``flatten`` or an ``avgpool`` grid for the baselines). The Ray actors and the in-process
extractor both call :func:`features_of_chips`, so they give the same numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from sarjepa_dist.config import DataConfig, GradientConfig, to_plain
from sarjepa_dist.errors import SarjepaError
from sarjepa_dist.model.encoder import MaskedViT
from sarjepa_dist.model.pooling import encode_tokens, pool_tokens
from sarjepa_dist.transforms import center_resize, crop_views, prepare_inputs

GRADIENT_MAP_GRID = 8


class FeatureError(SarjepaError, RuntimeError):
    """Features cannot be computed as configured; the message names the encoder and the cause."""


@dataclass(frozen=True)
class FeatureRecipe:
    """Everything a worker needs, besides weights, to turn amplitude chips into feature vectors."""

    kind: str  # encoder | raw-pixels | gradient-maps
    img_size: int
    channels: int
    conditioning: str  # amplitude | log | db
    gradient: dict[str, Any]  # GradientConfig fields
    input: str  # x | gx | gfeat: which prepare_inputs output feeds the encoder / baseline
    pooling: str  # encoders: FEATURE_POOLINGS (model/pooling.py); baselines: flatten | avgpool
    pool_grid: int | None = None
    timm_kwargs: dict[str, Any] | None = None
    # FEWSHOT_TTAS: test-time views averaged. hflip: an encoder's tokens with its mirror's
    # (model/pooling.py; the baselines are mirror-equivariant). hflip+crops: that, averaged over
    # transforms.crop_views of the stored chip, for encoders and baselines alike.
    tta: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))


def build_model(recipe: FeatureRecipe, state: Mapping[str, np.ndarray] | None) -> torch.nn.Module | None:
    if recipe.kind != "encoder":
        return None
    model = MaskedViT(dict(recipe.timm_kwargs or {}))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in (state or {}).items()}, strict=True)
    return model.eval()


def compute_features(amplitude: np.ndarray | torch.Tensor, recipe: FeatureRecipe,
                     model: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """(B, C, H, W) amplitude chips → (B, D) float32 features, exactly as the Ray workers do it."""
    amp = torch.as_tensor(np.asarray(amplitude, dtype=np.float32)) if not torch.is_tensor(amplitude) \
        else amplitude.float()
    if amp.ndim != 4:
        raise FeatureError(f"chips must be (B, C, H, W); got shape {tuple(amp.shape)}")
    if amp.shape[1] != recipe.channels:
        raise FeatureError(f"chips have {amp.shape[1]} channel(s) but the {recipe.kind} expects "
                           f"{recipe.channels}; evaluate on data of the encoder's channel layout")
    amp = amp.to(device)
    if recipe.kind == "encoder" and model is None:
        raise FeatureError("an encoder recipe needs its model")
    views = crop_views(amp, recipe.img_size) if recipe.tta == "hflip+crops" else [center_resize(amp, recipe.img_size)]
    feats = _view_features(views[0], recipe, model)
    for view in views[1:]:
        feats += _view_features(view, recipe, model)
    return (feats / len(views)).float().cpu().numpy()


def _view_features(amp: torch.Tensor, recipe: FeatureRecipe, model: torch.nn.Module | None) -> torch.Tensor:
    """Features of one view: chips already at ``recipe.img_size``."""
    data_cfg = DataConfig(img_size=recipe.img_size, channels=recipe.channels, conditioning=recipe.conditioning)
    grad_kwargs = dict(recipe.gradient)
    if "radii" in grad_kwargs:
        grad_kwargs["radii"] = tuple(grad_kwargs["radii"])
    grad_cfg = GradientConfig(**grad_kwargs)
    with torch.no_grad():
        z = prepare_inputs(amp, data_cfg, grad_cfg, need=(recipe.input,))[recipe.input].float()
        if recipe.kind == "encoder":
            tta = "hflip" if recipe.tta == "hflip+crops" else recipe.tta
            feats = pool_tokens(encode_tokens(model, z, model.grid_size, tta), model.grid_size, recipe.pooling)
        elif recipe.pooling == "flatten":
            feats = z.flatten(1)
        elif recipe.pooling == "avgpool":
            g = int(recipe.pool_grid or GRADIENT_MAP_GRID)
            feats = torch.nn.functional.adaptive_avg_pool2d(z, (g, g)).flatten(1)
        else:
            raise FeatureError(f"unknown pooling {recipe.pooling!r}")
    return feats.float()


def features_of_chips(chips: Sequence[np.ndarray | None], recipe: FeatureRecipe, model: torch.nn.Module | None,
                      device: str | torch.device = "cpu") -> np.ndarray:
    """(N, D) features of decoded chips; ``None`` (a chip that failed to decode) gets a zero row.

    Chips of different shapes (two datasets in one batch) are computed shape by shape; a batch
    with no good chip comes back 0 wide (the caller pads it to the width of the rest).
    """
    groups: dict[tuple[tuple[int, ...], str], list[int]] = {}
    for i, chip in enumerate(chips):
        if chip is not None:
            groups.setdefault((chip.shape, chip.dtype.str), []).append(i)
    feats: np.ndarray | None = None
    for rows in groups.values():
        f = compute_features(np.stack([chips[i] for i in rows]).astype(np.float32), recipe, model, device)
        if feats is None:
            feats = np.zeros((len(chips), f.shape[1]), dtype=np.float32)
        feats[rows] = f
    return feats if feats is not None else np.zeros((len(chips), 0), dtype=np.float32)
