"""Turn images, array stacks or large scenes into chip shards (``data/shards.py``).

Three front doors, one policy:

* ``ingest_images``: a class-per-folder tree (``SRC/<CLASS>/*.png|jpg|tif``) → labelled chips,
  every one centre-cropped (or reflection-padded) to ``size × size``. MSTAR chips differ in size
  by class, so without one crop size the chip size alone gives the label away (METHOD.md §5).
* ``ingest_arrays``: ``.npy``/``.npz`` stacks (N×H×W or N×C×H×W), optionally with labels.
* ``ingest_scene``: a big scene (TIFF/GeoTIFF or ``.npy``, magnitude or complex SLC) → unlabelled
  ``tile × tile`` chips at ``stride``, skipping no-data tiles. Streams: memory-mapped input,
  one row band of tiles at a time, and ``ShardWriter`` flushes shards by size.

Bad inputs (unreadable or truncated files, NaN/Inf, negative amplitudes, all-zero chips, wrong
dimensions) never stop an ingest on their own: each is logged with its file name and listed in the
manifest's ``quarantine`` with a reason. Only when the bad fraction exceeds ``max_bad_fraction``
does the ingest fail (``IngestError``) - and then nothing is committed, so the previous dataset at
``DEST`` stays intact and readable (``ShardWriter`` writes a new ``data-<version>/`` folder and
swaps ``manifest.json`` last).

Values are never rescaled: a chip keeps its source dtype (uint8 / uint16 / float32). When one
source mixes dtypes the dataset takes the narrowest dtype that holds all of them exactly
(uint8 ⊂ uint16 ⊂ float32) and the manifest's ``stats.source_dtypes`` records the mix.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import logging
import os
import posixpath
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from sarjepa_dist import storage
from sarjepa_dist.data.shards import BadChip, ChipRecord, Manifest, ShardWriter, check_chip
from sarjepa_dist.errors import SarjepaError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
ARRAY_EXTENSIONS = (".npy", ".npz")
SCENE_EXTENSIONS = (".tif", ".tiff", ".npy")
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


# --------------------------------------------------------------------------- small helpers


def _ext(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _relative(root: str, uri: str) -> str:
    """``uri`` relative to ``root`` with '/' separators (both as ``storage.list_files`` gives them)."""
    fs, base = storage.resolve(root)
    path = uri[len("s3://"):] if storage.is_s3(uri) else uri
    if storage.is_s3(root):
        rel = posixpath.relpath(path, base) if path != base else posixpath.basename(path)
    else:
        rel = os.path.relpath(path, base) if path != base else os.path.basename(path)
    return rel.replace(os.sep, "/")


def _list_inputs(src: str, extensions: tuple[str, ...]) -> tuple[list[str], int]:
    """Files under ``src`` (or ``src`` itself) with one of ``extensions``; also the number ignored."""
    if not storage.exists(src):
        raise IngestError(f"{storage.redact(src)}: no such file or folder")
    files = storage.list_files(src, recursive=True)
    keep, ignored = [], 0
    for f in files:
        parts = _relative(src, f).split("/")
        # hidden files and folders (.DS_Store, .ipynb_checkpoints/, editor temporaries) are not data
        if any(p.startswith(".") for p in parts) or _ext(parts[-1]) not in extensions:
            ignored += 1
            continue
        keep.append(f)
    return keep, ignored


def _ordered_map(fn: Callable[[T], R], items: list[T], workers: int, window: int = 64) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, in order, with at most ``window`` results in flight.

    Reading and decoding (Pillow, zlib, S3 GETs) release the GIL, so a few threads overlap I/O and
    decode; the bounded window keeps memory flat however many files there are.
    """
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
def _localize(uri: str) -> Iterator[str]:
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


class _Tally:
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


def _check_fraction_arg(max_bad_fraction: float) -> None:
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise IngestError(f"max_bad_fraction = {max_bad_fraction!r} is out of range; allowed: [0, 1]")


# --------------------------------------------------------------------------- images


_RGB_LIKE_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Image bytes → C×H×W array in its storage dtype; raises ``BadChip`` for anything unusable.

    PNG/JPEG go through Pillow, TIFF through tifffile (Pillow mishandles 16-bit and float TIFF).
    Colour images whose channels are all equal (greyscale saved as RGB, common for JPEG) become one
    channel; alpha channels are dropped (they carry no backscatter).
    """
    if not data:
        raise BadChip("undecodable", "empty file (0 bytes)")
    rgb = False
    if _ext(name) in TIFF_EXTENSIONS:
        import tifffile

        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                series = tif.series[0]
                axes = series.axes
                rgb = tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
                arr = series.asarray()
        except Exception as exc:  # tifffile raises many types for corrupt files
            raise BadChip("undecodable", f"not a readable TIFF ({type(exc).__name__}: {exc})") from exc
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr, axes = arr[0], axes[1:]
        if arr.ndim == 3 and axes.endswith("S"):
            arr = np.moveaxis(arr, -1, 0)
            if rgb and arr.shape[0] in (2, 4):  # grey+alpha or RGB+alpha
                arr = arr[:-1]
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                mode = im.mode
                if mode == "1":
                    im = im.convert("L")
                elif mode == "LA":
                    im = im.getchannel("L")
                elif mode in _RGB_LIKE_MODES:
                    im = im.convert("RGB")
                    rgb = True
                im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
                arr = np.asarray(im)
        except UnidentifiedImageError as exc:
            raise BadChip("undecodable", "not an image Pillow can identify") from exc
        except Exception as exc:  # OSError (truncated), SyntaxError, ValueError, DecompressionBombError ...
            raise BadChip("undecodable", f"{type(exc).__name__}: {exc}") from exc
        if arr.ndim == 3:
            arr = np.moveaxis(arr, -1, 0)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape) < 1 or arr.shape[0] > MAX_CHANNELS:
        raise BadChip("wrong_shape", f"expected H×W or H×W×C (C ≤ {MAX_CHANNELS}), got {tuple(arr.shape)}")
    if rgb and arr.shape[0] > 1 and (arr == arr[:1]).all():
        arr = arr[:1]
    return np.ascontiguousarray(to_storage(arr))


@dataclass
class _Decoded:
    rel: str
    chip: np.ndarray | None = None
    padded: bool = False
    reason: str = ""
    detail: str = ""


@dataclass
class _Spilled:
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    rel: str
    label: int
    class_name: str
    padded: bool


class _Spill:
    """Decoded chips parked in a local temporary file between the two passes of ``ingest_images``.

    The dataset's dtype and channel count are only known after every file is decoded (a greyscale
    JPEG may be stored as RGB; a folder may mix 8- and 16-bit files), and ``ShardWriter`` fixes them
    at the first chip. Decoding once and spilling the cropped chips keeps memory flat and reads the
    source once; the spill is as big as the dataset's raw pixels.
    """

    def __init__(self) -> None:
        self._f = tempfile.TemporaryFile(prefix="sarjepa-ingest-spill-")
        self.entries: list[_Spilled] = []

    def put(self, chip: np.ndarray, rel: str, label: int, class_name: str, padded: bool) -> None:
        data = np.ascontiguousarray(chip).tobytes()
        offset = self._f.seek(0, io.SEEK_END)
        self._f.write(data)
        self.entries.append(_Spilled(offset, len(data), chip.dtype.str, tuple(chip.shape), rel, label,
                                    class_name, padded))

    def get(self, e: _Spilled) -> np.ndarray:
        self._f.seek(e.offset)
        return np.frombuffer(self._f.read(e.nbytes), dtype=np.dtype(e.dtype)).reshape(e.shape)

    def close(self) -> None:
        self._f.close()


def ingest_images(src: str, dest: str, size: int, *, max_bad_fraction: float = 0.01,
                  target_shard_mib: float = 128.0, sensor: str | None = None,
                  command: list[str] | None = None) -> IngestReport:
    """Class-per-folder images (``SRC/<CLASS>/*.{jpg,jpeg,png,tif,tiff}``) → labelled chip shards.

    Class names are the top-level folder names, sorted, labelled 0..K-1 (a class whose every file is
    bad keeps its label, so labels do not depend on data quality). Files directly in ``SRC`` and
    other extensions are ignored (counted in ``stats.ignored_files``). Every chip is centre-cropped
    to ``size``×``size``; smaller ones are reflection-padded and counted. Pass 1 decodes, checks and
    crops every file into a local spill; pass 2 settles dtype and channel count, checks the bad
    fraction (before anything is written), then writes the shards.
    """
    _check_fraction_arg(max_bad_fraction)
    if size < 1:
        raise IngestError(f"size = {size} must be >= 1")
    what = "ingest images"
    files, ignored = _list_inputs(src, IMAGE_EXTENSIONS)
    items: list[tuple[str, str, str]] = []  # (uri, rel, class)
    for uri in files:
        rel = _relative(src, uri)
        if "/" not in rel:
            ignored += 1
            log.warning("%s: ignoring %s: not inside a class folder", what, storage.redact(uri))
            continue
        items.append((uri, rel, rel.split("/", 1)[0]))
    items.sort(key=lambda t: t[1])
    class_names = sorted({c for _, _, c in items})
    if not class_names:
        raise IngestError(f"{what}: no images under {storage.redact(src)}; expected SRC/<CLASS>/*"
                          f"{{{','.join(IMAGE_EXTENSIONS)}}} ({ignored} other files ignored)")
    label_of = {c: i for i, c in enumerate(class_names)}
    log.info("%s: %d files in %d classes under %s (%d ignored), crop %d×%d", what, len(items),
             len(class_names), storage.redact(src), ignored, size, size)

    def work(item: tuple[str, str, str]) -> _Decoded:
        uri, rel, _ = item
        try:
            data = storage.read_bytes(uri)
        except OSError as exc:
            return _Decoded(rel, reason="unreadable", detail=str(exc))
        try:
            chip = decode_image(data, rel)
            chip, padded = center_crop_or_pad(chip, size)
            check_chip(chip)
        except BadChip as exc:
            return _Decoded(rel, reason=exc.reason, detail=exc.detail)
        return _Decoded(rel, chip=chip, padded=padded)

    tally = _Tally(what, src)
    spill = _Spill()
    try:
        workers = 16 if storage.is_s3(src) else min(4, os.cpu_count() or 1)
        for i, d in enumerate(_ordered_map(work, items, workers)):
            cls = items[i][2]
            if d.chip is None:
                tally.add_bad(d.rel, d.reason, d.detail)
            else:
                spill.put(d.chip, d.rel, label_of[cls], cls, d.padded)
                tally.good += 1
            tally.progress(i + 1, len(items), "files")
        tally.progress(len(items), len(items), "files", force=True)

        # Pass 2 decisions: one channel count (the most common; ties → fewer channels), one dtype.
        chan_counts = Counter(e.shape[0] for e in spill.entries)
        channels = min(chan_counts, key=lambda c: (-chan_counts[c], c)) if chan_counts else 1
        keep: list[_Spilled] = []
        for e in spill.entries:
            if e.shape[0] != channels:
                tally.add_bad(e.rel, "wrong_shape", f"{e.shape[0]} channels; the dataset has {channels} "
                                                    f"(the most common count: {dict(chan_counts)})")
            else:
                keep.append(e)
        tally.good = len(keep)
        tally.padded = sum(e.padded for e in keep)
        tally.check_fraction(max_bad_fraction, dest)
        dtype = promote_dtypes(e.dtype for e in keep)
        src_dtypes = Counter(np.dtype(e.dtype).name for e in keep)
        if len(src_dtypes) > 1:
            log.warning("%s: source mixes dtypes %s; storing all as %s without rescaling values",
                        what, dict(src_dtypes), dtype.name)

        crop_policy = {"mode": "center", "size": int(size), "padded": tally.padded}
        with ShardWriter(dest, class_names=class_names, source=src, crop_policy=crop_policy,
                         target_shard_mib=target_shard_mib, command=command) as writer:
            for e in keep:
                writer.add(ChipRecord(chip_id=e.rel, chip=spill.get(e).astype(dtype, copy=False),
                                      label=e.label, class_name=e.class_name, sensor=sensor, source_path=e.rel))
            tally.flush_quarantine(writer)
            writer.stats = {**tally.stats(), "files_seen": len(items), "ignored_files": ignored,
                            "channels": channels, "source_dtypes": dict(sorted(src_dtypes.items())),
                            "dtype_promoted": len(src_dtypes) > 1}
            manifest = writer.commit()
    finally:
        spill.close()
    return tally.report(manifest, dest)


# --------------------------------------------------------------------------- arrays


@dataclass
class _ArrayFile:
    uri: str
    rel: str
    shape: tuple[int, ...] = ()  # N x H x W or N x C x H x W, as stored
    dtype: np.dtype | None = None
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    error: tuple[str, str] | None = None  # (reason, detail) when the file cannot be used at all

    @property
    def n(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    @property
    def chip_shape(self) -> tuple[int, int, int]:
        return (1, *self.shape[1:]) if len(self.shape) == 3 else tuple(self.shape[1:])  # type: ignore[return-value]


def _read_npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = reader(f)
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _probe_array_file(uri: str, rel: str, chips_key: str, labels_key: str) -> _ArrayFile:
    """Shape and dtype of the chip stack (headers only) plus the small labels/class_names arrays.

    Reads through a random-access handle, so for S3 only the header bytes travel.
    """
    af = _ArrayFile(uri, rel)
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            if _ext(rel) == ".npy":
                af.shape, af.dtype = _read_npy_header(f)
            else:
                with zipfile.ZipFile(f) as z:
                    members = {n[:-4] if n.endswith(".npy") else n: n for n in z.namelist()}
                    if chips_key not in members:
                        af.error = ("undecodable", f"no array {chips_key!r} in the .npz (it has "
                                                   f"{sorted(members)}); pass chips_key")
                        return af
                    with z.open(members[chips_key]) as m:
                        af.shape, af.dtype = _read_npy_header(m)
                    if labels_key in members:
                        with z.open(members[labels_key]) as m:
                            af.labels = np.lib.format.read_array(m, allow_pickle=False)
                    if "class_names" in members:
                        with z.open(members["class_names"]) as m:
                            af.class_names = [str(c) for c in np.lib.format.read_array(m, allow_pickle=False)]
    except OSError as exc:
        af.error = ("unreadable", storage.redact(str(exc)))
        return af
    except Exception as exc:  # bad magic, bad zip, pickled object arrays ...
        af.error = ("undecodable", f"{type(exc).__name__}: {exc}")
        return af
    if len(af.shape) not in (3, 4):
        af.error = ("wrong_shape", f"chip stack has shape {af.shape}; expected N×H×W or N×C×H×W")
    elif len(af.shape) == 4 and af.shape[1] > MAX_CHANNELS:
        af.error = ("wrong_shape", f"chip stack has shape {af.shape}: {af.shape[1]} channels; expected "
                                   f"N×C×H×W (is it N×H×W×C? transpose it to N×C×H×W)")
    elif af.dtype is not None and af.dtype.kind not in "biufc":
        af.error = ("undecodable", f"unsupported dtype {af.dtype}")
    elif af.labels is not None:
        if af.labels.ndim != 1 or len(af.labels) != af.n:
            af.error = ("wrong_shape", f"{labels_key!r} has shape {af.labels.shape}; expected ({af.n},)")
        elif af.labels.dtype.kind not in "iu":
            af.error = ("undecodable", f"{labels_key!r} has dtype {af.labels.dtype}; labels must be integers")
    return af


def ingest_arrays(src: str, dest: str, *, size: int | None = None, chips_key: str = "chips",
                  labels_key: str = "labels", class_names: list[str] | None = None,
                  max_bad_fraction: float = 0.01, target_shard_mib: float = 128.0,
                  command: list[str] | None = None) -> IngestReport:
    """``.npy`` (N×H×W or N×C×H×W) or ``.npz`` stacks (``chips_key``, optional ``labels_key`` and
    ``class_names``) → chip shards. ``src`` is one file or a folder of them.

    Headers are probed first, so the dataset's dtype (promoted across files), chip shape (the
    most common one, or ``C×size×size`` with ``size``) and labelling are settled before any chip is
    read. ``.npy`` stacks are memory-mapped; ``.npz`` members are read whole (zip members cannot be
    mapped). A file that cannot be used at all counts as one bad input. Class names: the argument,
    else the files' ``class_names`` array, else ``"0".."K-1"``.
    """
    _check_fraction_arg(max_bad_fraction)
    if size is not None and size < 1:
        raise IngestError(f"size = {size} must be >= 1")
    what = "ingest arrays"
    files, ignored = _list_inputs(src, ARRAY_EXTENSIONS)
    if not files:
        raise IngestError(f"{what}: no .npy/.npz files at {storage.redact(src)} ({ignored} other files ignored)")
    src_is_file = len(files) == 1 and not storage.is_dir(src)
    probes = [_probe_array_file(u, posixpath.basename(u) if src_is_file else _relative(src, u), chips_key, labels_key)
              for u in files]
    tally = _Tally(what, src, src_is_file)
    usable = []
    for af in probes:
        if af.error:
            tally.add_bad(af.rel, *af.error)
        else:
            usable.append(af)
    if not usable:
        tally.check_fraction(max_bad_fraction, dest)

    labelled = {af.labels is not None for af in usable}
    if len(labelled) > 1:
        raise IngestError(f"{what}: some files have {labels_key!r} and some do not "
                          f"({[af.rel for af in usable if af.labels is None][:5]} lack it); "
                          f"a dataset is all labelled or all unlabelled")
    is_labelled = labelled == {True}
    if class_names is not None and not is_labelled:
        raise IngestError(f"{what}: class_names given but no file has a {labels_key!r} array")
    if is_labelled and class_names is None:
        named = {tuple(af.class_names) for af in usable if af.class_names is not None}
        if len(named) > 1:
            raise IngestError(f"{what}: files disagree on class_names: {sorted(named)[:3]}")
        if named:
            class_names = list(named.pop())
        else:
            top = max((int(af.labels.max()) for af in usable if af.labels is not None and af.labels.size),
                      default=0)
            class_names = [str(i) for i in range(top + 1)]
    names = list(class_names or [])

    # Target geometry: C×size×size, or the most common chip shape (weighted by chip count).
    shape_counts: Counter[tuple[int, ...]] = Counter()
    for af in usable:
        shape_counts[af.chip_shape] += af.n
    if size is not None:
        chan = Counter()
        for shp, n in shape_counts.items():
            chan[shp[0]] += n
        channels = min(chan, key=lambda c: (-chan[c], c))
        target: tuple[int, ...] = (channels, size, size)
    else:
        target = min(shape_counts, key=lambda s: (-shape_counts[s], s))
    dtype = promote_dtypes(storage_dtype(af.dtype) for af in usable)
    src_dtypes = Counter()
    for af in usable:
        src_dtypes[af.dtype.name] += af.n
    total = sum(af.n for af in usable)
    log.info("%s: %d files, %d chips, storing %s %s%s", what, len(usable), total, "×".join(map(str, target)),
             dtype.name, f", {len(names)} classes" if names else ", unlabelled")

    crop_policy: dict[str, Any] = ({"mode": "center", "size": int(size), "padded": 0} if size is not None
                                   else {"mode": "none"})
    done = 0
    with ShardWriter(dest, class_names=names, source=src, crop_policy=crop_policy,
                     target_shard_mib=target_shard_mib, command=command) as writer:
        for af in usable:
            stem = af.rel[: -len(_ext(af.rel))]
            if af.chip_shape[0] != target[0] or (size is None and af.chip_shape != target):
                detail = f"chip shape {af.chip_shape}; the dataset's is {target}"
                for i in range(af.n):
                    tally.add_bad(f"{af.rel}#{i}", "wrong_shape", detail)
                done += af.n
                continue
            with _localize(af.uri) as local:
                try:
                    if _ext(af.rel) == ".npy":
                        stack = np.load(local, mmap_mode="r", allow_pickle=False)
                    else:
                        with np.load(local, allow_pickle=False) as z:
                            stack = z[chips_key]
                except Exception as exc:  # truncated data after a good header, etc.
                    tally.add_bad(af.rel, "undecodable", f"{type(exc).__name__}: {exc}")
                    continue
                step = max(1, (64 << 20) // max(1, int(np.prod(af.shape[1:])) * af.dtype.itemsize))
                for start in range(0, af.n, step):
                    block = np.asarray(stack[start:start + step])
                    for j in range(block.shape[0]):
                        i = start + j
                        source = f"{af.rel}#{i}"
                        chip = block[j] if block.ndim == 4 else block[j][None]
                        label = None if af.labels is None else int(af.labels[i])
                        try:
                            chip = to_storage(chip)
                            padded = False
                            if size is not None:
                                chip, padded = center_crop_or_pad(chip, size)
                            check_chip(chip, target)
                            if label is not None and not 0 <= label < len(names):
                                raise BadChip("bad_label", f"label {label} outside 0..{len(names) - 1}")
                        except BadChip as exc:
                            tally.add_bad(source, exc.reason, exc.detail)
                            continue
                        writer.add(ChipRecord(chip_id=f"{stem}-{i:06d}", chip=chip.astype(dtype, copy=False),
                                              label=label, class_name=None if label is None else names[label],
                                              source_path=af.rel))
                        tally.good += 1
                        tally.padded += int(padded)
                    done += block.shape[0]
                    tally.progress(done, total, "chips")
                del stack
        tally.check_fraction(max_bad_fraction, dest)
        tally.flush_quarantine(writer)
        if size is not None:
            crop_policy["padded"] = tally.padded
        writer.crop_policy = crop_policy
        writer.stats = {**tally.stats(), "files": len(probes), "ignored_files": ignored,
                        "source_dtypes": dict(sorted(src_dtypes.items())), "dtype_promoted": len(src_dtypes) > 1}
        manifest = writer.commit()
    return tally.report(manifest, dest)


# --------------------------------------------------------------------------- scenes


@dataclass
class _SceneHeader:
    uri: str
    rel: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str  # "yx" | "cyx" | "yxc"

    @property
    def channels(self) -> int:
        return 1 if self.layout == "yx" else self.shape[0] if self.layout == "cyx" else self.shape[-1]

    @property
    def hw(self) -> tuple[int, int]:
        return (self.shape[0], self.shape[1]) if self.layout != "cyx" else (self.shape[1], self.shape[2])


def _layout(shape: tuple[int, ...], axes: str | None = None) -> tuple[tuple[int, ...], str]:
    """Drop leading singleton axes and name the layout (TIFF axes when known; else a size heuristic)."""
    while len(shape) > 3 and shape[0] == 1:
        shape, axes = shape[1:], (axes[1:] if axes else axes)
    if len(shape) == 2:
        return shape, "yx"
    if len(shape) != 3:
        raise BadChip("wrong_shape", f"scene has shape {shape}; expected H×W, C×H×W or H×W×C")
    if axes is not None:
        return shape, "yxc" if axes.endswith("S") else "cyx"
    return shape, "yxc" if shape[-1] <= 4 < shape[0] else "cyx"


def _probe_scene(uri: str, rel: str) -> _SceneHeader:
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            if _ext(rel) == ".npy":
                shape, dtype = _read_npy_header(f)
                axes = None
            else:
                import tifffile

                with tifffile.TiffFile(f) as tif:
                    series = tif.series[0]
                    shape, dtype, axes = tuple(series.shape), np.dtype(series.dtype), series.axes
    except OSError as exc:
        raise BadChip("unreadable", storage.redact(str(exc))) from exc
    except BadChip:
        raise
    except Exception as exc:
        raise BadChip("undecodable", f"{type(exc).__name__}: {exc}") from exc
    shape, layout = _layout(shape, axes)
    storage_dtype(dtype)  # raises BadChip for unsupported dtypes
    return _SceneHeader(uri, rel, shape, dtype, layout)


@contextlib.contextmanager
def _open_scene(local: str, header: _SceneHeader) -> Iterator[np.ndarray]:
    """The scene as a lazily read array, in the file's own layout.

    ``.npy`` is memory-mapped; an uncompressed TIFF is memory-mapped in place; a compressed or
    tiled TIFF is decoded once into a memory-mapped temporary file, so RAM never holds the scene.
    """
    if _ext(header.rel) == ".npy":
        arr = np.load(local, mmap_mode="r", allow_pickle=False)
        yield arr.reshape(header.shape)
        return
    import tifffile

    try:
        arr = tifffile.memmap(local, mode="r")
        yield arr.reshape(header.shape)
        return
    except (ValueError, OSError):
        pass
    with tempfile.TemporaryDirectory(prefix="sarjepa-scene-") as tmp, tifffile.TiffFile(local) as tif:
        log.info("ingest scene: %s is compressed or tiled; decoding it to a temporary memory map", header.rel)
        arr = tif.series[0].asarray(out=os.path.join(tmp, "scene.raw"))
        try:
            yield arr.reshape(header.shape)
        finally:
            del arr


def _row_band(arr: np.ndarray, layout: str, r: int, tile: int) -> np.ndarray:
    """Rows ``r:r+tile`` of the scene as C×tile×W (read from the memory map once per band)."""
    if layout == "yx":
        band = np.asarray(arr[r:r + tile])[None]
    elif layout == "cyx":
        band = np.asarray(arr[:, r:r + tile])
    else:
        band = np.moveaxis(np.asarray(arr[r:r + tile]), -1, 0)
    return to_storage(band)


def ingest_scene(src: str, dest: str, *, tile: int, stride: int, max_nodata_fraction: float = 0.5,
                 nodata_value: float | None = 0.0, max_bad_fraction: float = 1.0,
                 target_shard_mib: float = 128.0, command: list[str] | None = None) -> IngestReport:
    """Tile a large scene (TIFF/GeoTIFF or ``.npy``; or a folder of them) into unlabelled chips.

    Complex (SLC) scenes are stored as magnitude ``|z|`` (float32). Tiles start every ``stride``
    pixels; a partial tile at the right/bottom edge is not made (``(H - tile) // stride + 1`` rows).
    A tile whose fraction of no-data pixels (``== nodata_value`` or non-finite) is above
    ``max_nodata_fraction`` is skipped and counted in ``stats.skipped_nodata`` - that is the scene's
    footprint, not bad data. A kept tile that still fails ``check_chip`` (some NaN, negative values)
    is quarantined. ``chip_id`` is ``<scene-stem>-r<row>-c<col>`` with the tile's top-left pixel.
    """
    _check_fraction_arg(max_bad_fraction)
    if tile < 1 or stride < 1:
        raise IngestError(f"tile = {tile} and stride = {stride} must both be >= 1")
    if not 0.0 <= max_nodata_fraction <= 1.0:
        raise IngestError(f"max_nodata_fraction = {max_nodata_fraction!r} is out of range; allowed: [0, 1]")
    what = "ingest scene"
    files, ignored = _list_inputs(src, SCENE_EXTENSIONS)
    if not files:
        raise IngestError(f"{what}: no .tif/.tiff/.npy scene at {storage.redact(src)}")
    src_is_file = len(files) == 1 and not storage.is_dir(src)
    tally = _Tally(what, src, src_is_file)
    tally.skipped["skipped_nodata"] = 0
    headers: list[_SceneHeader] = []
    for uri in files:
        rel = posixpath.basename(uri) if src_is_file else _relative(src, uri)
        try:
            headers.append(_probe_scene(uri, rel))
        except BadChip as exc:
            tally.add_bad(rel, exc.reason, exc.detail)
    if not headers:
        tally.check_fraction(max_bad_fraction, dest)
    channels = headers[0].channels
    dtype = promote_dtypes(storage_dtype(h.dtype) for h in headers if h.channels == channels)
    complex_input = any(h.dtype.kind == "c" for h in headers)
    scenes_stats = []
    crop_policy = {"mode": "tile", "size": int(tile), "stride": int(stride), "padded": 0}
    with ShardWriter(dest, source=src, crop_policy=crop_policy, target_shard_mib=target_shard_mib,
                     command=command) as writer:
        for h in headers:
            height, width = h.hw
            rows = range(0, height - tile + 1, stride) if height >= tile else range(0)
            cols = list(range(0, width - tile + 1, stride)) if width >= tile else []
            n_tiles = len(rows) * len(cols)
            if h.channels != channels:
                tally.add_bad(h.rel, "wrong_shape", f"{h.channels} channels; the first scene has {channels}")
                continue
            log.info("%s: %s %s %s (%s), %d tiles of %d×%d at stride %d", what, h.rel, "×".join(map(str, h.shape)),
                     h.dtype.name, "complex → magnitude" if h.dtype.kind == "c" else "magnitude", n_tiles,
                     tile, tile, stride)
            stem = os.path.splitext(h.rel)[0]
            kept = skipped = 0
            with _localize(h.uri) as local, _open_scene(local, h) as arr:
                for k, r in enumerate(rows):
                    band = _row_band(arr, h.layout, r, tile)
                    nodata = ~np.isfinite(band) if band.dtype.kind == "f" else np.zeros(band.shape, bool)
                    if nodata_value is not None:
                        nodata |= band == nodata_value
                    for c in cols:
                        if float(nodata[:, :, c:c + tile].mean()) > max_nodata_fraction:
                            skipped += 1
                            continue
                        chip = np.ascontiguousarray(band[:, :, c:c + tile])
                        try:
                            check_chip(chip, (channels, tile, tile))
                        except BadChip as exc:
                            tally.add_bad(f"{h.rel}#r{r}-c{c}", exc.reason, exc.detail)
                            continue
                        writer.add(ChipRecord(chip_id=f"{stem}-r{r}-c{c}", chip=chip.astype(dtype, copy=False),
                                              source_path=h.rel))
                        tally.good += 1
                        kept += 1
                    tally.progress((k + 1) * len(cols), n_tiles, f"tiles of {h.rel}")
                    del band, nodata
            tally.skipped["skipped_nodata"] += skipped
            scenes_stats.append({"scene": h.rel, "shape": list(h.shape), "dtype": h.dtype.name,
                                 "tiles_total": n_tiles, "tiles_kept": kept, "skipped_nodata": skipped})
        tally.check_fraction(max_bad_fraction, dest)
        tally.flush_quarantine(writer)
        writer.stats = {**tally.stats(), "scenes": scenes_stats, "complex_input": complex_input,
                        "tile": int(tile), "stride": int(stride), "max_nodata_fraction": float(max_nodata_fraction),
                        "nodata_value": None if nodata_value is None else float(nodata_value),
                        "ignored_files": ignored}
        manifest = writer.commit()
    return tally.report(manifest, dest)
