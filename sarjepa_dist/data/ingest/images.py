"""``ingest_images``: a class-per-folder image tree → labelled, centre-cropped chips."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from sarjepa_dist import storage
from sarjepa_dist.data.ingest.core import (
    MAX_CHANNELS, IngestError, IngestReport, Tally, check_fraction_arg, commit_chips, extension, list_inputs,
    ordered_map, prepare_chip, promote_dtypes, relative_name, to_storage,
)
from sarjepa_dist.data.shards import BadChip, ChipRecord

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
_RGB_LIKE_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


# --------------------------------------------------------------------------- decoding one file


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Image bytes → C×H×W array in its storage dtype; raises ``BadChip`` for anything unusable.

    PNG/JPEG go through Pillow, TIFF through tifffile (Pillow mishandles 16-bit and float TIFF).
    Colour images whose channels are all equal (greyscale saved as RGB, common for JPEG) become one
    channel; alpha channels are dropped (they carry no backscatter).
    """
    if not data:
        raise BadChip("undecodable", "empty file (0 bytes)")
    arr, rgb = _decode_tiff(data) if extension(name) in TIFF_EXTENSIONS else _decode_pillow(data)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape) < 1 or arr.shape[0] > MAX_CHANNELS:
        raise BadChip("wrong_shape", f"expected H×W or H×W×C (C ≤ {MAX_CHANNELS}), got {tuple(arr.shape)}")
    if rgb and arr.shape[0] > 1 and (arr == arr[:1]).all():
        arr = arr[:1]
    return np.ascontiguousarray(to_storage(arr))


def _decode_tiff(data: bytes) -> tuple[np.ndarray, bool]:
    """TIFF bytes → (array, channels first when it has samples; whether the file says RGB)."""
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
    return arr, rgb


def _decode_pillow(data: bytes) -> tuple[np.ndarray, bool]:
    """PNG/JPEG bytes → (array, channels first; whether it was a colour image)."""
    rgb = False
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
    return arr, rgb


# --------------------------------------------------------------------------- pass 1: decode into a spill


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


def _list_class_folders(src: str, what: str) -> tuple[list[tuple[str, str, str]], list[str], int]:
    """(uri, rel, class) of every image inside a class folder, sorted; the class names; files ignored."""
    files, ignored = list_inputs(src, IMAGE_EXTENSIONS)
    items: list[tuple[str, str, str]] = []
    for uri in files:
        rel = relative_name(src, uri)
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
    return items, class_names, ignored


def _decode_file(uri: str, rel: str, size: int) -> _Decoded:
    try:
        data = storage.read_bytes(uri)
    except OSError as exc:
        return _Decoded(rel, reason="unreadable", detail=str(exc))
    try:
        chip, padded = prepare_chip(decode_image(data, rel), size)
    except BadChip as exc:
        return _Decoded(rel, reason=exc.reason, detail=exc.detail)
    return _Decoded(rel, chip=chip, padded=padded)


def _decode_into_spill(src: str, items: list[tuple[str, str, str]], class_names: list[str], size: int,
                       tally: Tally, spill: _Spill) -> None:
    """Pass 1: read, decode, crop and check every file on a thread pool; good chips go to ``spill``."""
    label_of = {c: i for i, c in enumerate(class_names)}
    workers = 16 if storage.is_s3(src) else min(4, os.cpu_count() or 1)
    decoded = ordered_map(lambda item: _decode_file(item[0], item[1], size), items, workers)
    for i, d in enumerate(decoded):
        cls = items[i][2]
        if d.chip is None:
            tally.add_bad(d.rel, d.reason, d.detail)
        else:
            spill.put(d.chip, d.rel, label_of[cls], cls, d.padded)
            tally.good += 1
        tally.progress(i + 1, len(items), "files")
    tally.progress(len(items), len(items), "files", force=True)


def _keep_one_channel_count(spill: _Spill, tally: Tally) -> tuple[list[_Spilled], int]:
    """Pass 2: the most common channel count (ties → fewer channels); chips with another are bad."""
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
    return keep, channels


# --------------------------------------------------------------------------- the ingest


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
    check_fraction_arg(max_bad_fraction)
    if size < 1:
        raise IngestError(f"size = {size} must be >= 1")
    what = "ingest images"
    items, class_names, ignored = _list_class_folders(src, what)
    log.info("%s: %d files in %d classes under %s (%d ignored), crop %d×%d", what, len(items),
             len(class_names), storage.redact(src), ignored, size, size)
    tally = Tally(what, src)
    spill = _Spill()
    try:
        _decode_into_spill(src, items, class_names, size, tally, spill)
        keep, channels = _keep_one_channel_count(spill, tally)
        tally.check_fraction(max_bad_fraction, dest)  # before anything is written
        dtype = promote_dtypes(e.dtype for e in keep)
        src_dtypes = Counter(np.dtype(e.dtype).name for e in keep)
        if len(src_dtypes) > 1:
            log.warning("%s: source mixes dtypes %s; storing all as %s without rescaling values",
                        what, dict(src_dtypes), dtype.name)
        records = (ChipRecord(chip_id=e.rel, chip=spill.get(e).astype(dtype, copy=False), label=e.label,
                              class_name=e.class_name, sensor=sensor, source_path=e.rel) for e in keep)
        return commit_chips(
            tally, records, dest=dest, source=src, class_names=class_names,
            crop_policy={"mode": "center", "size": int(size), "padded": tally.padded},
            max_bad_fraction=max_bad_fraction, target_shard_mib=target_shard_mib, command=command,
            stats=lambda: {"files_seen": len(items), "ignored_files": ignored, "channels": channels,
                           "source_dtypes": dict(sorted(src_dtypes.items())),
                           "dtype_promoted": len(src_dtypes) > 1})
    finally:
        spill.close()
