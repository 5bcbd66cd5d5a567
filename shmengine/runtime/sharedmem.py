"""Shared memory: the named weights segment, and anonymous growable arenas for tensors.

* The **weights segment** is a POSIX shared memory object (a file in ``/dev/shm``, what
  ``multiprocessing.shared_memory`` creates), written once by the supervisor and then made
  read-only (mode 0400; every other process maps it ``PROT_READ``). It needs a *name*: ONNX
  Runtime's graph optimizers (constant folding of a ``Cast`` over a weight, say) read the bytes
  of an initializer from its external-data path, so the skeleton graph names this file. The name
  is unguessable (128 random bits), the file is created ``O_EXCL`` with mode 0600, and exactly one
  owner unlinks it: the supervisor on ``close()``, or the fork server when the supervisor dies
  (``zygote.py``). We do not use ``multiprocessing.shared_memory.SharedMemory`` itself because on
  Python < 3.13 every attach registers with the resource tracker, which may unlink a segment
  others still use (CPython gh-82300); descriptors reach workers by inheritance instead.
* **Arenas** carry tensors too large to pickle through a pipe, one per direction per worker.
  They need no name, so they are ``memfd_create`` files: nothing in ``/dev/shm`` to leak, and
  the kernel frees them with the last descriptor, whoever dies in whatever order.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets

__all__ = ["SharedSegment", "Arena", "ALIGNMENT", "SHM_DIR", "SEGMENT_PREFIX", "align_up", "unlink_segment",
           "prepack_directory"]

# Tensor data is aligned so that every SIMD load ORT may do is aligned (AVX-512 wants 64 bytes).
ALIGNMENT = 64
SHM_DIR = "/dev/shm"
# Arenas start at 1 MiB; one that grew past 16 MiB shrinks when a message needs under a quarter.
INITIAL_ARENA = 1 << 20
SHRINK_ABOVE = 16 << 20
SEGMENT_PREFIX = "shmengine-"


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class SharedSegment:
    """A named shared memory segment mapped into this process, read-only or read-write.

    ``fd`` stays open while the segment is open: it is what children inherit.
    """

    def __init__(self, fd: int, size: int, *, writable: bool, name: str | None = None):
        self.fd = fd
        self.size = size
        self.writable = writable
        self.name = name
        self._map: mmap.mmap | None = None
        self.buffer = memoryview(b"")
        self._map_now()

    def _map_now(self) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        # mmap of length 0 is an error; an empty model still gets a valid (1-byte) mapping.
        self._map = mmap.mmap(self.fd, max(self.size, 1), flags=mmap.MAP_SHARED, prot=prot)
        self.buffer = memoryview(self._map)[: self.size]

    def _unmap(self) -> None:
        self.buffer.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # Someone still holds a view (an OrtValue over a weight, say); the mapping then
                # lives until that view dies. Closing the descriptor is still right.
                pass
            self._map = None

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @classmethod
    def create(cls, size: int, label: str = "w") -> "SharedSegment":
        """A new writable segment of ``size`` zero bytes under an unguessable name in ``/dev/shm``."""
        name = f"{SEGMENT_PREFIX}{label}-{secrets.token_hex(16)}"
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, max(size, 1))
            return cls(fd, size, writable=True, name=name)
        except BaseException:
            os.close(fd)
            unlink_segment(name)
            raise

    @classmethod
    def attach(cls, fd: int, *, name: str | None = None) -> "SharedSegment":
        """Map, read-only, a segment whose descriptor this process inherited."""
        return cls(fd, os.fstat(fd).st_size, writable=False, name=name)

    def resize(self, size: int) -> None:
        """Grow or shrink a writable segment (before it is frozen)."""
        self._unmap()
        os.ftruncate(self.fd, max(size, 1))
        self.size = size
        self._map_now()

    def freeze(self) -> None:
        """End writing: make the file read-only (0400) and swap our read-write descriptor for a
        read-only one, so that no process that inherits it can map the weights writable. The
        read-write descriptor stays private to this process (for :meth:`discard`)."""
        self._unmap()
        os.fchmod(self.fd, 0o400)
        readonly = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._writer_fd = self.fd
        self.fd = readonly
        self.writable = False
        self._map_now()

    def discard(self, start: int, end: int) -> None:
        """Give the pages of ``[start, end)`` back to the system (they read as zeros afterwards)."""
        writer = getattr(self, "_writer_fd", -1)
        if writer < 0 or end <= start:
            return
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        if libc.fallocate(writer, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, start, end - start) != 0:
            raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE) failed on the weights segment")

    def unlink(self) -> None:
        """Remove the name from ``/dev/shm``, and the files named after it (there and in
        :func:`prepack_directory`); mappings and descriptors stay valid."""
        if self.name:
            unlink_segment(self.name)

    def close(self) -> None:
        """Unmap and close the descriptor (the name stays until :meth:`unlink`)."""
        if self.fd < 0:
            return
        self._unmap()
        os.close(self.fd)
        self.fd = -1
        if getattr(self, "_writer_fd", -1) >= 0:
            os.close(self._writer_fd)
            self._writer_fd = -1


def prepack_directory(create: bool = True) -> str:
    """Where the prepacked model files of an engine go (named ``<segment name>-*``): a directory
    on disk, ``$SHMENGINE_PREPACK_DIR`` or else ``$XDG_CACHE_HOME/shmengine/prepacked``
    (``~/.cache/...``); ``/dev/shm`` where that cannot be made or written.

    Why on disk: ORT's file keeps the original of every prepacked weight beside its prepacked
    copy, and reads the original only while a session loads (it finds the prepacked copy by a
    hash of the original; measured, ORT 1.31: with the originals punched out of the file after
    loading, the logits are the same bits, and no worker keeps their pages mapped). In ``/dev/shm``
    the whole file is memory for the engine's whole life (GPT-2-124M int8: 274 MiB, of which 156
    are originals); on disk its unused pages are only page cache, which the kernel may evict."""
    chosen = os.environ.get("SHMENGINE_PREPACK_DIR")
    if not chosen:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        chosen = os.path.join(cache, "shmengine", "prepacked")
    chosen = os.path.abspath(chosen)  # workers started later, in another directory, load these paths
    if not create:
        return chosen
    try:
        os.makedirs(chosen, mode=0o700, exist_ok=True)
        if os.access(chosen, os.W_OK | os.X_OK):
            return chosen
    except OSError:
        pass
    import logging

    logging.getLogger("shmengine").warning(
        "prepacked models go to /dev/shm (memory): %s cannot be made or written; set SHMENGINE_PREPACK_DIR to a "
        "writable directory on disk", chosen)
    return SHM_DIR


def unlink_segment(name: str) -> None:
    """Remove ``/dev/shm/<name>`` and the files derived from it (``<name>-*``: prepacked models,
    in ``/dev/shm`` or in :func:`prepack_directory`) if they are still there. Safe to call from
    any owner, any number of times."""
    paths = [os.path.join(SHM_DIR, name)]
    for directory in dict.fromkeys([SHM_DIR, prepack_directory(create=False)]):
        try:
            paths += [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(name + "-")]
        except OSError:
            pass
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class Arena:
    """One direction of a worker's tensor channel: a growable memfd written by one side only.

    The pool keeps at most one message in flight per worker and direction, so the writer may
    always start at offset 0: by the time it writes again, the reader is done with the last one.
    """

    def __init__(self, fd: int, *, writable: bool):
        self.fd = fd
        self.writable = writable
        self._map: mmap.mmap | None = None
        self._mapped = 0
        self._remap(os.fstat(fd).st_size)

    @classmethod
    def create(cls, label: str, size: int = INITIAL_ARENA) -> "Arena":
        fd = os.memfd_create(f"shmengine-{label}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, writable=True)

    def _remap(self, size: int) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view of the old mapping is still alive; it is unmapped when that goes
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self.writable else 0)
        self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=prot) if size else None
        self._mapped = size

    def reserve(self, nbytes: int) -> memoryview:
        """Writer side: a view of at least ``nbytes``, growing the file when it is too small and
        shrinking it when it is far too large (one huge batch must not pin memory for ever).

        Shrinking is safe: the reader is done with the last message before the writer writes the
        next one, and it never touches its (possibly larger) old mapping past the new message.
        """
        if nbytes > self._mapped:
            self._resize(max(nbytes, 2 * self._mapped))
        elif self._mapped > SHRINK_ABOVE and nbytes * 4 < self._mapped:
            self._resize(max(2 * nbytes, INITIAL_ARENA))
        return memoryview(self._map)

    def _resize(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self._remap(size)

    def view(self, end: int) -> memoryview:
        """Reader side: a view covering ``[0, end)``, remapping if the writer grew the file."""
        if end > self._mapped:
            self._remap(os.fstat(self.fd).st_size)
        return memoryview(self._map)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
        os.close(self.fd)
        self.fd = -1
