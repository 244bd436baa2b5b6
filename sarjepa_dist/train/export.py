"""Export a checkpoint's EMA encoder (safetensors + JSON) from local or ``s3://`` storage.

``model.io.export_encoder`` works on local folders only (it reads safetensors by memory map and
renames files into place), so remote checkpoints are copied to a temporary folder first. The
export is always staged in a temporary folder, its lineage pointed at the checkpoint's real URI,
then copied to ``out_uri`` (local or ``s3://``) file by file with ``encoder.json`` last, since its
presence is what marks an export as complete.

``find_checkpoint`` turns what a user names (a checkpoint folder, or a run folder holding
``checkpoint_<step>_<id>/`` folders) into one checkpoint: the run's latest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sarjepa_dist import storage
from sarjepa_dist.errors import InputNotFoundError
from sarjepa_dist.model.io import CONFIG_FILE, EXPORT_INFO, META_FILE, MODEL_FILE, export_encoder

__all__ = ["CheckpointChoice", "export_checkpoint", "find_checkpoint"]

_log = logging.getLogger(__name__)

# train.loop names checkpoints checkpoint_<step, zero-padded>_<hex id>. Ray keeps files such as
# checkpoint_manager_snapshot.json beside them, which a "checkpoint_*" pattern would also match.
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)(?:_[0-9a-f]+)?$")


@dataclass(frozen=True)
class CheckpointChoice:
    uri: str  # the checkpoint folder
    step: int | None
    run_uri: str | None = None  # the run folder it was chosen from; None when named directly
    complete_checkpoints: int = 1  # complete checkpoints the run folder holds


def find_checkpoint(uri: str) -> CheckpointChoice:
    """The checkpoint ``uri`` names: itself when it is a checkpoint folder, else its latest one.

    A run folder's latest checkpoint is its complete ``checkpoint_<step>_<id>/`` folder (model
    weights, config and ``meta.json``, which is written last) with the highest step, read from
    ``meta.json`` (the folder name's step when meta has none); equal steps (a step redone after a
    resume) go to the later ``saved_at``. Steps are compared as numbers, not names.
    ``InputNotFoundError`` names ``uri`` when it is missing, a file, or holds no complete checkpoint.
    """
    uri = str(uri)
    shown = storage.redact(uri)
    usage = ("export takes a checkpoint folder (checkpoint_<step>_<id>/) or a run folder "
             "(<train.storage_path>/<train.name>), whose latest checkpoint it exports")

    def complete(folder: str) -> dict | None:
        """The folder's meta.json when every file a checkpoint needs is there, else None."""
        if not all(storage.exists(storage.join(folder, f)) for f in (MODEL_FILE, CONFIG_FILE, META_FILE)):
            return None
        try:
            return json.loads(storage.read_text(storage.join(folder, META_FILE)))
        except json.JSONDecodeError as exc:
            _log.warning("skipping %s: its %s is not valid JSON (%s)", storage.redact(folder), META_FILE, exc)
            return None

    if not storage.exists(uri):
        raise InputNotFoundError(f"{shown}: no such file or folder; {usage}")
    if not storage.is_dir(uri):
        raise InputNotFoundError(f"{shown}: is a file, not a folder; {usage}")
    meta = complete(uri)
    if meta is not None:
        return CheckpointChoice(uri=uri, step=meta.get("step"))
    found = []
    for folder in storage.list_dirs(uri):
        match = _CHECKPOINT_NAME.match(os.path.basename(folder.rstrip("/")))
        if match and (meta := complete(folder)) is not None:
            step = int(match.group(1)) if meta.get("step") is None else int(meta["step"])
            found.append((step, float(meta.get("saved_at") or 0.0), folder))
    if not found:
        raise InputNotFoundError(f"{shown}: neither a checkpoint folder (no {META_FILE} with {MODEL_FILE} and "
                                 f"{CONFIG_FILE}) nor a run folder with a complete checkpoint_<step>_<id>/ "
                                 f"folder; {usage}")
    step, _, latest = max(found)
    # list_dirs gives storage paths (bucket/key); keep the scheme the user gave
    latest = storage.join(uri, os.path.basename(latest.rstrip("/")))
    return CheckpointChoice(uri=latest, step=step, run_uri=uri, complete_checkpoints=len(found))



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
