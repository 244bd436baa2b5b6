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
from sarjepa_dist.data.shards import (
    METADATA_COLUMNS, BadChip, Manifest, ShardInfo, decode_checked, read_manifest,
)

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


def _shape_key(shape: list[int] | None, dtype: str | None) -> str:
    return f"{'x'.join(str(s) for s in (shape or []))} {dtype}"


class _MetadataStats:
    """Per metadata column: rows that have a value, the range of numbers, the common strings."""

    def __init__(self) -> None:
        self.non_null: Counter[str] = Counter()
        self.numeric_range: dict[str, list[float]] = {}
        self.strings: dict[str, Counter[str]] = {}

    def add(self, cols: dict[str, list[Any]], i: int) -> None:
        for c in METADATA_COLUMNS:
            v = cols[c][i]
            if v is None:
                continue
            self.non_null[c] += 1
            if isinstance(v, (int, float)):
                lo_hi = self.numeric_range.setdefault(c, [float(v), float(v)])
                lo_hi[0], lo_hi[1] = min(lo_hi[0], float(v)), max(lo_hi[1], float(v))
            elif c != "source_path":
                self.strings.setdefault(c, Counter())[str(v)] += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in METADATA_COLUMNS:
            m: dict[str, Any] = {"non_null": int(self.non_null.get(c, 0))}
            if c in self.numeric_range:
                m["min"], m["max"] = self.numeric_range[c]
            if c in self.strings:
                m["top_values"] = dict(self.strings[c].most_common(5))
                m["distinct"] = len(self.strings[c])
            out[c] = m
        return out


class _Scan:
    """One pass over a dataset's shards, row by row, trusting only the bytes; ``problems`` collects
    a sentence per inconsistency found."""

    def __init__(self, root: str, manifest: Manifest, max_rows: int | None) -> None:
        self.root, self.manifest, self.max_rows = root, manifest, max_rows
        self.expected_shape = tuple(manifest.chip_shape)
        self.problems: list[str] = []
        self.shards: list[dict[str, Any]] = []
        self.values = _ValueStats()
        self.metadata = _MetadataStats()
        self.per_class: Counter[str] = Counter()
        self.shapes: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()
        self.bad_examples: list[dict[str, Any]] = []
        self.label_mismatch = 0
        self.seen_ids: set[str] = set()
        self.duplicates = 0
        self.rows = 0
        self.stopped_early = self.read_errors = False

    @property
    def row_limit_reached(self) -> bool:
        return self.max_rows is not None and self.rows >= self.max_rows

    @property
    def complete(self) -> bool:
        return not (self.stopped_early or self.read_errors)

    def run(self) -> "_Scan":
        for info in self.manifest.shards:
            if self.row_limit_reached:
                self.stopped_early = True
                break
            self.scan_shard(info)
        self.check_totals()
        return self

    def scan_shard(self, info: ShardInfo) -> None:
        entry: dict[str, Any] = {"path": info.path, "rows_manifest": info.rows, "bytes": info.bytes}
        self.shards.append(entry)
        parquet = self._open_shard(info, entry)
        if parquet is None:
            return
        found = 0
        for batch in parquet.iter_batches(batch_size=512):
            cols = batch.to_pydict()
            n = batch.num_rows if self.max_rows is None else min(batch.num_rows, self.max_rows - self.rows)
            for i in range(n):
                self.add_row(cols, i, info.path)
            found += n
            if self.row_limit_reached:
                break
        entry["rows_found"] = found
        if found < info.rows and self.row_limit_reached:
            self.stopped_early = True  # the row limit cut this shard short
        elif found != info.rows:
            self.problems.append(f"shard {info.path}: {found} rows, the manifest says {info.rows}")

    def _open_shard(self, info: ShardInfo, entry: dict[str, Any]) -> pq.ParquetFile | None:
        """The shard as a Parquet file, its sha256 checked; None (and a problem) when unreadable."""
        try:
            payload = storage.read_bytes(storage.join(self.root, info.path))
        except OSError as exc:
            entry["error"] = storage.redact(str(exc))
            self.problems.append(f"shard {info.path} cannot be read: {entry['error']}")
            self.read_errors = True
            return None
        entry["sha256_ok"] = hashlib.sha256(payload).hexdigest() == info.sha256
        if not entry["sha256_ok"]:
            self.problems.append(f"shard {info.path}: sha256 differs from the manifest (changed or truncated)")
        try:
            return pq.ParquetFile(io.BytesIO(payload))
        except Exception as exc:  # pyarrow raises several types for corrupt files
            entry["error"] = f"not a readable Parquet file ({exc})"
            self.problems.append(f"shard {info.path}: {entry['error']}")
            self.read_errors = True
            return None

    def add_row(self, cols: dict[str, list[Any]], i: int, shard_path: str) -> None:
        self.rows += 1
        cid = cols["chip_id"][i]
        if cid in self.seen_ids:
            self.duplicates += 1
        self.seen_ids.add(cid)
        shape, dtype = cols["chip_shape"][i], cols["chip_dtype"][i]
        self.shapes[_shape_key(shape, dtype)] += 1
        label, cname = cols["label"][i], cols["class_name"][i]
        self.per_class[cname if cname is not None else "<unlabelled>"] += 1
        names = self.manifest.class_names
        if label is not None and names and (not 0 <= label < len(names) or names[label] != cname):
            self.label_mismatch += 1
        self.metadata.add(cols, i)
        try:
            chip = decode_checked(cols["chip"][i], shape, dtype, self.expected_shape)
        except BadChip as exc:
            self.bad[exc.reason] += 1
            if len(self.bad_examples) < MAX_EXAMPLES:
                self.bad_examples.append({"chip_id": cid, "shard": shard_path, "reason": exc.reason,
                                          "detail": exc.detail})
            return
        self.values.add(chip)

    def check_totals(self) -> None:
        """Compare what the whole scan found with the manifest's claims."""
        manifest = self.manifest
        if self.complete and self.rows != manifest.num_chips:
            self.problems.append(f"{self.rows} rows in the shards, the manifest says "
                                 f"num_chips = {manifest.num_chips}")
        if self.complete and manifest.per_class_counts != dict(self.per_class):
            self.problems.append(f"per-class counts differ from the manifest: found "
                                 f"{dict(sorted(self.per_class.items()))}, manifest {manifest.per_class_counts}")
        if self.bad:
            self.problems.append(f"{sum(self.bad.values())} rows fail decoding/validation: "
                                 f"{dict(sorted(self.bad.items()))}")
        if self.duplicates:
            self.problems.append(f"{self.duplicates} duplicate chip_id values")
        if self.label_mismatch:
            self.problems.append(f"{self.label_mismatch} rows whose label and class_name disagree with class_names")
        expected = _shape_key(manifest.chip_shape, manifest.chip_dtype)
        other_shapes = {k: v for k, v in self.shapes.items() if k != expected}
        if other_shapes:
            self.problems.append(f"rows with a shape/dtype other than the manifest's: {other_shapes}")


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
    scan = _Scan(uri, manifest, max_rows).run()
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
            "rows_scanned": scan.rows, "complete": scan.complete, "max_rows": max_rows, "shards": scan.shards,
            "shapes": dict(scan.shapes), "duplicate_chip_ids": scan.duplicates,
            "label_mismatches": scan.label_mismatch,
        },
        "counts": {"per_class": dict(sorted(scan.per_class.items())), "total": scan.rows},
        "values": scan.values.summary(),
        "bad_rows": {"total": sum(scan.bad.values()), "by_reason": dict(sorted(scan.bad.items())),
                     "examples": scan.bad_examples},
        "quarantine": _summarise_quarantine(list(manifest.quarantine)),
        "metadata": scan.metadata.summary(),
        "stats": dict(manifest.stats),
        "problems": scan.problems,
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
