"""The method's networks (pure torch; nothing here knows about training loops or Ray)."""

from sarjepa_dist.model.collapse import collapse_stats
from sarjepa_dist.model.encoder import MaskedViT, build_encoder, encoder_timm_kwargs, sincos_pos_embed_2d
from sarjepa_dist.model.io import (
    export_encoder,
    load_checkpoint_dir,
    load_encoder,
    load_timm_from_export,
    save_checkpoint_dir,
)
from sarjepa_dist.model.jepa import SarJEPA, patchify
from sarjepa_dist.model.predictor import Predictor

__all__ = [
    "MaskedViT", "Predictor", "SarJEPA", "build_encoder", "collapse_stats", "encoder_timm_kwargs",
    "export_encoder", "load_checkpoint_dir", "load_encoder", "load_timm_from_export", "patchify",
    "save_checkpoint_dir", "sincos_pos_embed_2d",
]
