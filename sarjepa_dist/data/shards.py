"""Chip shards: Parquet files plus a ``manifest.json``; readable by plain pyarrow/pandas/DuckDB.

Layout of a dataset at ``DEST`` (local or ``s3://``)::

    DEST/manifest.json                 the only entry point; written last, atomically
    DEST/data-<version>/shard-00000.parquet ...

A row holds one chip as raw little-endian bytes with its shape and dtype beside it, so any
Parquet reader can decode it without this package::

    np.frombuffer(row.chip, dtype=row.chip_dtype).reshape(row.chip_shape)   # C x H x W

Re-writing a dataset writes a new ``data-<version>/`` folder and then swaps the manifest, so a
reader never sees a half-written dataset; older versions are removed after the swap.

One writer at a time: ``ShardWriter`` used as a context manager holds ``DEST/.sarjepa-writer.lock``
(``WriterLock``: owner, host, pid, expiry) while it writes, so a second writer into the same DEST
fails at once with ``DatasetLockedError`` naming the owner, instead of deleting the first one's
version folder when it commits.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sarjepa_dist import storage
from sarjepa_dist.errors import SarjepaError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SUPPORTED_DTYPES = ("uint8", "uint16", "float32", "float64", "int16", "uint32")

CHIP_SCHEMA = pa.schema([
    pa.field("chip_id", pa.string(), nullable=False),
    pa.field("chip", pa.binary(), nullable=False),
    pa.field("chip_shape", pa.list_(pa.int32()), nullable=False),
    pa.field("chip_dtype", pa.string(), nullable=False),
    pa.field("label", pa.int32()),
    pa.field("class_name", pa.string()),
    pa.field("depression_deg", pa.float32()),
    pa.field("azimuth_deg", pa.float32()),
    pa.field("sensor", pa.string()),
    pa.field("source_path", pa.string()),
])
METADATA_COLUMNS = ("depression_deg", "azimuth_deg", "sensor", "source_path")


class ShardError(SarjepaError, ValueError):
    """A dataset or row is malformed; the message names the file and row."""


class DatasetLockedError(SarjepaError):
    """Another writer holds the dataset's writer lock; the message names it and the lock file."""


class BadChip(ValueError):
    """One chip fails validation. ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- chip validation

BAD_REASONS = ("undecodable", "wrong_shape", "nan_or_inf", "negative_amplitude", "all_zero", "unreadable")


def check_chip(chip: np.ndarray, expected_shape: tuple[int, ...] | None = None) -> None:
    """Raise ``BadChip`` when ``chip`` (C x H x W amplitude) cannot be trained on."""
    if chip.ndim != 3:
        raise BadChip("wrong_shape", f"expected C x H x W, got shape {tuple(chip.shape)}")
    if expected_shape is not None and tuple(chip.shape) != tuple(expected_shape):
        raise BadChip("wrong_shape", f"expected {tuple(expected_shape)}, got {tuple(chip.shape)}")
    if chip.dtype.kind == "f":
        if not np.isfinite(chip).all():
            raise BadChip("nan_or_inf", f"{int((~np.isfinite(chip)).sum())} non-finite values")
    if chip.dtype.kind in "fi" and (chip < 0).any():
        raise BadChip("negative_amplitude", f"min {chip.min()!r}; amplitudes must be >= 0")
    if not chip.any():
        raise BadChip("all_zero", "every pixel is zero")


def encode_chip(chip: np.ndarray) -> tuple[bytes, list[int], str]:
    chip = np.asarray(chip)
    if chip.dtype.name not in SUPPORTED_DTYPES:
        raise ShardError(f"chip dtype {chip.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    little = chip.astype(chip.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(little).tobytes(), [int(s) for s in chip.shape], chip.dtype.name


LZ4_MIN_SAVING = 0.03  # a float chip column stays lz4 only when lz4 saves at least this share of its bytes
CODEC_SAMPLE_BYTES = 4 * 1024 * 1024  # chip bytes a shard's codec choice compresses as a trial


def chip_compression(dtype: str, sample: bytes | None = None) -> str:
    """The Parquet codec of the ``chip`` column for chips of ``dtype``.

    Integer chips (quantised amplitude, e.g. MSTAR's uint8): zstd, which saves about a quarter of
    the bytes for ~11 µs more decoding a 128² chip. Floating-point chips: lz4, because zstd barely
    compresses float speckle (11% on 128² float32 chips) and costs 2.6× lz4's decoding time there
    (70 against 27 µs a chip, the largest single cost of a Ray Data read task) — and none at all
    when lz4 saves less than ``LZ4_MIN_SAVING`` of a ``sample`` of the chips' bytes: on speckle it
    saves nothing and still costs ~9 µs a 128² chip to read (36.8 against 27.7 µs, every epoch),
    while chips with no-data borders or masks keep it (it takes ~90% off those). Every other
    column is small and stays zstd."""
    if np.dtype(dtype).kind not in "fc":
        return "zstd"
    if sample is None or len(sample) == 0:
        return "lz4"
    packed = pa.compress(sample, codec="lz4", asbytes=False)
    return "lz4" if packed.size <= (1.0 - LZ4_MIN_SAVING) * len(sample) else "none"


def _chip_sample(table: pa.Table) -> bytes:
    """The first chips' bytes, about ``CODEC_SAMPLE_BYTES`` of them."""
    out, size = [], 0
    for value in table.column("chip"):
        data = value.as_py()
        if data is None:
            continue
        out.append(data)
        size += len(data)
        if size >= CODEC_SAMPLE_BYTES:
            break
    return b"".join(out)


def encode_shard(table: pa.Table, row_group_rows: int) -> bytes:
    """A non-empty ``CHIP_SCHEMA`` table (one chip dtype, as every dataset has) → the bytes of one
    Parquet shard file."""
    chip_codec = chip_compression(table.column("chip_dtype")[0].as_py(), _chip_sample(table))
    # per-column codecs are keyed by Parquet leaf path: a list column's leaf is "<name>.list.element"
    leaves = {f.name: f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name for f in table.schema}
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_rows,
                   compression={leaf: chip_codec if name == "chip" else "zstd" for name, leaf in leaves.items()},
                   use_dictionary=["chip_dtype", "class_name", "sensor"])
    return sink.getvalue()


def decode_chip(data: bytes, shape: Iterable[int], dtype: str) -> np.ndarray:
    """Bytes → C x H x W array; raises ``BadChip('undecodable')`` when they do not fit."""
    shape = tuple(int(s) for s in shape)
    try:
        np_dtype = np.dtype(dtype).newbyteorder("<")
    except TypeError as exc:
        raise BadChip("undecodable", f"unknown dtype {dtype!r}") from exc
    expected = math.prod(shape) * np_dtype.itemsize  # math.prod: np.prod costs ~5 µs a row
    if data is None or len(data) != expected:
        got = 0 if data is None else len(data)
        raise BadChip("undecodable", f"{got} bytes for shape {shape} {dtype} (needs {expected})")
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def decode_checked(data: Any, shape: Any, dtype: Any,
                   expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One shard row's ``chip`` / ``chip_shape`` / ``chip_dtype`` → a chip ``check_chip`` accepts.

    Every way a row can fail (missing shape or dtype, bytes that do not fit, a shape numpy refuses,
    a chip that fails ``check_chip``) raises ``BadChip`` with its reason.
    """
    if shape is None or dtype is None:
        raise BadChip("undecodable", "chip_shape or chip_dtype is missing")
    try:
        chip = decode_chip(data, shape, dtype)
        check_chip(chip, expected_shape)
    except BadChip:
        raise
    except (ValueError, TypeError) as exc:  # e.g. a negative dimension in chip_shape
        raise BadChip("undecodable", str(exc)) from exc
    return chip


# --------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root
    rows: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    schema_version: int
    dataset_id: str  # sha256 over the shards' hashes: the dataset's identity in lineage records
    num_chips: int
    chip_shape: list[int]
    chip_dtype: str
    class_names: list[str]
    per_class_counts: dict[str, int]
    shards: list[ShardInfo]
    source: str
    crop_policy: dict[str, Any]
    command: list[str]
    created_at: str
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["shards"] = [s.__dict__ for s in self.shards]
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ShardError(f"{where}: not valid JSON ({exc})") from exc
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ShardError(f"{where}: schema_version {d.get('schema_version')!r} is not supported "
                             f"(this package reads {SCHEMA_VERSION})")
        try:
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (TypeError, KeyError) as exc:
            raise ShardError(f"{where}: malformed manifest ({exc})") from exc


def read_manifest(root: str) -> Manifest:
    uri = storage.join(root, MANIFEST_NAME)
    if not storage.exists(uri):
        raise ShardError(f"{root}: no {MANIFEST_NAME} here; is this a dataset made by "
                         f"'sarjepa ingest' or 'sarjepa synth'?")
    return Manifest.from_json(storage.read_text(uri), uri)


def shard_uris(root: str, manifest: Manifest | None = None) -> list[str]:
    manifest = manifest or read_manifest(root)
    return [storage.join(root, s.path) for s in manifest.shards]


def scrub_command(argv: list[str]) -> list[str]:
    return [storage.redact(a) for a in argv]


# --------------------------------------------------------------------------- writing


LOCK_NAME = ".sarjepa-writer.lock"
LOCK_TTL_S = 3600.0  # a lock not refreshed for this long is taken to be a dead writer's
S3_LOCK_SETTLE_S = 1.0  # S3: wait before reading a written lock back (see WriterLock.acquire)


class WriterLock:
    """The lock object ``DEST/.sarjepa-writer.lock``: JSON with owner, host, pid, token and expiry.

    ``acquire`` refuses (``DatasetLockedError``) while another writer's unexpired lock is there.
    Locally the lock file is created with O_EXCL (atomic). S3 has no create-if-absent here
    (pyarrow), so the lock is written, left ``S3_LOCK_SETTLE_S`` to settle and read back: of two
    writers whose writes land within that time, the one whose write landed last wins and the other
    is refused. ``refresh`` pushes the expiry on (the writer calls it at every shard), ``release``
    removes the lock if it is still ours. An expired lock (a writer killed without releasing) is
    taken over.
    """

    def __init__(self, root: str, *, ttl_s: float = LOCK_TTL_S, owner: str | None = None):
        self.root = str(root)
        self.uri = storage.join(self.root, LOCK_NAME)
        self.ttl_s = ttl_s
        self.owner = owner or " ".join(scrub_command(sys.argv[:3])) or "python"
        self.token = uuid.uuid4().hex
        self.held = False

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "acquired_at": now, "expires_at": now + self.ttl_s}

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_text(self.uri))
        except storage.StorageError:
            return None if not storage.exists(self.uri) else {"owner": "<unreadable lock>", "expires_at": 0}
        except json.JSONDecodeError:
            return {"owner": "<unreadable lock>", "expires_at": 0}

    def _refuse(self, other: dict[str, Any]) -> DatasetLockedError:
        until = _dt.datetime.fromtimestamp(float(other.get("expires_at", 0)), _dt.timezone.utc)
        return DatasetLockedError(
            f"{storage.redact(self.root)}: another writer is writing this dataset ({other.get('owner')!r} on "
            f"{other.get('host')}, pid {other.get('pid')}); its lock {storage.redact(self.uri)} holds until "
            f"{until.isoformat(timespec='seconds')}. Wait for it to finish, write to another DEST, or, if "
            f"that writer is dead, delete the lock file")

    def acquire(self) -> "WriterLock":
        other = self._read()
        if other is not None and other.get("token") != self.token and float(other.get("expires_at", 0)) > time.time():
            raise self._refuse(other)
        record = json.dumps(self._record())
        fs, path = storage.resolve(self.uri)
        if isinstance(fs, pafs.LocalFileSystem) and other is None:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise self._refuse(self._read() or {}) from None
            except OSError as exc:  # e.g. DEST under a file: the same message as any other failed write
                raise storage.StorageError(f"{self.root}: cannot write: {storage.redact(str(exc))}") from exc
            with os.fdopen(fd, "w") as f:
                f.write(record)
        else:
            storage.write_text(self.uri, record)
            if storage.is_s3(self.uri):
                time.sleep(S3_LOCK_SETTLE_S)
        now_there = self._read()
        if now_there is None or now_there.get("token") != self.token:
            raise self._refuse(now_there or {})
        self.held = True
        return self

    def refresh(self) -> None:
        if self.held:
            storage.write_text(self.uri, json.dumps(self._record()))

    def release(self) -> None:
        if self.held:
            current = self._read()
            if current is not None and current.get("token") == self.token:
                storage.delete_file(self.uri)
            self.held = False


@dataclass
class ChipRecord:
    chip_id: str
    chip: np.ndarray  # C x H x W
    label: int | None = None
    class_name: str | None = None
    depression_deg: float | None = None
    azimuth_deg: float | None = None
    sensor: str | None = None
    source_path: str | None = None


class ShardWriter:
    """Accumulate chips, cut Parquet shards at ~``target_shard_mib``, then ``commit`` a manifest.

    Use as a context manager; leaving the block with an exception leaves the previous dataset (if
    any) untouched and removes the partial version folder. The block holds the dataset's
    ``WriterLock`` (``exclusive=False``: no lock, for writers that coordinate themselves).
    """

    def __init__(self, root: str, *, class_names: list[str] | None = None, source: str = "",
                 crop_policy: dict[str, Any] | None = None, target_shard_mib: float = 128.0,
                 command: list[str] | None = None, row_group_rows: int = 1024, exclusive: bool = True):
        if target_shard_mib <= 0:
            raise ShardError(f"target_shard_mib = {target_shard_mib} must be > 0")
        self.root = str(root)
        self.class_names = list(class_names or [])
        self.source = source
        self.crop_policy = dict(crop_policy or {})
        self.target_bytes = int(target_shard_mib * 1024 * 1024)
        self.command = scrub_command(list(command if command is not None else sys.argv))
        self.row_group_rows = row_group_rows
        self.version = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.version_dir = f"data-{self.version}"
        self.quarantine: list[dict[str, Any]] = []
        self.stats: dict[str, Any] = {}
        self._rows: dict[str, list] = {f.name: [] for f in CHIP_SCHEMA}
        self._pending_bytes = 0
        self._shards: list[ShardInfo] = []
        self._counts: dict[str, int] = {}
        self._num = 0
        self._shape: list[int] | None = None
        self._dtype: str | None = None
        self._committed = False
        self.lock = WriterLock(self.root) if exclusive else None

    # -- context manager
    def __enter__(self) -> "ShardWriter":
        if self.lock is not None:
            self.lock.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            # leaving without commit (error or not) must not leave an orphaned version folder
            if not self._committed:
                self.abort()
        finally:
            if self.lock is not None:
                self.lock.release()

    # -- adding
    def add(self, rec: ChipRecord) -> None:
        data, shape, dtype = encode_chip(rec.chip)
        if self._shape is None:
            self._shape, self._dtype = shape, dtype
        elif shape != self._shape or dtype != self._dtype:
            raise ShardError(f"chip {rec.chip_id}: shape {shape} {dtype} differs from the dataset's "
                             f"{self._shape} {self._dtype}; one dataset holds one chip shape")
        if rec.label is not None and self.class_names and not 0 <= rec.label < len(self.class_names):
            raise ShardError(f"chip {rec.chip_id}: label {rec.label} outside 0..{len(self.class_names) - 1}")
        row = {
            "chip_id": rec.chip_id, "chip": data, "chip_shape": shape, "chip_dtype": dtype,
            "label": rec.label, "class_name": rec.class_name,
            "depression_deg": rec.depression_deg, "azimuth_deg": rec.azimuth_deg,
            "sensor": rec.sensor, "source_path": rec.source_path,
        }
        for k, v in row.items():
            self._rows[k].append(v)
        self._pending_bytes += len(data)
        self._num += 1
        key = rec.class_name if rec.class_name is not None else "<unlabelled>"
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._pending_bytes >= self.target_bytes:
            self._flush()

    def add_quarantined(self, source: str, reason: str, detail: str = "") -> None:
        self.quarantine.append({"source": storage.redact(source), "reason": reason, "detail": storage.redact(detail)})

    def _flush(self) -> None:
        if not self._rows["chip_id"]:
            return
        table = pa.Table.from_pydict(self._rows, schema=CHIP_SCHEMA)
        payload = encode_shard(table, self.row_group_rows)
        rel = f"{self.version_dir}/shard-{len(self._shards):05d}.parquet"
        storage.write_bytes(storage.join(self.root, rel), payload)
        self._shards.append(ShardInfo(rel, table.num_rows, hashlib.sha256(payload).hexdigest(), len(payload)))
        self._rows = {f.name: [] for f in CHIP_SCHEMA}
        self._pending_bytes = 0
        if self.lock is not None:
            self.lock.refresh()

    # -- finishing
    def commit(self) -> Manifest:
        self._flush()
        if self._num == 0:
            self.abort()
            raise ShardError(f"{self.root}: no good chips to write ({len(self.quarantine)} quarantined)")
        dataset_id = hashlib.sha256("".join(s.sha256 for s in self._shards).encode()).hexdigest()
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, dataset_id=dataset_id, num_chips=self._num,
            chip_shape=list(self._shape or []), chip_dtype=self._dtype or "",
            class_names=self.class_names, per_class_counts=dict(sorted(self._counts.items())),
            shards=self._shards, source=storage.redact(self.source), crop_policy=self.crop_policy,
            command=self.command,
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            quarantine=self.quarantine, stats=self.stats,
        )
        storage.write_text(storage.join(self.root, MANIFEST_NAME), manifest.to_json())
        self._committed = True
        self._remove_stale_versions()
        return manifest

    def abort(self) -> None:
        try:
            storage.delete_dir(storage.join(self.root, self.version_dir))
        except OSError:
            pass

    def _remove_stale_versions(self) -> None:
        for d in storage.list_dirs(self.root):
            name = os.path.basename(d.rstrip("/"))
            if name.startswith("data-") and name != self.version_dir:
                storage.delete_dir(d)


# --------------------------------------------------------------------------- reading (no Ray)


def read_table(root: str, columns: list[str] | None = None, verify: bool = False) -> pa.Table:
    """The whole dataset as one Arrow table (small/medium datasets; Ray Data streams big ones)."""
    manifest = read_manifest(root)
    tables = []
    for info in manifest.shards:
        uri = storage.join(root, info.path)
        payload = storage.read_bytes(uri)
        if verify and hashlib.sha256(payload).hexdigest() != info.sha256:
            raise ShardError(f"{uri}: sha256 differs from the manifest; the shard was changed or truncated")
        try:
            tables.append(pq.read_table(io.BytesIO(payload), columns=columns))
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise ShardError(f"{uri}: not a readable Parquet file ({exc})") from exc
    return pa.concat_tables(tables) if tables else CHIP_SCHEMA.empty_table()


def iter_rows(root: str) -> Iterator[dict[str, Any]]:
    for uri in shard_uris(root):
        fs, path = storage.resolve(uri)
        pf = pq.ParquetFile(fs.open_input_file(path))
        for batch in pf.iter_batches(batch_size=1024):
            yield from batch.to_pylist()


@dataclass
class ChipArrays:
    chips: np.ndarray  # N x C x H x W, the dataset's dtype
    labels: np.ndarray  # N int64, -1 where unlabelled
    chip_ids: list[str]
    metadata: dict[str, np.ndarray]  # METADATA_COLUMNS as arrays (NaN / None where missing)
    class_names: list[str]
    bad: dict[str, int]  # rows skipped while loading, by reason


def load_arrays(root: str, max_rows: int | None = None) -> ChipArrays:
    """Decode a (small) dataset into memory, counting bad rows by reason instead of failing."""
    manifest = read_manifest(root)
    table = read_table(root)
    if max_rows is not None:
        table = table.slice(0, max_rows)
    chips, labels, ids, keep = [], [], [], []
    bad: dict[str, int] = {}
    cols = table.to_pydict()
    for i in range(table.num_rows):
        try:
            arr = decode_checked(cols["chip"][i], cols["chip_shape"][i], cols["chip_dtype"][i],
                                 tuple(manifest.chip_shape))
        except BadChip as exc:
            bad[exc.reason] = bad.get(exc.reason, 0) + 1
            continue
        chips.append(arr)
        labels.append(-1 if cols["label"][i] is None else cols["label"][i])
        ids.append(cols["chip_id"][i])
        keep.append(i)
    meta = {}
    for c in METADATA_COLUMNS:
        vals = [cols[c][i] for i in keep]
        if c in ("depression_deg", "azimuth_deg"):
            meta[c] = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        else:
            meta[c] = np.array(vals, dtype=object)
    shape = (0, *manifest.chip_shape)
    stacked = np.stack(chips) if chips else np.zeros(shape, dtype=manifest.chip_dtype)
    return ChipArrays(stacked, np.asarray(labels, dtype=np.int64), ids, meta, list(manifest.class_names), bad)
