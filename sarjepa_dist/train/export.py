"""Export a checkpoint's EMA encoder (safetensors + JSON) from local or ``s3://`` storage.

``model.io.export_encoder`` works on local folders only (it reads safetensors by memory map and
renames files into place), so remote checkpoints are copied to a temporary folder first. The
export is always staged in a temporary folder, its lineage pointed at the checkpoint's real URI,
then copied to ``out_uri`` (local or ``s3://``) file by file with ``encoder.json`` last, since its
presence is what marks an export as complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from sarjepa_dist import storage

__all__ = ["download_dir", "upload_dir", "export_checkpoint"]


def download_dir(uri: str, dest: str | os.PathLike) -> Path:
    """Copy every file under ``uri`` (local or s3://) into ``dest``, keeping relative paths."""
    dest = Path(dest)
    files = storage.list_files(uri, recursive=True)
    if not files:
        raise FileNotFoundError(f"{storage.redact(uri)}: no files here (is it a checkpoint folder?)")
    fs, root = storage.resolve(uri)
    for f in files:
        _, path = storage.resolve(f)
        rel = os.path.relpath(path, root)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(f))
    return dest


def upload_dir(src: str | os.PathLike, uri: str, last: tuple[str, ...] = ()) -> None:
    """Copy the files of local folder ``src`` to ``uri``; names in ``last`` are written after the rest."""
    src = Path(src)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for p in files:
        storage.write_bytes(storage.join(uri, *p.relative_to(src).parts), p.read_bytes())


def export_checkpoint(checkpoint_uri: str, out_uri: str) -> str:
    """Write ``encoder.safetensors`` + ``encoder.json`` for the checkpoint's EMA (target) encoder.

    ``checkpoint_uri`` and ``out_uri`` may each be local or ``s3://``. Returns ``out_uri``. The
    weights load into ``timm.models.vision_transformer.VisionTransformer(**timm_kwargs)`` with the
    kwargs in ``encoder.json`` (see ``model.io.load_timm_from_export``).
    """
    from sarjepa_dist.model.io import EXPORT_INFO, export_encoder

    with tempfile.TemporaryDirectory(prefix="sarjepa-export-") as tmp:
        if storage.is_s3(checkpoint_uri):
            ckpt_dir = download_dir(checkpoint_uri, Path(tmp) / "checkpoint")
        else:
            ckpt_dir = Path(storage.resolve(checkpoint_uri)[1])
        staged = export_encoder(ckpt_dir, Path(tmp) / "export")
        _point_lineage_at(staged / EXPORT_INFO, checkpoint_uri)
        upload_dir(staged, out_uri, last=(EXPORT_INFO,))
    return out_uri


def _point_lineage_at(info_path: Path, checkpoint_uri: str) -> None:
    """The export names the checkpoint by its storage URI, not by the temporary copy it was read from."""
    info = json.loads(info_path.read_text())
    info.setdefault("lineage", {})["checkpoint"] = storage.redact(str(checkpoint_uri))
    info_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
