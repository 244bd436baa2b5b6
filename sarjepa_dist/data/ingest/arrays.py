"""``ingest_arrays``: ``.npy`` / ``.npz`` chip stacks, optionally labelled → chip shards."""

from __future__ import annotations

import logging
import zipfile
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from sarjepa_dist import storage
from sarjepa_dist.data.ingest.core import (
    MAX_CHANNELS, IngestError, IngestReport, Tally, check_fraction_arg, commit_chips, extension, list_sources,
    localized, prepare_chip, promote_dtypes, read_npy_header, storage_dtype,
)
from sarjepa_dist.data.shards import BadChip, ChipRecord

log = logging.getLogger(__name__)

ARRAY_EXTENSIONS = (".npy", ".npz")
READ_BLOCK_BYTES = 64 << 20  # chips read from a stack at a time


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


# --------------------------------------------------------------------------- probing headers


def _probe_array_file(uri: str, rel: str, chips_key: str, labels_key: str) -> _ArrayFile:
    """Shape and dtype of the chip stack (headers only) plus the small labels/class_names arrays.

    Reads through a random-access handle, so for S3 only the header bytes travel.
    """
    af = _ArrayFile(uri, rel)
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            if extension(rel) == ".npy":
                af.shape, af.dtype = read_npy_header(f)
            else:
                _read_npz_members(f, af, chips_key, labels_key)
    except OSError as exc:
        af.error = ("unreadable", storage.redact(str(exc)))
        return af
    except Exception as exc:  # bad magic, bad zip, pickled object arrays ...
        af.error = ("undecodable", f"{type(exc).__name__}: {exc}")
        return af
    af.error = af.error or _stack_error(af, labels_key)
    return af


def _read_npz_members(f, af: _ArrayFile, chips_key: str, labels_key: str) -> None:
    """The chip stack's header and the labels / class_names arrays of an ``.npz``, into ``af``."""
    with zipfile.ZipFile(f) as z:
        members = {n[:-4] if n.endswith(".npy") else n: n for n in z.namelist()}
        if chips_key not in members:
            af.error = ("undecodable", f"no array {chips_key!r} in the .npz (it has {sorted(members)}); "
                                       f"pass chips_key")
            return
        with z.open(members[chips_key]) as m:
            af.shape, af.dtype = read_npy_header(m)
        if labels_key in members:
            with z.open(members[labels_key]) as m:
                af.labels = np.lib.format.read_array(m, allow_pickle=False)
        if "class_names" in members:
            with z.open(members["class_names"]) as m:
                af.class_names = [str(c) for c in np.lib.format.read_array(m, allow_pickle=False)]


def _stack_error(af: _ArrayFile, labels_key: str) -> tuple[str, str] | None:
    """(reason, detail) when the probed stack or its labels cannot make chips; None when they can."""
    if len(af.shape) not in (3, 4):
        return "wrong_shape", f"chip stack has shape {af.shape}; expected N×H×W or N×C×H×W"
    if len(af.shape) == 4 and af.shape[1] > MAX_CHANNELS:
        return "wrong_shape", (f"chip stack has shape {af.shape}: {af.shape[1]} channels; expected "
                               f"N×C×H×W (is it N×H×W×C? transpose it to N×C×H×W)")
    if af.dtype is not None and af.dtype.kind not in "biufc":
        return "undecodable", f"unsupported dtype {af.dtype}"
    if af.labels is not None:
        if af.labels.ndim != 1 or len(af.labels) != af.n:
            return "wrong_shape", f"{labels_key!r} has shape {af.labels.shape}; expected ({af.n},)"
        if af.labels.dtype.kind not in "iu":
            return "undecodable", f"{labels_key!r} has dtype {af.labels.dtype}; labels must be integers"
    return None


# --------------------------------------------------------------------------- settling the dataset


def _settle_class_names(usable: list[_ArrayFile], class_names: list[str] | None, labels_key: str,
                        what: str) -> list[str]:
    """The dataset's class names (empty when unlabelled): the argument, else the files'
    ``class_names`` array, else ``"0".."K-1"``; every file must be labelled or none."""
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
    return list(class_names or [])


def _target_shape(usable: list[_ArrayFile], size: int | None) -> tuple[int, ...]:
    """C×size×size (C the most common channel count), or the most common chip shape; weighted by
    chip count, ties to the smaller."""
    shape_counts: Counter[tuple[int, ...]] = Counter()
    for af in usable:
        shape_counts[af.chip_shape] += af.n
    if size is None:
        return min(shape_counts, key=lambda s: (-shape_counts[s], s))
    chan: Counter[int] = Counter()
    for shp, n in shape_counts.items():
        chan[shp[0]] += n
    channels = min(chan, key=lambda c: (-chan[c], c))
    return (channels, size, size)


# --------------------------------------------------------------------------- reading chips


def _load_stack(local: str, rel: str, chips_key: str) -> np.ndarray:
    """The chip stack: memory-mapped from a ``.npy``; read whole from an ``.npz`` (zip members
    cannot be mapped)."""
    if extension(rel) == ".npy":
        return np.load(local, mmap_mode="r", allow_pickle=False)
    with np.load(local, allow_pickle=False) as z:
        return z[chips_key]


def _array_records(usable: list[_ArrayFile], tally: Tally, *, target: tuple[int, ...], size: int | None,
                   dtype: np.dtype, names: list[str], chips_key: str) -> Iterator[ChipRecord]:
    """Every good chip of every usable file, in file order; bad ones go to ``tally``."""
    total, done = sum(af.n for af in usable), 0
    for af in usable:
        if af.chip_shape[0] != target[0] or (size is None and af.chip_shape != target):
            detail = f"chip shape {af.chip_shape}; the dataset's is {target}"
            for i in range(af.n):
                tally.add_bad(f"{af.rel}#{i}", "wrong_shape", detail)
            done += af.n
            continue
        with localized(af.uri) as local:
            try:
                stack = _load_stack(local, af.rel, chips_key)
            except Exception as exc:  # truncated data after a good header, etc.
                tally.add_bad(af.rel, "undecodable", f"{type(exc).__name__}: {exc}")
                continue
            yield from _file_records(af, stack, tally, target=target, size=size, dtype=dtype, names=names,
                                     done_before=done, total=total)
            done += af.n
            del stack  # unmap before the local copy (S3 input) is removed


def _file_records(af: _ArrayFile, stack: np.ndarray, tally: Tally, *, target: tuple[int, ...],
                  size: int | None, dtype: np.dtype, names: list[str], done_before: int,
                  total: int) -> Iterator[ChipRecord]:
    """One file's good chips, read ``READ_BLOCK_BYTES`` at a time; bad ones go to ``tally``."""
    stem = af.rel[: -len(extension(af.rel))]
    step = max(1, READ_BLOCK_BYTES // max(1, int(np.prod(af.shape[1:])) * af.dtype.itemsize))
    for start in range(0, af.n, step):
        block = np.asarray(stack[start:start + step])
        for j in range(block.shape[0]):
            i = start + j
            chip = block[j] if block.ndim == 4 else block[j][None]
            label = None if af.labels is None else int(af.labels[i])
            try:
                chip, padded = prepare_chip(chip, size, target)
                if label is not None and not 0 <= label < len(names):
                    raise BadChip("bad_label", f"label {label} outside 0..{len(names) - 1}")
            except BadChip as exc:
                tally.add_bad(f"{af.rel}#{i}", exc.reason, exc.detail)
                continue
            yield ChipRecord(chip_id=f"{stem}-{i:06d}", chip=chip.astype(dtype, copy=False), label=label,
                             class_name=None if label is None else names[label], source_path=af.rel)
            tally.add_good(padded)
        tally.progress(done_before + start + block.shape[0], total, "chips")


# --------------------------------------------------------------------------- the ingest


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
    check_fraction_arg(max_bad_fraction)
    if size is not None and size < 1:
        raise IngestError(f"size = {size} must be >= 1")
    what = "ingest arrays"
    sources, ignored, src_is_file = list_sources(
        src, ARRAY_EXTENSIONS, f"{what}: no .npy/.npz files at {{src}} ({{ignored}} other files ignored)")
    probes = [_probe_array_file(uri, rel, chips_key, labels_key) for uri, rel in sources]
    tally = Tally(what, src, src_is_file)
    usable = []
    for af in probes:
        if af.error:
            tally.add_bad(af.rel, *af.error)
        else:
            usable.append(af)
    if not usable:
        tally.check_fraction(max_bad_fraction, dest)
    names = _settle_class_names(usable, class_names, labels_key, what)
    target = _target_shape(usable, size)
    dtype = promote_dtypes(storage_dtype(af.dtype) for af in usable)
    src_dtypes: Counter[str] = Counter()
    for af in usable:
        src_dtypes[af.dtype.name] += af.n
    log.info("%s: %d files, %d chips, storing %s %s%s", what, len(usable), sum(af.n for af in usable),
             "×".join(map(str, target)), dtype.name, f", {len(names)} classes" if names else ", unlabelled")
    records = _array_records(usable, tally, target=target, size=size, dtype=dtype, names=names, chips_key=chips_key)
    return commit_chips(
        tally, records, dest=dest, source=src, class_names=names,
        crop_policy={"mode": "center", "size": int(size), "padded": 0} if size is not None else {"mode": "none"},
        max_bad_fraction=max_bad_fraction, target_shard_mib=target_shard_mib, command=command,
        stats=lambda: {"files": len(probes), "ignored_files": ignored,
                       "source_dtypes": dict(sorted(src_dtypes.items())), "dtype_promoted": len(src_dtypes) > 1})
