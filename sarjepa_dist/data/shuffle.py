"""The consumer's local shuffle: rows of incoming blocks through a fixed-size random buffer into batches.

Ray Data's own ``iter_batches(local_shuffle_buffer_size=...)`` does the same job, but in the input
path's profile its gather took ~37% of the consumer's CPU: it copies each row twice (a fancy-index
gather into a temporary, then a scatter into the batch), and its buffer is compacted by copying
again. Here every row is copied once, from the block it arrived in (a zero-copy view of the object
store) straight into its batch; blocks are dropped when their last buffered row has left.
(README, "Measured": the input path.)

The buffer is the classic streaming shuffle buffer (as in ``tf.data``'s ``shuffle``): it fills to
``buffer_rows`` rows, then each incoming row takes the slot of a uniformly chosen buffered row,
which goes out. At the end the buffered rows leave in a random order. A row waits a geometric
number of arrivals, ``buffer_rows`` on average, so rows mix over about that many neighbours, as
with Ray's buffer of that size; the order depends only on ``seed`` and the order of the incoming
rows.

Pure numpy and pyarrow: no Ray here (the caller passes Ray's blocks as Arrow tables).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from sarjepa_dist.data.pipeline import pool_array

__all__ = ["COMPACT_BELOW", "HELD_ROWS_FACTOR", "ShuffleBuffer", "shuffled_batches", "table_pieces"]

# Blocks stay alive while any of their rows is buffered, and under this buffer a block's last row
# leaves about ln(rows) * buffer_rows rows after it came. So once the blocks held exceed
# HELD_ROWS_FACTOR x buffer_rows rows, the rows of blocks less than COMPACT_BELOW full are copied
# into one compact piece and those blocks are let go: at most 1/3 of a copy more per row, and
# memory bounded by ~HELD_ROWS_FACTOR x the buffer.
HELD_ROWS_FACTOR = 4
COMPACT_BELOW = 0.25

Piece = dict[str, np.ndarray]


def _column_to_numpy(column: pa.Array) -> np.ndarray:
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return np.array(column.to_pylist(), dtype=object)
    if isinstance(column.type, pa.FixedShapeTensorType):
        return column.to_numpy_ndarray()
    if isinstance(column.type, pa.ExtensionType):  # Ray Data's tensor columns: a zero-copy view
        return column.to_numpy()
    return column.to_numpy(zero_copy_only=False)


def table_pieces(tables: Iterable[pa.Table]) -> Iterator[Piece]:
    """Each table's record batches as numpy columns: tensor and numeric columns without a copy
    (views of the block, read-only when it lives in Ray's object store), strings as object arrays.

    A Ray Data block is often several chunks (one per batch its task yielded); taking them one by
    one avoids combining the chunks, which copies the whole block."""
    for table in tables:
        for batch in table.to_batches():
            if batch.num_rows:
                yield {name: _column_to_numpy(col) for name, col in zip(batch.schema.names, batch.columns)}


def _gather(pieces: dict[int, Piece], rows: list[tuple[int, int]]) -> Piece:
    """One new, writable array per column holding ``rows`` ((piece, row) pairs) in that order."""
    out: Piece = {}
    for name, column in pieces[rows[0][0]].items():
        values = [pieces[p][name][r] for p, r in rows]
        if column.dtype == object or column.ndim == 1:
            out[name] = np.array(values, dtype=column.dtype)
        else:  # tensors: one copy, into Arrow's memory pool (see pipeline.pool_array)
            out[name] = pool_array((len(values), *column.shape[1:]), column.dtype)
            np.stack(values, out=out[name])
    return out


class ShuffleBuffer:
    """A streaming shuffle buffer over pieces (dicts of equal-length numpy columns), yielding
    batches of ``batch_size`` rows. ``add`` a piece, take what ``batches()`` yields, ``finish()``
    at the end. ``held_rows`` is the rows of all pieces still referenced (what memory it holds)."""

    def __init__(self, batch_size: int, buffer_rows: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size} must be >= 1")
        if buffer_rows < 0:
            raise ValueError(f"buffer_rows = {buffer_rows} must be >= 0")
        self.batch_size, self.buffer_rows = int(batch_size), int(buffer_rows)
        self._rng = np.random.default_rng(seed)
        self._pieces: dict[int, Piece] = {}  # the pieces still referenced, by id
        self._size: dict[int, int] = {}  # their rows
        self._live: dict[int, int] = {}  # of those, still buffered or queued
        self._next_id = 0
        self._slots: list[tuple[int, int]] = []  # the buffer: (piece, row)
        self._out: list[tuple[int, int]] = []  # rows that left the buffer, in order, not yet batched
        self.held_rows = 0

    def add(self, piece: Piece) -> None:
        n = len(next(iter(piece.values())))
        if n == 0:
            return
        p = self._keep(piece, n)
        fill = min(n, max(0, self.buffer_rows - len(self._slots)))
        self._slots.extend((p, r) for r in range(fill))
        if fill < n:
            picks = self._rng.integers(0, self.buffer_rows, size=n - fill) if self.buffer_rows else None
            for i, r in enumerate(range(fill, n)):
                if picks is None:
                    self._out.append((p, r))
                else:
                    j = int(picks[i])
                    self._out.append(self._slots[j])
                    self._slots[j] = (p, r)
        if self.held_rows > HELD_ROWS_FACTOR * self.buffer_rows + self.batch_size:
            self._compact()

    def finish(self) -> None:
        """No more pieces: the buffered rows leave, in a random order."""
        order = self._rng.permutation(len(self._slots))
        self._out.extend(self._slots[i] for i in order)
        self._slots = []

    def batches(self, partial: bool = False) -> Iterator[Piece]:
        """The full batches ready now; with ``partial``, then the rest as one smaller batch."""
        while len(self._out) >= self.batch_size or (partial and self._out):
            rows, self._out = self._out[:self.batch_size], self._out[self.batch_size:]
            batch = _gather(self._pieces, rows)
            self._release(rows)
            yield batch

    @property
    def pieces_alive(self) -> int:
        return len(self._pieces)

    def _keep(self, piece: Piece, rows: int) -> int:
        p, self._next_id = self._next_id, self._next_id + 1
        self._pieces[p], self._size[p], self._live[p] = piece, rows, rows
        self.held_rows += rows
        return p

    def _drop(self, p: int) -> None:
        del self._pieces[p], self._live[p]
        self.held_rows -= self._size.pop(p)

    def _release(self, rows: list[tuple[int, int]]) -> None:
        for p, _ in rows:
            self._live[p] -= 1
            if self._live[p] == 0:
                self._drop(p)

    def _compact(self) -> None:
        sparse = {p for p, live in self._live.items() if live <= COMPACT_BELOW * self._size[p]}
        if not sparse:
            return
        at = [(where, i) for where in (self._slots, self._out) for i, (p, _) in enumerate(where) if p in sparse]
        c = self._keep(_gather(self._pieces, [where[i] for where, i in at]), len(at))
        for k, (where, i) in enumerate(at):
            where[i] = (c, k)
        for p in sparse:
            self._drop(p)


def shuffled_batches(pieces: Iterable[Piece], *, batch_size: int, buffer_rows: int, seed: int,
                     drop_last: bool = True) -> Iterator[Piece]:
    """Batches of exactly ``batch_size`` rows (the last one smaller unless ``drop_last``) from
    ``pieces`` through a ``ShuffleBuffer`` of ``buffer_rows`` rows seeded by ``seed``. Every row
    comes out once; each batch's arrays are new and writable."""
    buffer = ShuffleBuffer(batch_size, buffer_rows, seed)
    for piece in pieces:
        buffer.add(piece)
        yield from buffer.batches()
    buffer.finish()
    yield from buffer.batches(partial=not drop_last)

