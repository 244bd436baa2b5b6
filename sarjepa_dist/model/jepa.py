"""SarJEPA: context encoder, EMA target encoder and predictor, with the latent-L2 JEPA loss.

The forward is a pure function of (inputs, masks) returning a dict, so it runs unchanged under
torch DDP: every trainable parameter (context encoder, predictor) takes part in every step, and
the target encoder has no trainable parameters (it moves only by ``ema_update``).

Target modes (METHOD.md §1):
- ``ema-gradient``: targets are the EMA encoder's tokens of ∇x (the seed's formulation);
- ``ema-pixel``: the EMA encoder's tokens of x (I-JEPA);
- ``gradient-features``: the fixed multi-scale gradient maps, patchified (SAR-JEPA's code); no
  EMA encoder exists in this mode, and evaluation uses the context encoder.

Context domain: ``raw`` (the context encoder sees the masked x) or ``gradient`` (the masked ∇x).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sarjepa_dist.config import ModelConfig
from sarjepa_dist.model.encoder import MaskedViT, build_encoder, gather_tokens
from sarjepa_dist.model.predictor import Predictor

if TYPE_CHECKING:  # masks are produced by sarjepa_dist.masks; the model only reads two fields
    from sarjepa_dist.masks import MaskBatch

# The input key (transforms.INPUT_KEYS) each context domain and target mode reads.
CONTEXT_INPUT = {"raw": "x", "gradient": "gx"}
_TARGET_INPUT = {"ema-gradient": "gx", "ema-pixel": "x", "gradient-features": "gfeat"}


def required_inputs(model_cfg: ModelConfig) -> tuple[str, ...]:
    """The input keys (⊆ x, gx, gfeat) a model of this config reads, without building it."""
    need = {CONTEXT_INPUT[model_cfg.context_domain], _TARGET_INPUT[model_cfg.target_mode]}
    return tuple(sorted(need))


def patchify(maps: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C*p*p), patches in row-major order, each (C, p, p) flattened."""
    b, c, h, w = maps.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"maps of size {h}x{w} do not tile into {p}x{p} patches")
    x = maps.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


class SarJEPA(nn.Module):
    """``encoder`` (trained), ``target_encoder`` (EMA copy, or None for gradient-features), ``predictor``."""

    def __init__(self, model_cfg: ModelConfig, img_size: int, in_chans: int, num_grad_scales: int = 4) -> None:
        super().__init__()
        self.target_mode = model_cfg.target_mode
        self.context_domain = model_cfg.context_domain
        self.model_cfg = model_cfg
        self.patch_size = model_cfg.patch_size
        self.in_chans = in_chans
        self.num_grad_scales = num_grad_scales

        self.encoder: MaskedViT = build_encoder(model_cfg, img_size, in_chans)
        self.target_encoder: MaskedViT | None = None
        if self.target_mode != "gradient-features":  # the fixed gradient maps need no EMA encoder
            self.target_encoder = copy.deepcopy(self.encoder)
            self.target_encoder.requires_grad_(False)
            self.target_encoder.eval()
            self.target_dim = self.encoder.embed_dim
        else:
            self.target_dim = in_chans * num_grad_scales * self.patch_size ** 2
        self.predictor = Predictor(
            self.encoder.grid_size, in_dim=self.encoder.embed_dim, dim=model_cfg.predictor_dim,
            depth=model_cfg.predictor_depth, num_heads=model_cfg.predictor_heads, out_dim=self.target_dim,
            drop_path=model_cfg.drop_path, shared_context=model_cfg.predictor_context == "shared")

    # ------------------------------------------------------------------ what the data must supply

    def required_inputs(self) -> tuple[str, ...]:
        """Shorthand for the module's :func:`required_inputs` of this model's config."""
        return required_inputs(self.model_cfg)

    # ------------------------------------------------------------------ training-mode bookkeeping

    @property
    def eval_encoder(self) -> MaskedViT:
        """The encoder evaluation uses: the EMA one where it exists, else the context encoder."""
        return self.target_encoder if self.target_encoder is not None else self.encoder

    def train(self, mode: bool = True) -> "SarJEPA":
        """As ``nn.Module.train``, but the target encoder stays in eval mode (no drop-path in targets)."""
        super().train(mode)
        if self.target_encoder is not None:
            self.target_encoder.eval()
        return self

    @torch.no_grad()
    def ema_update(self, tau: float) -> None:
        """θ̄ ← τ θ̄ + (1−τ) θ in place (one fused lerp over all tensors); no-op without an EMA encoder."""
        if self.target_encoder is None:
            return
        tgt = list(self.target_encoder.parameters())
        src = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_lerp_(tgt, src, 1.0 - float(tau))

    # ------------------------------------------------------------------ the objective

    @torch.no_grad()
    def targets(self, inputs: dict[str, torch.Tensor], tgt_idx: torch.Tensor) -> torch.Tensor:
        """(B, M, Kt, target_dim) stop-gradient targets, layer-normed over the feature dim.

        EMA modes embed the *full* image (targets are contextualised by every patch), then gather.
        """
        if self.target_mode == "gradient-features":
            gfeat = inputs["gfeat"]
            want = self.in_chans * self.num_grad_scales
            if gfeat.shape[1] != want:
                raise ValueError(f"gfeat has {gfeat.shape[1]} channels; this model expects "
                                 f"in_chans*num_grad_scales = {want}")
            feats = patchify(gfeat, self.patch_size)
            feats = F.layer_norm(feats, feats.shape[-1:])
            return gather_tokens(feats, tgt_idx)
        assert self.target_encoder is not None
        rows = tgt_idx.reshape(tgt_idx.shape[0], -1)  # (B, M*Kt): the last block computes only these
        feats = self.target_encoder.forward_rows(inputs[_TARGET_INPUT[self.target_mode]], rows)
        feats = F.layer_norm(feats, feats.shape[-1:])
        return feats.reshape(*tgt_idx.shape, feats.shape[-1])

    def forward(self, inputs: dict[str, torch.Tensor], masks: "MaskBatch") -> dict[str, Any]:
        """loss: mean over target blocks and tokens of ‖pred − target‖² / dim (latent L2).

        Also returns ``pred`` (B, M, Kt, dim), ``target`` and ``context`` (the context encoder's
        tokens, detached, for collapse monitoring).
        """
        z = self.encoder(inputs[CONTEXT_INPUT[self.context_domain]], masks.context)
        pred = self.predictor(z, masks.context, masks.targets)
        target = self.targets(inputs, masks.targets)
        loss = F.mse_loss(pred.float(), target.float())
        return {"loss": loss, "pred": pred, "target": target, "context": z.detach()}
