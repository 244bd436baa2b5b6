"""Describe a chip dataset by re-reading it: what the manifest claims and what the shards hold.

``inspect_dataset`` trusts nothing but the bytes: it re-hashes every shard against the manifest,
decodes every row again (counting bad rows by reason, as ``check_chip`` would at training time),
counts chips per class, and measures value ranges, so a dataset can be checked before a long
run is pointed at it. Percentiles come from a uniform reservoir sample of pixels (exact min, max,
mean and std are streamed over every pixel), so memory stays flat for any dataset size.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from sarjepa_dist import storage
from sarjepa_dist.data.shards import METADATA_COLUMNS, BadChip, check_chip, decode_chip, read_manifest

PERCENTILES = (0.1, 1, 5, 25, 50, 75, 95, 99, 99.9)
PIXELS_PER_CHIP = 256  # pixels sampled from each chip for the percentile reservoir
RESERVOIR_CHIPS = 4096  # chip samples kept (≈ 1 M pixels)
MAX_EXAMPLES = 5


class _ValueStats:
    """Exact streaming min/max/mean/std (overall and per channel) plus a pixel reservoir."""

    def __init__(self, seed: int = 0) -> None:
        self.n = 0
        self.sum = self.sumsq = None  # per channel, float64
        self.min = self.max = None
        self.reservoir: list[np.ndarray] = []
        self.chips_seen = 0
        self._rng = random.Random(seed)
        self._np_rng = np.random.default_rng(seed)

    def add(self, chip: np.ndarray) -> None:
        flat = chip.reshape(chip.shape[0], -1).astype(np.float64)
        s, ss = flat.sum(axis=1), np.square(flat).sum(axis=1)
        mn, mx = flat.min(axis=1), flat.max(axis=1)
        if self.sum is None:
            self.sum, self.sumsq, self.min, self.max = s, ss, mn, mx
        elif s.shape == self.sum.shape:
            self.sum += s
            self.sumsq += ss
            self.min = np.minimum(self.min, mn)
            self.max = np.maximum(self.max, mx)
        else:  # a row with another channel count (already counted as bad by the caller)
            return
        self.n += flat.shape[1]
        # Algorithm R over chips: every chip has the same chance to be in the sample.
        k = min(PIXELS_PER_CHIP, flat.size)
        sample = flat.reshape(-1)[self._np_rng.choice(flat.size, size=k, replace=False)]
        self.chips_seen += 1
        if len(self.reservoir) < RESERVOIR_CHIPS:
            self.reservoir.append(sample)
        else:
            j = self._rng.randrange(self.chips_seen)
            if j < RESERVOIR_CHIPS:
                self.reservoir[j] = sample

    def summary(self) -> dict[str, Any]:
        if self.sum is None or self.n == 0:
            return {}
        n = self.n
        mean_c = self.sum / n
        std_c = np.sqrt(np.maximum(self.sumsq / n - mean_c ** 2, 0.0))
        total = n * len(self.sum)
        mean = float(self.sum.sum() / total)
        std = float(np.sqrt(max(float(self.sumsq.sum()) / total - mean ** 2, 0.0)))
        pix = np.concatenate(self.reservoir)
        pct = np.percentile(pix, PERCENTILES)
        out: dict[str, Any] = {
            "min": float(self.min.min()), "max": float(self.max.max()), "mean": mean, "std": std,
            "percentiles": {f"p{p:g}": float(v) for p, v in zip(PERCENTILES, pct)},
            "percentile_sample_pixels": int(pix.size),
            "zero_fraction_sampled": float((pix == 0).mean()),
        }
        if len(self.sum) > 1:
            out["per_channel"] = [
                {"channel": c, "min": float(self.min[c]), "max": float(self.max[c]),
                 "mean": float(mean_c[c]), "std": float(std_c[c])} for c in range(len(self.sum))]
        return out


def _summarise_quarantine(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "total": len(entries),
        "by_reason": dict(sorted(Counter(str(e.get("reason")) for e in entries).items())),
        "examples": entries[:MAX_EXAMPLES],
    }


def inspect_dataset(uri: str, max_rows: int | None = None) -> dict[str, Any]:
    """Re-read the dataset at ``uri`` (up to ``max_rows`` rows) and describe it as a JSON-able dict.

    Keys: ``uri``, ``lineage`` (dataset_id, source, command, crop_policy, created_at),
    ``manifest`` (what the manifest claims), ``scan`` (per-shard sha256/row checks, shapes and
    dtypes seen, duplicates), ``counts`` (per class, as found), ``values`` (min/max/mean/std and
    percentiles), ``bad_rows`` (by reason, re-decoded), ``quarantine`` (what ingest set aside),
    ``metadata`` (per column), ``stats`` (the ingest's own statistics) and ``problems`` (a list of
    sentences; empty when the dataset is consistent).
    """
    manifest = read_manifest(uri)
    expected_shape = tuple(manifest.chip_shape)
    problems: list[str] = []
    shards_out: list[dict[str, Any]] = []
    values = _ValueStats()
    per_class: Counter[str] = Counter()
    shapes: Counter[str] = Counter()
    bad: Counter[str] = Counter()
    bad_examples: list[dict[str, Any]] = []
    label_mismatch = 0
    seen_ids: set[str] = set()
    duplicates = 0
    meta_nonnull: Counter[str] = Counter()
    meta_num: dict[str, list[float]] = {}
    meta_str: dict[str, Counter[str]] = {}
    rows = 0
    stopped_early = read_errors = False

    for info in manifest.shards:
        if max_rows is not None and rows >= max_rows:
            stopped_early = True
            break
        shard_uri = storage.join(uri, info.path)
        entry: dict[str, Any] = {"path": info.path, "rows_manifest": info.rows, "bytes": info.bytes}
        shards_out.append(entry)
        try:
            payload = storage.read_bytes(shard_uri)
        except OSError as exc:
            entry["error"] = storage.redact(str(exc))
            problems.append(f"shard {info.path} cannot be read: {entry['error']}")
            read_errors = True
            continue
        entry["sha256_ok"] = hashlib.sha256(payload).hexdigest() == info.sha256
        if not entry["sha256_ok"]:
            problems.append(f"shard {info.path}: sha256 differs from the manifest (changed or truncated)")
        try:
            pf = pq.ParquetFile(io.BytesIO(payload))
        except Exception as exc:  # pyarrow raises several types for corrupt files
            entry["error"] = f"not a readable Parquet file ({exc})"
            problems.append(f"shard {info.path}: {entry['error']}")
            read_errors = True
            continue
        found = 0
        for batch in pf.iter_batches(batch_size=512):
            cols = batch.to_pydict()
            n = batch.num_rows
            if max_rows is not None:
                n = min(n, max_rows - rows)
            for i in range(n):
                rows += 1
                found += 1
                cid = cols["chip_id"][i]
                if cid in seen_ids:
                    duplicates += 1
                seen_ids.add(cid)
                shape, dtype = cols["chip_shape"][i], cols["chip_dtype"][i]
                shapes[f"{'x'.join(str(s) for s in (shape or []))} {dtype}"] += 1
                label, cname = cols["label"][i], cols["class_name"][i]
                per_class[cname if cname is not None else "<unlabelled>"] += 1
                if label is not None and manifest.class_names and (
                        not 0 <= label < len(manifest.class_names) or manifest.class_names[label] != cname):
                    label_mismatch += 1
                for c in METADATA_COLUMNS:
                    v = cols[c][i]
                    if v is None:
                        continue
                    meta_nonnull[c] += 1
                    if isinstance(v, (int, float)):
                        lo_hi = meta_num.setdefault(c, [float(v), float(v)])
                        lo_hi[0], lo_hi[1] = min(lo_hi[0], float(v)), max(lo_hi[1], float(v))
                    elif c != "source_path":
                        meta_str.setdefault(c, Counter())[str(v)] += 1
                try:
                    chip = decode_chip(cols["chip"][i], shape or (), dtype)
                    check_chip(chip, expected_shape)
                except BadChip as exc:
                    bad[exc.reason] += 1
                    if len(bad_examples) < MAX_EXAMPLES:
                        bad_examples.append({"chip_id": cid, "shard": info.path, "reason": exc.reason,
                                             "detail": exc.detail})
                    continue
                values.add(chip)
            if max_rows is not None and rows >= max_rows:
                break
        entry["rows_found"] = found
        if found < info.rows and max_rows is not None and rows >= max_rows:
            stopped_early = True  # the row limit cut this shard short
        elif found != info.rows:
            problems.append(f"shard {info.path}: {found} rows, the manifest says {info.rows}")
    complete = not (stopped_early or read_errors)

    if complete and rows != manifest.num_chips:
        problems.append(f"{rows} rows in the shards, the manifest says num_chips = {manifest.num_chips}")
    if complete:
        claimed = {k: v for k, v in manifest.per_class_counts.items()}
        if claimed != dict(per_class):
            problems.append(f"per-class counts differ from the manifest: found {dict(sorted(per_class.items()))}, "
                            f"manifest {claimed}")
    n_bad = sum(bad.values())
    if n_bad:
        problems.append(f"{n_bad} rows fail decoding/validation: {dict(sorted(bad.items()))}")
    if duplicates:
        problems.append(f"{duplicates} duplicate chip_id values")
    if label_mismatch:
        problems.append(f"{label_mismatch} rows whose label and class_name disagree with class_names")
    other_shapes = {k: v for k, v in shapes.items()
                    if k != f"{'x'.join(str(s) for s in expected_shape)} {manifest.chip_dtype}"}
    if other_shapes:
        problems.append(f"rows with a shape/dtype other than the manifest's: {other_shapes}")

    metadata: dict[str, Any] = {}
    for c in METADATA_COLUMNS:
        m: dict[str, Any] = {"non_null": int(meta_nonnull.get(c, 0))}
        if c in meta_num:
            m["min"], m["max"] = meta_num[c]
        if c in meta_str:
            m["top_values"] = dict(meta_str[c].most_common(5))
            m["distinct"] = len(meta_str[c])
        metadata[c] = m

    return {
        "uri": storage.redact(str(uri)),
        "lineage": {
            "dataset_id": manifest.dataset_id, "schema_version": manifest.schema_version,
            "source": manifest.source, "command": list(manifest.command),
            "crop_policy": dict(manifest.crop_policy), "created_at": manifest.created_at,
        },
        "manifest": {
            "num_chips": manifest.num_chips, "chip_shape": list(manifest.chip_shape),
            "chip_dtype": manifest.chip_dtype, "class_names": list(manifest.class_names),
            "per_class_counts": dict(manifest.per_class_counts), "labelled": manifest.labelled,
            "num_shards": len(manifest.shards), "bytes": int(sum(s.bytes for s in manifest.shards)),
        },
        "scan": {
            "rows_scanned": rows, "complete": complete, "max_rows": max_rows, "shards": shards_out,
            "shapes": dict(shapes), "duplicate_chip_ids": duplicates, "label_mismatches": label_mismatch,
        },
        "counts": {"per_class": dict(sorted(per_class.items())), "total": rows},
        "values": values.summary(),
        "bad_rows": {"total": n_bad, "by_reason": dict(sorted(bad.items())), "examples": bad_examples},
        "quarantine": _summarise_quarantine(list(manifest.quarantine)),
        "metadata": metadata,
        "stats": dict(manifest.stats),
        "problems": problems,
    }


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def format_inspection(info: dict[str, Any]) -> str:
    """A human-readable report of ``inspect_dataset``'s dict (the JSON form holds everything)."""
    lin, man, scan = info["lineage"], info["manifest"], info["scan"]
    lines = [f"dataset {info['uri']}"]
    lines.append(f"  dataset_id   {lin['dataset_id']}")
    lines.append(f"  source       {lin['source']}")
    lines.append(f"  command      {' '.join(lin['command'])}")
    lines.append(f"  created_at   {lin['created_at']}")
    lines.append(f"  crop_policy  {lin['crop_policy']}")
    shape = "x".join(str(s) for s in man["chip_shape"])
    lines.append(f"  chips        {man['num_chips']} × {shape} {man['chip_dtype']} in {man['num_shards']} shard(s), "
                 f"{man['bytes'] / 2**20:.1f} MiB")
    scanned = f"{scan['rows_scanned']} rows scanned" + ("" if scan["complete"] else
                                                        f" (partial: max_rows={scan['max_rows']})")
    ok = [s.get("sha256_ok") for s in scan["shards"]]
    lines.append(f"  scan         {scanned}; sha256 ok for {sum(bool(x) for x in ok)}/{len(ok)} shard(s) read")
    if man["labelled"]:
        lines.append(f"  classes      {len(man['class_names'])} (label: name, chips found / in manifest)")
        found = info["counts"]["per_class"]
        for i, name in enumerate(man["class_names"]):
            lines.append(f"    {i:>3}: {name:<20} {found.get(name, 0):>8} / {man['per_class_counts'].get(name, 0)}")
    else:
        lines.append("  classes      none (unlabelled)")
    v = info["values"]
    if v:
        pct = v["percentiles"]
        lines.append(f"  values       min {_fmt(v['min'])}  max {_fmt(v['max'])}  mean {_fmt(v['mean'])}  "
                     f"std {_fmt(v['std'])}")
        lines.append("  percentiles  " + "  ".join(f"{k} {_fmt(x)}" for k, x in pct.items())
                     + f"  (from {v['percentile_sample_pixels']} sampled pixels)")
        for ch in v.get("per_channel", []):
            lines.append(f"    channel {ch['channel']}: min {_fmt(ch['min'])}  max {_fmt(ch['max'])}  "
                         f"mean {_fmt(ch['mean'])}  std {_fmt(ch['std'])}")
    b = info["bad_rows"]
    lines.append(f"  bad rows     {b['total']}" + (f" {b['by_reason']}" if b["total"] else ""))
    for e in b["examples"]:
        lines.append(f"    {e['chip_id']} ({e['shard']}): {e['reason']} {e['detail']}")
    q = info["quarantine"]
    lines.append(f"  quarantine   {q['total']} input(s) set aside at ingest"
                 + (f" {q['by_reason']}" if q["total"] else ""))
    for e in q["examples"]:
        lines.append(f"    {e.get('source')}: {e.get('reason')} {e.get('detail', '')}".rstrip())
    meta = {k: m for k, m in info["metadata"].items() if m["non_null"]}
    if meta:
        parts = []
        for k, m in meta.items():
            extra = f" [{_fmt(m['min'])}, {_fmt(m['max'])}]" if "min" in m else (
                f" {m['top_values']}" if "top_values" in m else "")
            parts.append(f"{k}: {m['non_null']}{extra}")
        lines.append("  metadata     " + "; ".join(parts))
    st = {k: val for k, val in info["stats"].items() if not isinstance(val, (list, dict))}
    if st:
        lines.append("  ingest stats " + ", ".join(f"{k}={val}" for k, val in st.items()))
    if info["problems"]:
        lines.append(f"  PROBLEMS ({len(info['problems'])}):")
        lines.extend(f"    - {p}" for p in info["problems"])
    else:
        lines.append("  problems     none")
    return "\n".join(lines)


__all__ = ["inspect_dataset", "format_inspection"]
