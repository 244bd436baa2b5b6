"""What every ingest shares: the dtype/geometry policy, listing inputs, a bounded thread pool, the
tally of good and bad inputs, and ``commit_chips``, the common tail (write → quarantine → report).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import posixpath
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from sarjepa_dist import storage
from sarjepa_dist.data.shards import BadChip, ChipRecord, Manifest, ShardWriter, check_chip
from sarjepa_dist.errors import SarjepaError

log = logging.getLogger(__name__)

MAX_CHANNELS = 64
MAX_LOGGED_BAD = 20  # individual warnings per ingest; the rest are only counted (all are in the manifest)
MAX_EXAMPLES_IN_ERROR = 5
PROGRESS_EVERY_S = 5.0

T = TypeVar("T")
R = TypeVar("R")



class IngestError(SarjepaError, ValueError):
    """The ingest was refused (too many bad chips, no usable input); nothing was committed."""


@dataclass
class IngestReport:
    manifest: Manifest
    num_good: int
    num_bad: int
    num_padded: int
    bad_by_reason: dict[str, int]
    dest: str


# --------------------------------------------------------------------------- dtype / geometry policy


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a chip of source dtype ``dtype`` is stored as (decided by dtype alone, never values).

    uint8/uint16/float32 stay; bool → uint8; every other integer or float → float32 (exact for
    integers below 2**24; negative ones are then quarantined as ``negative_amplitude``); complex →
    float32 magnitude. Deciding from the dtype alone keeps one file's chips in one dtype.
    """
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype.kind == "u" and dtype.itemsize <= 2:
        return np.dtype(dtype.name)  # native byte order
    if dtype.kind in "iufc":
        return np.dtype(np.float32)
    raise BadChip("undecodable", f"unsupported pixel dtype {dtype}")


def to_storage(arr: np.ndarray) -> np.ndarray:
    """``arr`` in its storage dtype (complex → magnitude), native byte order."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "c":
        arr = np.abs(arr)
    return arr.astype(storage_dtype(arr.dtype), copy=False)


def promote_dtypes(dtypes: Iterable[np.dtype | str]) -> np.dtype:
    """The narrowest of uint8 ⊂ uint16 ⊂ float32 that holds every dtype in ``dtypes`` exactly."""
    dts = [np.dtype(d) for d in dtypes]
    if not dts:
        raise ValueError("no dtypes to promote")
    return np.dtype(np.result_type(*dts))


def min_paddable_side(size: int) -> int:
    """The smallest side that one mirror reflection (``pad <= side - 1`` each way) pads to ``size``."""
    side = 1
    while size - side - (size - side) // 2 > side - 1:
        side += 1
    return side


def center_crop_or_pad(chip: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    """Centre-crop C×H×W ``chip`` to ``size``×``size``; reflection-pad axes that are smaller.

    Padding is split symmetrically (the extra pixel, if odd, goes after) so the chip's centre stays
    the crop centre. Reflection needs ``pad <= dim - 1`` on each side; a chip smaller than that
    would be mirrored more than once and grow structure that is not in the data, so it is refused
    as ``wrong_shape``. Returns the chip and whether it was padded.
    """
    if chip.ndim != 3:
        raise BadChip("wrong_shape", f"expected C×H×W, got shape {tuple(chip.shape)}")
    padded = False
    slices: list[slice] = [slice(None)]
    pads = [(0, 0)]
    for dim in chip.shape[1:]:
        if dim >= size:
            start = (dim - size) // 2
            slices.append(slice(start, start + size))
            pads.append((0, 0))
        else:
            before, after = (size - dim) // 2, size - dim - (size - dim) // 2
            if after > dim - 1:
                raise BadChip("wrong_shape", f"{chip.shape[1]}×{chip.shape[2]} is too small to pad to "
                                             f"{size}×{size} by one reflection (smallest side that can "
                                             f"be padded: {min_paddable_side(size)})")
            slices.append(slice(None))
            pads.append((before, after))
            padded = True
    out = chip[tuple(slices)]
    if padded:
        out = np.pad(out, pads, mode="reflect")
    return np.ascontiguousarray(out), padded



def prepare_chip(chip: np.ndarray, size: int | None = None,
                 expected_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, bool]:
    """``chip`` in its storage dtype, centre-cropped or padded to ``size`` (when given), checked.

    Returns the chip and whether it was padded; raises ``BadChip`` when it cannot be trained on.
    """
    chip = to_storage(chip)
    padded = False
    if size is not None:
        chip, padded = center_crop_or_pad(chip, size)
    check_chip(chip, expected_shape)
    return chip, padded



# --------------------------------------------------------------------------- small helpers


def extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def relative_name(root: str, uri: str) -> str:
    """``uri`` relative to ``root`` with '/' separators (both as ``storage.list_files`` gives them)."""
    fs, base = storage.resolve(root)
    path = uri[len("s3://"):] if storage.is_s3(uri) else uri
    if storage.is_s3(root):
        rel = posixpath.relpath(path, base) if path != base else posixpath.basename(path)
    else:
        rel = os.path.relpath(path, base) if path != base else os.path.basename(path)
    return rel.replace(os.sep, "/")


def list_inputs(src: str, extensions: tuple[str, ...]) -> tuple[list[str], int]:
    """Files under ``src`` (or ``src`` itself) with one of ``extensions``; also the number ignored."""
    if not storage.exists(src):
        raise IngestError(f"{storage.redact(src)}: no such file or folder")
    files = storage.list_files(src, recursive=True)
    keep, ignored = [], 0
    for f in files:
        parts = relative_name(src, f).split("/")
        # hidden files and folders (.DS_Store, .ipynb_checkpoints/, editor temporaries) are not data
        if any(p.startswith(".") for p in parts) or extension(parts[-1]) not in extensions:
            ignored += 1
            continue
        keep.append(f)
    return keep, ignored


# The executor of a distributed ingest (``distributed.ray_ingest``); None: this process does the work.
_backend: Any = None


@contextlib.contextmanager
def use_backend(backend: Any) -> Iterator[None]:
    """Route ``ordered_map`` and the shard writes of ``commit_chips`` to ``backend`` inside the block."""
    global _backend
    before, _backend = _backend, backend
    try:
        yield
    finally:
        _backend = before


def distributed() -> bool:
    """Whether ``ordered_map`` runs its items in another process (inside ``use_backend``)."""
    return _backend is not None


def ordered_map(fn: Callable[[T], R], items: list[T], workers: int, window: int = 64,
                items_per_task: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, with at most ``window`` results in flight.

    Reading and decoding (Pillow, zlib, S3 GETs) release the GIL, so a few threads overlap I/O and
    decode; the bounded window keeps memory flat however many files there are. Inside
    ``use_backend`` the backend runs them (Ray tasks, ``items_per_task`` a task), still in order.
    """
    if _backend is not None:
        yield from _backend.ordered_map(fn, items, items_per_task)
        return
    if workers <= 1:
        yield from map(fn, items)
        return
    ex = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest")
    try:
        pending: list[cf.Future] = []
        it = iter(items)
        for item in it:
            pending.append(ex.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(fn, nxt))
            yield fut.result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def localized(uri: str) -> Iterator[str]:
    """A local path for ``uri``: itself when local, else a streamed copy in a temporary folder.

    Scenes and array stacks are memory-mapped, which needs a local file; copying in 16 MiB chunks
    keeps memory flat for multi-GB objects.
    """
    if not storage.is_s3(uri):
        yield storage.resolve(uri)[1]
        return
    fs, path = storage.resolve(uri)
    with tempfile.TemporaryDirectory(prefix="sarjepa-ingest-") as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        try:
            with fs.open_input_stream(path) as src, open(local, "wb") as dst:
                while True:
                    chunk = src.read(16 * 1024 * 1024)
                    if not chunk:
                        break
                    dst.write(chunk)
        except OSError as exc:
            raise storage.StorageError(f"{storage.redact(uri)}: cannot read: {storage.redact(str(exc))}") from exc
        yield local


class Tally:
    """Good/bad/padded counts, quarantine bookkeeping and rate-limited logging for one ingest."""

    def __init__(self, what: str, src: str, src_is_file: bool = False):
        self.what = what
        self.src = storage.redact(src)
        # quarantine sources are relative names; logs prefix them with the folder they are in
        self.where = self.src.rstrip("/").rsplit("/", 1)[0] if src_is_file else self.src
        self.good = 0
        self.padded = 0
        self.bad: list[tuple[str, str, str]] = []  # (source, reason, detail)
        self.skipped: dict[str, int] = {}
        self._t0 = time.monotonic()
        self._last = self._t0

    def add_bad(self, source: str, reason: str, detail: str) -> None:
        detail = storage.redact(detail)
        self.bad.append((source, reason, detail))
        if len(self.bad) <= MAX_LOGGED_BAD:
            log.warning("%s: quarantined %s/%s: %s (%s)", self.what, self.where, source, reason, detail)
            if len(self.bad) == MAX_LOGGED_BAD:
                log.warning("%s: further bad inputs are counted, not logged one by one; "
                            "the manifest's quarantine list holds them all", self.what)

    def add_good(self, padded: bool = False) -> None:
        self.good += 1
        self.padded += int(padded)

    def bad_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(r for _, r, _ in self.bad).items()))

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def progress(self, done: int, total: int | None, unit: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        of = f"/{total}" if total is not None else ""
        log.info("%s: %d%s %s, %d good, %d bad (%.1f s)", self.what, done, of, unit, self.good,
                 len(self.bad), now - self._t0)

    def check_fraction(self, max_bad_fraction: float, dest: str) -> None:
        """Raise ``IngestError`` when bad / (good + bad) exceeds the limit or nothing is good."""
        n_bad, total = len(self.bad), self.good + len(self.bad)
        frac = n_bad / total if total else 0.0
        examples = "; ".join(f"{s} ({r}: {d})" for s, r, d in self.bad[:MAX_EXAMPLES_IN_ERROR])
        keep = f"nothing was written; the dataset at {storage.redact(dest)} (if any) is unchanged"
        if self.good == 0:
            skipped = "".join(f", {v} {k}" for k, v in self.skipped.items())
            raise IngestError(f"{self.what} from {self.src}: no good chips ({n_bad} bad, by reason "
                              f"{self.bad_by_reason()}{skipped}); first bad: {examples or 'none'}; {keep}")
        if frac > max_bad_fraction:
            raise IngestError(
                f"{self.what} from {self.src}: {n_bad} of {total} inputs are bad ({frac:.2%}), above "
                f"max_bad_fraction = {max_bad_fraction:g} ({max_bad_fraction:.2%}); by reason "
                f"{self.bad_by_reason()}; first bad: {examples}; {keep}. Fix or remove those files, or "
                f"raise --max-bad-fraction if they are expected")

    def flush_quarantine(self, writer: ShardWriter) -> None:
        for source, reason, detail in self.bad:
            writer.add_quarantined(source, reason, detail)

    def stats(self) -> dict[str, Any]:
        return {"good": self.good, "bad": len(self.bad), "padded": self.padded,
                "bad_by_reason": self.bad_by_reason(), **self.skipped,
                "elapsed_s": round(self.elapsed, 3)}

    def report(self, manifest: Manifest, dest: str) -> IngestReport:
        log.info("%s: wrote %d chips (%d bad, %d padded) to %s in %.1f s; dataset_id %s", self.what,
                 self.good, len(self.bad), self.padded, storage.redact(dest), self.elapsed,
                 manifest.dataset_id[:12])
        return IngestReport(manifest=manifest, num_good=self.good, num_bad=len(self.bad),
                            num_padded=self.padded, bad_by_reason=self.bad_by_reason(), dest=dest)


def check_fraction_arg(max_bad_fraction: float) -> None:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise IngestError(f"max_bad_fraction = {max_bad_fraction!r} is out of range; allowed: [0, 1]")


def read_npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = reader(f)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def list_sources(src: str, extensions: tuple[str, ...], missing: str) -> tuple[list[tuple[str, str]], int, bool]:
    """The input files under ``src`` as (uri, name) pairs, the number of other files ignored, and
    whether ``src`` is itself the one file. A file is named relative to ``src``, or by its base name
    when ``src`` is the file. None there: ``IngestError`` with ``missing``, a message whose
    ``{src}`` and ``{ignored}`` fields are filled in."""
    files, ignored = list_inputs(src, extensions)
    if not files:
        raise IngestError(missing.format(src=storage.redact(src), ignored=ignored))
    src_is_file = len(files) == 1 and not storage.is_dir(src)
    named = [(u, posixpath.basename(u) if src_is_file else relative_name(src, u)) for u in files]
    return named, ignored, src_is_file


def commit_chips(tally: Tally, records: Iterable[ChipRecord], *, dest: str, source: str,
                 class_names: list[str] | None, crop_policy: dict[str, Any], max_bad_fraction: float,
                 target_shard_mib: float, command: list[str] | None,
                 stats: Callable[[], dict[str, Any]]) -> IngestReport:
    """The tail every ingest shares: write ``records`` (a generator that tells ``tally`` about every
    input as it meets it), refuse when too many inputs were bad, list the quarantine, commit, report.

    ``stats`` is called once every record is written (what it reports may depend on them); a
    ``padded`` entry in ``crop_policy`` is set to the number of padded chips. Leaving with an error
    commits nothing: the previous dataset at ``dest`` stays as it was.
    """
    make_writer = ShardWriter if _backend is None else _backend.writer
    with make_writer(dest, class_names=class_names, source=source, crop_policy=crop_policy,
                     target_shard_mib=target_shard_mib, command=command) as writer:
        for record in records:
            writer.add(record)
        tally.check_fraction(max_bad_fraction, dest)
        tally.flush_quarantine(writer)
        if "padded" in crop_policy:
            writer.crop_policy = {**crop_policy, "padded": tally.padded}
        writer.stats = {**tally.stats(), **stats()}
        manifest = writer.commit()
    return tally.report(manifest, dest)
