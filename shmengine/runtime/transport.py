"""Messages between the supervisor and a worker: pickle through a socket, big buffers through an arena.

A message is pickled with protocol 5. Each buffer the pickler meets (a numpy array's data) of at
least ``SHM_THRESHOLD`` bytes is copied into the sender's :class:`~shmengine.runtime.sharedmem.Arena`
instead of into the pickle, and the frame on the socket only says where it lies::

    frame = u32 n_buffers | n x (u64 offset, u64 nbytes) | pickle bytes

Below the threshold a pipe is cheaper than the bookkeeping; ``tools/bench_transport.py``
measures where the two cross on this machine, and that is where the default sits.

Only the supervisor and its own workers ever write to these sockets, so unpickling their
frames is safe: nothing that arrives from outside (a model file, an input file) is unpickled.
"""

from __future__ import annotations

import io
import pickle
import struct
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from shmengine.runtime.sharedmem import Arena, align_up

__all__ = ["send_message", "recv_message", "SHM_THRESHOLD"]

# Measured with tools/bench_transport.py on 2 cores (2026-11-23, two runs): at 4 KiB the two paths
# tie within noise (0.99x-1.06x); from 16 KiB the arena wins (1.1-1.24x, 1.2-1.3x at 64 KiB); past
# the socket buffer (~200 KiB) the socket falls off a cliff (256 KiB: 434 vs 107 µs).
SHM_THRESHOLD = 16 * 1024

_COUNT = struct.Struct("<I")
_REF = struct.Struct("<QQ")


def _rebuild_array(buffer, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Unpickle an array that was read-only in the sender (see :class:`_Pickler`)."""
    if isinstance(buffer, memoryview) and isinstance(buffer.obj, bytearray):
        return np.frombuffer(buffer.obj, dtype).reshape(shape)  # recv_message's own copy: writable
    array = np.frombuffer(buffer, dtype).reshape(shape)
    return array.copy() if isinstance(buffer, bytes) else array  # in-band: small, copy it writable


class _Pickler(pickle.Pickler):
    """Pickle protocol 5, except that read-only arrays do not arrive read-only.

    numpy pickles a read-only array (a worker's view of its inputs, echoed back, say) with a
    read-only buffer, and the unpickler then makes even the receiver's own copy read-only. Such
    arrays are pickled here so that the receiver decides: its copy is writable, a view is not.
    """

    def reducer_override(self, obj):
        if type(obj) is np.ndarray and not obj.flags.writeable and obj.flags.c_contiguous and not obj.dtype.hasobject:
            return _rebuild_array, (pickle.PickleBuffer(obj), obj.dtype.str, obj.shape)
        return NotImplemented


def send_message(conn: Connection, message: Any, arena: Arena | None, threshold: int = SHM_THRESHOLD) -> None:
    """Pickle ``message`` to ``conn``, moving large buffers through ``arena`` (if given)."""
    big: list[pickle.PickleBuffer] = []

    def place_out_of_band(buf: pickle.PickleBuffer) -> bool:
        if arena is not None and buf.raw().nbytes >= threshold:
            big.append(buf)
            return False
        return True  # serialise in-band

    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=place_out_of_band).dump(message)
    body = stream.getbuffer()
    refs = []
    if big:
        sizes = [buf.raw().nbytes for buf in big]
        total = sum(align_up(n) for n in sizes)
        view = arena.reserve(total)
        offset = 0
        for buf, n in zip(big, sizes):
            view[offset : offset + n] = buf.raw()
            refs.append((offset, n))
            offset += align_up(n)
        view.release()
    header = _COUNT.pack(len(refs)) + b"".join(_REF.pack(o, n) for o, n in refs)
    conn.send_bytes(header + body)


def recv_message(conn: Connection, arena: Arena | None, *, copy: bool) -> Any:
    """Receive one message sent by :func:`send_message`.

    ``copy=False`` gives arrays that are read-only views into the arena: valid until the peer
    writes its next message, which the one-in-flight protocol makes safe for the duration of a
    batch. ``copy=True`` gives arrays the caller owns, writable.
    """
    frame = conn.recv_bytes()
    (count,) = _COUNT.unpack_from(frame, 0)
    pos = _COUNT.size
    buffers = []
    if count:
        refs = [_REF.unpack_from(frame, pos + i * _REF.size) for i in range(count)]
        pos += count * _REF.size
        view = arena.view(max(o + n for o, n in refs))
        for offset, n in refs:
            part = view[offset : offset + n]
            buffers.append(bytearray(part) if copy else part.toreadonly())
    return pickle.loads(memoryview(frame)[pos:], buffers=buffers)
