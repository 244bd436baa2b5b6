"""Export a checkpoint's EMA encoder (safetensors + JSON) from local or ``s3://`` storage.

``model.io.export_encoder`` works on local folders only (it reads safetensors by memory map and
renames files into place), so remote checkpoints are copied to a temporary folder first. The
export is always staged in a temporary folder, its lineage pointed at the checkpoint's real URI,
then copied to ``out_uri`` (local or ``s3://``) file by file with ``encoder.json`` last, since its
presence is what marks an export as complete.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from sarjepa_dist import storage
from sarjepa_dist.model.io import EXPORT_INFO, export_encoder

__all__ = ["export_checkpoint"]


def export_checkpoint(checkpoint_uri: str, out_uri: str) -> str:
    """Write ``encoder.safetensors`` + ``encoder.json`` for the checkpoint's EMA (target) encoder.

    ``checkpoint_uri`` and ``out_uri`` may each be local or ``s3://``. Returns ``out_uri``. The
    weights load into ``timm.models.vision_transformer.VisionTransformer(**timm_kwargs)`` with the
    kwargs in ``encoder.json`` (see ``model.io.load_timm_from_export``).
    """
    with tempfile.TemporaryDirectory(prefix="sarjepa-export-") as tmp:
        if storage.is_s3(checkpoint_uri):
            ckpt_dir = storage.download_dir(checkpoint_uri, Path(tmp) / "checkpoint")
        else:
            ckpt_dir = Path(storage.resolve(checkpoint_uri)[1])
        staged = export_encoder(ckpt_dir, Path(tmp) / "export")
        _point_lineage_at(staged / EXPORT_INFO, checkpoint_uri)
        storage.upload_dir(staged, out_uri, last=(EXPORT_INFO,))
    return out_uri


def _point_lineage_at(info_path: Path, checkpoint_uri: str) -> None:
    """The export names the checkpoint by its storage URI, not by the temporary copy it was read from."""
    info = json.loads(info_path.read_text())
    info.setdefault("lineage", {})["checkpoint"] = storage.redact(str(checkpoint_uri))
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
