"""The executor transport's pieces on their own: records, the tensor table in a slot, the arena and its slots."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest

from gateway.errors import (
    DeadlineExceeded,
    Draining,
    InvalidInput,
    ModelExecutionError,
    Overloaded,
    QueueTimeout,
)
from gateway.serving.remote import records as rec
from gateway.serving.remote.arena import Arena, SlotPool


def test_request_and_cancel_records_round_trip_at_one_fixed_size() -> None:
    data = rec.encode_request(7, 2**40, 3, 2, 16, 1234.5, 0.25, traced=True)
    assert len(data) == rec.REQUEST_RECORD.size
    r = rec.decode_request(data)
    assert (r.kind, r.slot, r.seq, r.version, r.tensors, r.rows) == (rec.REQUEST, 7, 2**40, 3, 2, 16)
    assert r.flags & rec.TRACED
    assert (rec.optional_time(r.deadline), rec.optional_time(r.timeout)) == (1234.5, 0.25)

    none = rec.decode_request(rec.encode_request(0, 1, 0, 1, 1, None, None))
    assert rec.optional_time(none.deadline) is None and rec.optional_time(none.timeout) is None
    assert not none.flags & rec.TRACED

    cancel = rec.decode_request(rec.encode_cancel(5, 99))
    assert (cancel.kind, cancel.slot, cancel.seq) == (rec.CANCEL, 5, 99)


def test_reply_record_carries_code_outputs_message_and_batch_times() -> None:
    data = rec.encode_reply(3, 42, rec.OK, 2, 0, (8, 3, 10.5, 10.75, 1_000, 2_000))
    assert len(data) == rec.REPLY_RECORD.size <= rec.RECORD_BYTES
    r = rec.decode_reply(data)
    assert (r.kind, r.slot, r.seq, r.code, r.tensors) == (rec.REPLY, 3, 42, rec.OK, 2)
    assert (r.rows, r.requests, r.enqueued, r.dequeued, r.started_ns, r.ended_ns) == (8, 3, 10.5, 10.75, 1_000, 2_000)


def test_arena_record_round_trips_and_refuses_another_kind() -> None:
    assert rec.decode_arena(rec.encode_arena(64, 1 << 33)) == (64, 1 << 33)
    with pytest.raises(ValueError, match="arena record"):
        rec.decode_arena(rec.encode_cancel(0, 1) + bytes(8))


@pytest.mark.parametrize(
    "error", [InvalidInput("x"), Overloaded("x"), QueueTimeout("x"), DeadlineExceeded("x"), Draining("x")]
)
def test_each_error_class_crosses_as_itself_with_its_message(error: Exception) -> None:
    back = rec.error_for(rec.error_code(error), "the message")
    assert type(back) is type(error)
    assert str(back) == "the message"


def test_an_unknown_exception_crosses_as_a_model_execution_error() -> None:
    code = rec.error_code(ZeroDivisionError("boom"))
    assert code == rec.INTERNAL
    assert isinstance(rec.error_for(code, ""), ModelExecutionError)


def _arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.random((3, 64), dtype=np.float32),
        rng.integers(-5, 5, size=(3,), dtype=np.int64),
        np.array(True),  # rank 0
        np.zeros((0, 4), np.float16),  # no rows
        rng.random((4, 6), dtype=np.float64)[:, ::2],  # not contiguous: written contiguous
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    ]


def test_tensors_round_trip_through_a_slot_as_views_at_aligned_offsets() -> None:
    buffer = memoryview(bytearray(64 * 1024))
    arrays = _arrays()
    rec.write_tensors(buffer, 4096, 8192, arrays)
    back = rec.read_tensors(buffer, 4096, 8192, len(arrays))
    for a, b in zip(arrays, back, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    offsets, _ = rec.layout([(a.ndim, a.nbytes) for a in arrays])
    assert all(offset % rec.ALIGN == 0 for offset in offsets)
    start = 4096 + offsets[0]
    buffer[start : start + 4] = np.float32(-7.0).tobytes()
    assert back[0][0, 0] == -7.0  # a view of the slot, not a copy


def test_a_write_that_does_not_fit_writes_nothing_and_says_how_much_it_needs() -> None:
    buffer = memoryview(bytearray(8192))
    big = np.ones((100, 100), np.float32)
    with pytest.raises(rec.SlotTooSmall) as raised:
        rec.write_tensors(buffer, 0, 4096, [big])
    assert raised.value.needed > 40_000 and raised.value.size == 4096
    assert bytes(buffer) == bytes(8192)


def test_an_object_array_cannot_go_into_shared_memory() -> None:
    with pytest.raises(TypeError, match="cannot be carried"):
        rec.write_tensors(memoryview(bytearray(4096)), 0, 4096, [np.array(["a"], dtype=object)])


def test_a_table_that_points_outside_its_slot_is_refused() -> None:
    buffer = memoryview(bytearray(16384))
    rec.write_tensors(buffer, 0, 8192, [np.ones((4, 4), np.float32)])
    entry = rec._entry(2)
    code, rank, offset, nbytes, *shape = entry.unpack_from(buffer, 0)
    entry.pack_into(buffer, 0, code, rank, 8192 - 8, nbytes, *shape)  # data runs into the next slot
    with pytest.raises(ValueError, match="does not match"):
        rec.read_tensors(buffer, 0, 8192, 1)
    entry.pack_into(buffer, 0, code, rank, offset, nbytes + 4, *shape)  # bytes disagree with the shape
    with pytest.raises(ValueError, match="does not match"):
        rec.read_tensors(buffer, 0, 8192, 1)
    entry.pack_into(buffer, 0, 200, rank, offset, nbytes, *shape)  # no such dtype
    with pytest.raises(ValueError, match="dtype"):
        rec.read_tensors(buffer, 0, 8192, 1)
    entry.pack_into(buffer, 0, code, rank, offset, nbytes, *shape)  # good again
    assert rec.read_tensors(buffer, 0, 8192, 1)[0].shape == (4, 4)
    with pytest.raises(ValueError, match="past the slot"):
        rec.read_tensors(buffer, 0, 30, 1)  # an entry longer than the slot


def test_an_error_message_is_cut_to_the_slot() -> None:
    buffer = memoryview(bytearray(8192))
    length = rec.write_message(buffer, 4096, 100, "é" * 200)
    assert length == 100
    assert rec.read_message(buffer, 4096, length).startswith("é" * 50)


def test_slot_pool_hands_out_each_slot_once_and_refuses_a_double_free() -> None:
    pool = SlotPool(3)
    taken = [pool.take(), pool.take(), pool.take()]
    assert sorted(taken) == [0, 1, 2]  # type: ignore[type-var]
    assert pool.take() is None
    assert pool.in_use() == 3
    pool.free(1)
    assert pool.take() == 1  # last freed, first taken
    pool.free(1)
    with pytest.raises(ValueError, match="already free"):
        pool.free(1)
    assert pool.free_count() == 1


def test_arena_is_an_anonymous_sealed_memfd_and_closing_it_leaves_no_descriptor() -> None:
    arena = Arena.create(4, 5000)
    assert arena.slot_bytes == 8192  # whole pages
    link = os.readlink(f"/proc/self/fd/{arena.fd}")
    assert link.startswith("/memfd:gateway-arena")
    seals = fcntl.fcntl(arena.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    with pytest.raises(OSError):
        os.ftruncate(arena.fd, 4096)  # nobody can shrink it under the other's mapping

    peer = Arena.attach(os.dup(arena.fd), 4, 8192)
    arena.view[8192:8196] = b"ping"
    assert bytes(peer.view[8192:8196]) == b"ping"  # one memory, two mappings

    rec.write_tensors(peer.view, 0, 8192, [np.ones(4, np.float32)])
    held = rec.read_tensors(peer.view, 0, 8192, 1)
    assert not peer.close()  # a live view keeps the mapping
    del held
    assert peer.close()
    assert arena.close()
    mine = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if _readable_link(fd)]
    assert not [link for link in mine if "gateway-arena" in link]


def _readable_link(fd: str) -> bool:
    try:
        os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False
    return True


def test_attach_refuses_an_unsealed_or_short_arena() -> None:
    fd = os.memfd_create("not-sealed")
    os.ftruncate(fd, 8192)
    with pytest.raises(ValueError, match="not sealed"):
        Arena.attach(fd, 2, 4096)
    arena = Arena.create(1, 4096)
    with pytest.raises(ValueError, match="smaller"):
        Arena.attach(os.dup(arena.fd), 4, 4096)
    assert arena.close()
