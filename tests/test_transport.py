"""Messages through a real socket pair and real memfd arenas."""

from __future__ import annotations

import os
import socket
from multiprocessing.connection import Connection

import numpy as np
import pytest

from shmengine.runtime.sharedmem import INITIAL_ARENA, SHRINK_ABOVE, Arena
from shmengine.runtime.transport import SHM_THRESHOLD, recv_message, send_message


@pytest.fixture
def channel():
    a, b = socket.socketpair()
    sender, receiver = Connection(a.detach()), Connection(b.detach())
    writer = Arena.create("test")
    reader = Arena(os.dup(writer.fd), writable=False)
    yield sender, receiver, writer, reader
    for thing in (sender, receiver, writer, reader):
        thing.close()


def _frame_size(sender, receiver, writer, message) -> int:
    send_message(sender, message, writer)
    return len(receiver.recv_bytes())


def test_mixed_message_round_trips_as_owned_writable_copies(channel):
    sender, receiver, writer, reader = channel
    big = np.arange(300_000, dtype=np.float32)
    small = np.arange(10, dtype=np.int64)
    send_message(sender, {"big": big, "small": small, "meta": ["a", 1, None]}, writer)
    got = recv_message(receiver, reader, copy=True)
    np.testing.assert_array_equal(got["big"], big)
    np.testing.assert_array_equal(got["small"], small)
    assert got["meta"] == ["a", 1, None]
    assert got["big"].flags.writeable and got["small"].flags.writeable
    writer.reserve(big.nbytes)[: big.nbytes] = bytes(big.nbytes)  # the next message overwrites the arena
    np.testing.assert_array_equal(got["big"], big)  # ... and the copy does not change


def test_views_are_read_only_and_zero_copy(channel):
    sender, receiver, writer, reader = channel
    big = np.arange(300_000, dtype=np.float32)
    send_message(sender, big, writer)
    view = recv_message(receiver, reader, copy=False)
    assert not view.flags.writeable
    np.testing.assert_array_equal(view, big)
    writer.reserve(big.nbytes)[:4] = np.float32(-1).tobytes()
    assert view[0] == -1  # it is the arena itself


@pytest.mark.parametrize("n", [4, 100_000])
def test_read_only_arrays_arrive_writable_in_a_copy(channel, n):
    sender, receiver, writer, reader = channel
    array = np.ones(n, np.float32)
    array.flags.writeable = False
    send_message(sender, array, writer)
    got = recv_message(receiver, reader, copy=True)
    assert got.flags.writeable
    np.testing.assert_array_equal(got, array)


def test_threshold_decides_what_goes_through_the_arena(channel):
    sender, receiver, writer, reader = channel
    below = np.zeros(SHM_THRESHOLD // 4 - 16, np.float32)
    above = np.zeros(SHM_THRESHOLD // 4, np.float32)
    assert _frame_size(sender, receiver, writer, below) > below.nbytes  # pickled in-band
    assert _frame_size(sender, receiver, writer, above) < 1024  # only a reference travels


def test_arena_grows_for_a_big_message_and_shrinks_afterwards(channel):
    sender, receiver, writer, reader = channel
    huge = np.ones((SHRINK_ABOVE * 2) // 4, np.float32)
    send_message(sender, huge, writer)
    np.testing.assert_array_equal(recv_message(receiver, reader, copy=True), huge)
    assert os.fstat(writer.fd).st_size >= huge.nbytes
    small = np.full(SHM_THRESHOLD, 3, np.float32)
    send_message(sender, small, writer)
    np.testing.assert_array_equal(recv_message(receiver, reader, copy=True), small)
    assert os.fstat(writer.fd).st_size <= max(2 * small.nbytes + 64, INITIAL_ARENA)
    send_message(sender, huge, writer)  # and grows again; the reader remaps
    np.testing.assert_array_equal(recv_message(receiver, reader, copy=True), huge)
