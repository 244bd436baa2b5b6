"""``ingest_scene``: large scenes (TIFF/GeoTIFF or ``.npy``, magnitude or complex SLC) → unlabelled
``tile × tile`` chips at ``stride``, skipping no-data tiles. Streams: memory-mapped input, one row band
of tiles at a time, and ``ShardWriter`` flushes shards by size. In a distributed ingest one scene is split across
Ray tasks by groups of row bands, each reading only its own rows."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import tifffile

from sarjepa_dist import storage
from sarjepa_dist.data.ingest.core import (
    IngestError, IngestReport, Tally, check_fraction_arg, commit_chips, distributed, extension, list_sources,
    localized, ordered_map, prepare_chip, promote_dtypes, read_npy_header, storage_dtype, to_storage,
)
from sarjepa_dist.data.shards import BadChip, ChipRecord

log = logging.getLogger(__name__)

SCENE_EXTENSIONS = (".tif", ".tiff", ".npy")
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
            if extension(rel) == ".npy":
                shape, dtype = read_npy_header(f)
                axes = None
            else:
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
    if extension(header.rel) == ".npy":
        arr = np.load(local, mmap_mode="r", allow_pickle=False)
        yield arr.reshape(header.shape)
        return
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


def _tile_grid(h: _SceneHeader, tile: int, stride: int) -> tuple[range, list[int]]:
    """Top rows and left columns of the tiles: every ``stride`` pixels, no partial edge tile."""
    height, width = h.hw
    rows = range(0, height - tile + 1, stride) if height >= tile else range(0)
    cols = list(range(0, width - tile + 1, stride)) if width >= tile else []
    return rows, cols


def _nodata_mask(band: np.ndarray, nodata_value: float | None) -> np.ndarray:
    nodata = ~np.isfinite(band) if band.dtype.kind == "f" else np.zeros(band.shape, bool)
    if nodata_value is not None:
        nodata |= band == nodata_value
    return nodata


BANDS_PER_TASK = 4  # row bands of one scene per Ray task in a distributed ingest


@dataclass
class _BandTiles:
    """What one group of row bands gave: good tiles (chip id, chip), bad tiles, no-data tiles skipped."""

    good: list[tuple[str, np.ndarray]]
    bad: list[tuple[str, str, str]]
    skipped: int


def _tile_band(arr: np.ndarray, h: _SceneHeader, r: int, cols: list[int], *, channels: int, tile: int,
               max_nodata_fraction: float, nodata_value: float | None, dtype: np.dtype) -> _BandTiles:
    """The tiles of the row band starting at row ``r`` of the opened scene ``arr``."""
    stem = os.path.splitext(h.rel)[0]
    out = _BandTiles([], [], 0)
    band = _row_band(arr, h.layout, r, tile)
    nodata = _nodata_mask(band, nodata_value)
    for c in cols:
        if float(nodata[:, :, c:c + tile].mean()) > max_nodata_fraction:
            out.skipped += 1
            continue
        try:
            chip, _ = prepare_chip(np.ascontiguousarray(band[:, :, c:c + tile]), None, (channels, tile, tile))
        except BadChip as exc:
            out.bad.append((f"{h.rel}#r{r}-c{c}", exc.reason, exc.detail))
            continue
        out.good.append((f"{stem}-r{r}-c{c}", chip.astype(dtype, copy=False)))
    return out


def _tile_bands(h: _SceneHeader, rows: list[int], **kw: Any) -> list[_BandTiles]:
    """A Ray task's share of a scene: it opens the scene (a memory map) and reads only ``rows``' bands."""
    with localized(h.uri) as local, _open_scene(local, h) as arr:
        return [_tile_band(arr, h, r, **kw) for r in rows]


def _band_results(h: _SceneHeader, rows: range, **kw: Any) -> Iterator[_BandTiles]:
    """Every row band's tiles, in order: here, the scene opened once and read a band at a time;
    in a distributed ingest, ``BANDS_PER_TASK`` bands a Ray task."""
    if not distributed():
        with localized(h.uri) as local, _open_scene(local, h) as arr:
            for r in rows:
                yield _tile_band(arr, h, r, **kw)
        return
    groups = [list(rows[i:i + BANDS_PER_TASK]) for i in range(0, len(rows), BANDS_PER_TASK)]
    for bands in ordered_map(functools.partial(_tile_bands, h, **kw), groups, workers=1, items_per_task=1):
        yield from bands


def _scene_records(h: _SceneHeader, tally: Tally, *, channels: int, tile: int, stride: int,
                   max_nodata_fraction: float, nodata_value: float | None, dtype: np.dtype,
                   scene_stats: list[dict[str, Any]]) -> Iterator[ChipRecord]:
    """The good tiles of one scene, in row-band order; no-data tiles are counted, bad ones go to
    ``tally``; the scene's counts are appended to ``scene_stats`` once it is done."""
    rows, cols = _tile_grid(h, tile, stride)
    n_tiles = len(rows) * len(cols)
    log.info("%s: %s %s %s (%s), %d tiles of %d×%d at stride %d", tally.what, h.rel, "×".join(map(str, h.shape)),
             h.dtype.name, "complex → magnitude" if h.dtype.kind == "c" else "magnitude", n_tiles,
             tile, tile, stride)
    kept = skipped = 0
    bands = _band_results(h, rows, cols=cols, channels=channels, tile=tile, dtype=dtype,
                          max_nodata_fraction=max_nodata_fraction, nodata_value=nodata_value)
    for k, result in enumerate(bands):
        for source, reason, detail in result.bad:
            tally.add_bad(source, reason, detail)
        for chip_id, chip in result.good:
            yield ChipRecord(chip_id=chip_id, chip=chip, source_path=h.rel)
            tally.add_good()
        kept += len(result.good)
        skipped += result.skipped
        tally.progress((k + 1) * len(cols), n_tiles, f"tiles of {h.rel}")
    tally.skipped["skipped_nodata"] += skipped
    scene_stats.append({"scene": h.rel, "shape": list(h.shape), "dtype": h.dtype.name,
                        "tiles_total": n_tiles, "tiles_kept": kept, "skipped_nodata": skipped})


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
    check_fraction_arg(max_bad_fraction)
    if tile < 1 or stride < 1:
        raise IngestError(f"tile = {tile} and stride = {stride} must both be >= 1")
    if not 0.0 <= max_nodata_fraction <= 1.0:
        raise IngestError(f"max_nodata_fraction = {max_nodata_fraction!r} is out of range; allowed: [0, 1]")
    what = "ingest scene"
    sources, ignored, src_is_file = list_sources(src, SCENE_EXTENSIONS,
                                                 f"{what}: no .tif/.tiff/.npy scene at {{src}}")
    tally = Tally(what, src, src_is_file)
    tally.skipped["skipped_nodata"] = 0
    headers: list[_SceneHeader] = []
    for uri, rel in sources:
        try:
            headers.append(_probe_scene(uri, rel))
        except BadChip as exc:
            tally.add_bad(rel, exc.reason, exc.detail)
    if not headers:
        tally.check_fraction(max_bad_fraction, dest)
    channels = headers[0].channels
    dtype = promote_dtypes(storage_dtype(h.dtype) for h in headers if h.channels == channels)
    scene_stats: list[dict[str, Any]] = []

    def records() -> Iterator[ChipRecord]:
        for h in headers:
            if h.channels != channels:
                tally.add_bad(h.rel, "wrong_shape", f"{h.channels} channels; the first scene has {channels}")
                continue
            yield from _scene_records(h, tally, channels=channels, tile=tile, stride=stride, dtype=dtype,
                                      max_nodata_fraction=max_nodata_fraction, nodata_value=nodata_value,
                                      scene_stats=scene_stats)

    return commit_chips(
        tally, records(), dest=dest, source=src, class_names=None,
        crop_policy={"mode": "tile", "size": int(tile), "stride": int(stride), "padded": 0},
        max_bad_fraction=max_bad_fraction, target_shard_mib=target_shard_mib, command=command,
        stats=lambda: {"scenes": scene_stats, "complex_input": any(h.dtype.kind == "c" for h in headers),
                       "tile": int(tile), "stride": int(stride), "max_nodata_fraction": float(max_nodata_fraction),
                       "nodata_value": None if nodata_value is None else float(nodata_value),
                       "ignored_files": ignored})
