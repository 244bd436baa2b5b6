"""The feature cache: one ``.npz`` per source and dataset, extracted once, reused by every report.

Files live at ``<out>/features/<source-key>__<dataset_id[:12]>__<domain>.npz``. The source key ends
in the source's fingerprint (weights, preprocessing, pooling, code version), and the file records
that fingerprint and the full dataset id, so a changed checkpoint, dataset or domain can never be
served a stale file.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sarjepa_dist import storage
from sarjepa_dist.fewshot import extract
from sarjepa_dist.fewshot.extract import FeatureTable
from sarjepa_dist.fewshot.sources import FEATURE_VERSION, FeatureSource

log = logging.getLogger(__name__)


def cache_uri(out: str, source: FeatureSource, dataset_id: str) -> str:
    return storage.join(out, "features", source.cache_name(dataset_id))


def save_cache(uri: str, table: FeatureTable, source: FeatureSource, dataset_id: str) -> None:
    meta = {"fingerprint": source.fingerprint, "dataset_id": dataset_id, "source": source.name,
            "domain": source.domain, "recipe": source.recipe.to_dict(), "feature_version": FEATURE_VERSION}
    buf = io.BytesIO()
    np.savez(buf, chip_ids=table.chip_ids.astype(str), features=table.features, ok=table.ok,
             meta=np.array(json.dumps(meta)))
    storage.write_bytes(uri, buf.getvalue())


def load_cache(uri: str, source: FeatureSource, dataset_id: str) -> FeatureTable | None:
    """The cached table when it exists and was made by this exact source on this dataset."""
    if not storage.exists(uri):
        return None
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("fingerprint") != source.fingerprint or meta.get("dataset_id") != dataset_id:
                log.warning("feature cache %s was made by another encoder/dataset; recomputing", uri)
                return None
            return FeatureTable(z["chip_ids"].astype(str), z["features"].astype(np.float32), z["ok"].astype(bool))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("feature cache %s is unreadable (%s); recomputing", uri, exc)
        return None


def features_for(sources: Sequence[FeatureSource], datasets: Mapping[str, str], out: str | None, *,
                 batch_size: int = 64, ensure_ray: Callable[[], None] | None = None
                 ) -> tuple[dict[str, dict[str, FeatureTable]], dict[str, dict[str, Any]]]:
    """Features of every source on every dataset (``dataset_id → root``): from the cache under
    ``out`` when present, else in one Ray Data pass over whatever is missing (``ensure_ray`` is
    handed to ``extract.extract_features`` as ``connect``), then cached.

    Returns ``{source.name: {dataset_id: table}}`` and a per-source record (cached / extracted
    dataset ids, seconds, cache files).
    """
    tables: dict[str, dict[str, FeatureTable]] = {s.name: {} for s in sources}
    files: dict[str, dict[str, str]] = {s.name: {} for s in sources}
    for src in sources:
        for dataset_id in datasets:
            if out is None:
                continue
            uri = cache_uri(out, src, dataset_id)
            files[src.name][dataset_id] = uri
            hit = load_cache(uri, src, dataset_id)
            if hit is not None:
                tables[src.name][dataset_id] = hit
    todo = [s for s in sources if any(d not in tables[s.name] for d in datasets)]
    missing = {s.name: sorted(d for d in datasets if d not in tables[s.name]) for s in sources}
    seconds = 0.0
    if todo:
        need = {d: r for d, r in datasets.items() if any(d in missing[s.name] for s in todo)}
        t0 = time.time()
        fresh = extract.extract_features(todo, need, batch_size=batch_size, connect=ensure_ray)
        seconds = time.time() - t0
        for src in todo:
            for dataset_id in missing[src.name]:
                table = fresh[src.name][dataset_id]
                tables[src.name][dataset_id] = table
                if out is not None:
                    save_cache(files[src.name][dataset_id], table, src, dataset_id)
    records = {s.name: {"cached": sorted(d for d in datasets if d not in missing[s.name]),
                        "extracted": missing[s.name],
                        "extract_seconds": round(seconds, 2) if missing[s.name] else 0.0,
                        "cache_files": {d: storage.redact(u) for d, u in files[s.name].items()}}
               for s in sources}
    return tables, records
