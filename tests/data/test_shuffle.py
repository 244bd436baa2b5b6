"""The consumer's local shuffle buffer (no Ray): every row once, seeded order, one copy, bounded memory."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sarjepa_dist.data import shuffle
from sarjepa_dist.data.shuffle import ShuffleBuffer, shuffled_batches, table_pieces


def pieces(count: int, rows: int, side: int = 4):
    """Read-only pieces, as Ray hands out object-store views: row i's chip is filled with i."""
    for b in range(count):
        ids = np.arange(b * rows, (b + 1) * rows)
        chips = np.repeat(ids.astype(np.float32), side * side).reshape(rows, 1, side, side)
        chips.flags.writeable = False
        yield {"chip_id": np.array([f"c{i}" for i in ids], dtype=object), "label": ids, "amplitude": chips}


def labels(batches) -> list[int]:
    return [int(v) for b in batches for v in b["label"]]


def test_every_row_comes_out_once_with_its_own_columns():
    out = list(shuffled_batches(pieces(30, 50), batch_size=32, buffer_rows=200, seed=3, drop_last=False))
    assert sorted(labels(out)) == list(range(1500))
    assert [len(b["label"]) for b in out] == [32] * 46 + [1500 - 32 * 46]
    for b in out:
        assert list(b["chip_id"]) == [f"c{i}" for i in b["label"]]
        assert np.array_equal(b["amplitude"][:, 0, 0, 0], b["label"].astype(np.float32))
        assert b["amplitude"].shape[1:] == (1, 4, 4) and b["amplitude"].dtype == np.float32


def test_drop_last_keeps_only_full_batches():
    out = list(shuffled_batches(pieces(3, 50), batch_size=32, buffer_rows=64, seed=0, drop_last=True))
    assert [len(b["label"]) for b in out] == [32, 32, 32, 32]
    assert len(set(labels(out))) == 128


def test_the_order_is_shuffled_and_set_by_the_seed():
    def order(seed: int) -> list[int]:
        return labels(shuffled_batches(pieces(20, 50), batch_size=25, buffer_rows=300, seed=seed))

    assert order(5) == order(5)
    assert order(5) != order(6)
    first = order(5)[:25]
    assert first != sorted(first), "the first batch came out in arrival order"
    assert max(first) - min(first) > 150, "the first batch is not drawn from across the buffer"


def test_without_a_buffer_rows_keep_their_order():
    assert labels(shuffled_batches(pieces(4, 10), batch_size=8, buffer_rows=0, seed=1, drop_last=False)) == list(range(40))


def test_a_buffer_larger_than_the_data_permutes_all_of_it():
    out = labels(shuffled_batches(pieces(5, 20), batch_size=10, buffer_rows=1000, seed=2, drop_last=False))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert max(out[:10]) > 50


def test_batches_are_new_writable_arrays():
    source = list(pieces(4, 40))
    out = list(shuffled_batches(iter(source), batch_size=16, buffer_rows=32, seed=0))
    for b in out:
        assert b["amplitude"].flags.writeable and b["amplitude"].flags.c_contiguous
        assert not any(np.shares_memory(b["amplitude"], s["amplitude"]) for s in source)


def test_memory_held_stays_bounded_while_blocks_stream():
    buffer, rows, batch, most = ShuffleBuffer(batch_size=16, buffer_rows=128, seed=0), 32, 16, 0
    for piece in pieces(400, rows):
        buffer.add(piece)
        for _ in buffer.batches():
            pass
        most = max(most, buffer.held_rows)
    bound = shuffle.HELD_ROWS_FACTOR * 128 + batch + rows
    assert most <= bound, f"held {most} rows, more than {bound}"
    assert buffer.pieces_alive <= bound // rows + 2
    buffer.finish()
    assert sum(len(b["label"]) for b in buffer.batches(partial=True)) == 128
    assert buffer.held_rows == 0 and buffer.pieces_alive == 0


def test_compaction_keeps_every_row_and_its_values(monkeypatch):
    monkeypatch.setattr(shuffle, "HELD_ROWS_FACTOR", 1)  # compact early and often
    out = list(shuffled_batches(pieces(60, 20), batch_size=7, buffer_rows=50, seed=9, drop_last=False))
    assert sorted(labels(out)) == list(range(1200))
    for b in out:
        assert np.array_equal(b["amplitude"][:, 0, 2, 3], b["label"].astype(np.float32))
        assert list(b["chip_id"]) == [f"c{i}" for i in b["label"]]


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        ShuffleBuffer(batch_size=0, buffer_rows=4, seed=0)
    with pytest.raises(ValueError, match="buffer_rows"):
        ShuffleBuffer(batch_size=4, buffer_rows=-1, seed=0)


def test_table_pieces_takes_chunks_one_by_one_without_copying_tensors():
    chips = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    tensor_type = pa.fixed_shape_tensor(pa.float32(), (2, 3))
    chunks = [pa.table({"chip_id": ["a", "b", "c"], "label": pa.array([0, 1, 2], pa.int64()),
                        "amplitude": pa.FixedShapeTensorArray.from_numpy_ndarray(chips[:3])}),
              pa.table({"chip_id": ["d", "e", "f"], "label": pa.array([3, 4, 5], pa.int64()),
                        "amplitude": pa.FixedShapeTensorArray.from_numpy_ndarray(chips[3:])})]
    table = pa.concat_tables(chunks)
    assert table.column("amplitude").type == tensor_type and table.column("amplitude").num_chunks == 2
    got = list(table_pieces([table, table.slice(0, 0)]))
    assert len(got) == 2
    assert list(got[1]["chip_id"]) == ["d", "e", "f"] and got[1]["chip_id"].dtype == object
    assert np.array_equal(got[1]["label"], [3, 4, 5])
    assert np.array_equal(got[0]["amplitude"], chips[:3]) and np.array_equal(got[1]["amplitude"], chips[3:])
    arrow_data = table.column("amplitude").chunk(1).storage.values.buffers()[1]
    assert got[1]["amplitude"].__array_interface__["data"][0] == arrow_data.address


def test_ray_tensor_columns_come_out_as_views():
    from ray.data.block import BlockAccessor

    chips = np.random.default_rng(0).random((5, 1, 4, 4), dtype=np.float32)
    block = BlockAccessor.batch_to_block({"label": np.arange(5), "amplitude": chips})
    assert isinstance(block, pa.Table)
    (piece,) = table_pieces([block])
    assert np.array_equal(piece["amplitude"], chips) and piece["amplitude"].shape == (5, 1, 4, 4)
    column = block.column("amplitude").chunk(0)
    assert any(b is not None and piece["amplitude"].__array_interface__["data"][0] == b.address
               for b in column.storage.buffers() + column.storage.values.buffers())
