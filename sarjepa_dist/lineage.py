"""``sarjepa inspect ARTEFACT``: say what an artefact is and what made it.

Lineage runs end to end: a dataset's manifest hash (``dataset_id``) goes into every checkpoint's
``meta.json``; a checkpoint's id and config go into every export, few-shot report and sweep table.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sarjepa_dist import storage
from sarjepa_dist.errors import InputNotFoundError, SarjepaError
from sarjepa_dist.train.export import find_checkpoint
from sarjepa_dist.train.history import format_curve, read_history


class UnknownArtefact(SarjepaError, ValueError):
    """The path exists but is none of the artefacts ``describe`` knows."""


def _read_json(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_text(uri))


def _find(artefact: str, name: str) -> str | None:
    """``artefact`` itself when it is the file ``name``, else ``artefact/name`` when that exists."""
    if os.path.basename(artefact.rstrip("/")) == name and storage.exists(artefact):
        return artefact
    candidate = storage.join(artefact, name)
    return candidate if storage.exists(candidate) else None


def describe(artefact: str) -> dict[str, Any]:
    if not storage.exists(artefact):
        raise InputNotFoundError(f"{storage.redact(artefact)}: no such file or folder")
    if artefact.endswith(".safetensors"):
        sidecar = storage.join(os.path.dirname(artefact), "encoder.json")
        if storage.exists(sidecar):
            return {"kind": "export", "uri": artefact, **_read_json(sidecar)}
    if (m := _find(artefact, "manifest.json")) is not None:
        from sarjepa_dist.data.inspect import inspect_dataset

        root = os.path.dirname(m) if m != storage.join(artefact, "manifest.json") else artefact
        return {"kind": "dataset", "uri": root, **inspect_dataset(root)}
    if (m := _find(artefact, "meta.json")) is not None:
        info = {"kind": "checkpoint", "uri": artefact, **_read_json(m)}
        state = _find(artefact, "state.json")
        if state:
            info["state"] = _read_json(state)
        info["history"] = read_history(os.path.dirname(m))
        return info
    if (m := _find(artefact, "encoder.json")) is not None:
        return {"kind": "export", "uri": artefact, **_read_json(m)}
    if (m := _find(artefact, "results.json")) is not None:
        res = _read_json(m)
        return {"kind": "fewshot-report", "uri": artefact, **{k: v for k, v in res.items() if k != "runs"}}
    if (m := _find(artefact, "sweep.json")) is not None:
        return {"kind": "sweep", "uri": artefact, **_read_json(m)}
    if storage.is_dir(artefact):
        try:
            choice = find_checkpoint(artefact)
        except InputNotFoundError:
            choice = None
        if choice is not None:  # a run folder: describe it by its latest checkpoint
            return {"kind": "run", "uri": artefact, "latest_checkpoint": choice.uri,
                    "complete_checkpoints": choice.complete_checkpoints,
                    **_read_json(storage.join(choice.uri, "meta.json")), "history": read_history(choice.uri)}
    raise UnknownArtefact(f"{artefact}: not a dataset (manifest.json), checkpoint (meta.json), run folder "
                          f"(checkpoint_<step>_<id>/), export (encoder.json), few-shot report (results.json) "
                          f"or sweep (sweep.json)")


def format_description(info: dict[str, Any]) -> str:
    kind = info.get("kind")
    if kind == "dataset":
        from sarjepa_dist.data.inspect import format_inspection

        return format_inspection(info)
    lines = [f"{kind}: {info.get('uri')}"]
    for key in ("run_name", "name", "step", "checkpoint_id", "dataset_id", "target_mode", "context_domain",
                "feature_domain", "created_at"):
        if key in info:
            lines.append(f"  {key}: {info[key]}")
    lineage = info.get("lineage")
    if isinstance(lineage, dict):
        for k, v in lineage.items():
            if k != "config":
                lines.append(f"  lineage.{k}: {v}")
    history = info.get("history")
    rest = {k: v for k, v in info.items() if k not in ("kind", "uri", "config", "lineage") and not isinstance(v, (dict, list))}
    shown = {line.split(":")[0].strip() for line in lines[1:]}
    for k, v in rest.items():
        if k not in shown:
            lines.append(f"  {k}: {v}")
    if history:
        lines.append(f"learning curve ({len(history)} reports):")
        lines.extend("  " + row for row in format_curve(history, every=max(1, len(history) // 20)).splitlines())
    return "\n".join(lines)
