"""Data parallelism across MPI ranks: ``mpirun -np N shmengine-run translate|generate|score``.

Every rank builds its own engine (its own ``inter_threads`` workers). Rank 0 runs the command
exactly as one process does — it reads the input, tokenizes, cuts sub-batches, draws the
sampling seeds, converts the results and writes every output line in input order — except that
its model's pool is a :class:`SpreadPool`: the n-th batch goes to rank ``n % N`` (rank 0's own
pool for its share). The other ranks only serve those batches with their pools. Only a batch's
(method, payload) travels, and its raw result comes back, so the output is one process's: the
same lines, every one exactly once, streaming, seeded sampling included.

::

    rank 0: the command, unchanged                               rank r > 0: serve()
    ───────────────────────────────                              ───────────────────
    read, tokenize, batch ─▶ batch n ─┬─ n % N == 0: own pool
                                      └─ else: _Call(n, method, payload) ──▶ own pool (own workers)
    convert, write in order ◀── future ◀──────── _Reply(n, result) ◀────────┘
                            ◀──── _Failure(rank, why): any rank tells every rank ────▶
    end of the command ──────────────────────── _End() ──────────────────▶ close, exit 0

* Only rank 0 reads the input, so a file on rank 0's host is enough. stdin is refused under
  mpirun: Open MPI 5's mpirun passes stdin on to rank 0 but never its end (openpmix/openpmix#4024).
* Rank 0's MPI traffic runs in one thread (``shmengine-mpi``), which completes the futures; the
  others poll in their main thread. Every MPI call is non-blocking and polled, so signals are
  handled: when a rank dies, mpirun sends SIGTERM to the others. Rank 0's MPI thread also
  watches the pids of the ranks on its own host, so a dead one fails its batches at once, named.
* The only collective is one ``allgather`` at start-up, before any engine exists: each rank's
  host and pid, and a fingerprint of its arguments (ranks started differently are refused).
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from shmengine.errors import InvalidInputError, ShmEngineError
from shmengine.runtime.mpi import MpiInfo, remove_transport_files_at_exit

__all__ = ["COMMANDS", "RankFailedError", "SpreadPool", "is_distributed", "run", "attach"]

COMMANDS = ("translate", "generate", "score")
_POLL_S = 0.002
_LIVENESS_S = 0.2
_TAG = 13


class RankFailedError(ShmEngineError):
    """Another MPI rank failed or died; ``rank`` names it (None when it cannot be told)."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


# -- messages (one small class each, never a bare tuple) --------------------------------------


@dataclass
class _Peer:
    rank: int
    host: str
    pid: int
    fingerprint: str


@dataclass
class _Call:
    index: int
    method: str
    payload: Any


@dataclass
class _Reply:
    index: int
    result: Any = None
    error: BaseException | None = None


@dataclass
class _End:
    pass


@dataclass
class _Failure:
    rank: int
    message: str


def is_distributed(args) -> bool:
    """Whether this ``shmengine-run`` command runs as one rank of several (``mpirun -np N``, N > 1)."""
    return getattr(args, "command", None) in COMMANDS and MpiInfo.getNRanks() > 1


def _fingerprint(args) -> str:
    # Everything that decides an output line; the file names only matter on rank 0, which reads them.
    ignored = {"func", "input", "output", "source", "target", "verbose"}
    fields = sorted((k, repr(v)) for k, v in vars(args).items() if k not in ignored)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, ShmEngineError | ValueError | OSError) else f"{type(error).__name__}: {error}"


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class _World:
    """This rank's view of the job: the communicator, the peers, and the messages in flight."""

    def __init__(self, args):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ShmEngineError(
                f"shmengine-run was started as one of {MpiInfo.getNRanks()} MPI ranks, but mpi4py is not installed: "
                "pip install 'shmengine[mpi]' (or run it without mpirun)"
            ) from exc
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.sends: list = []
        remove_transport_files_at_exit()  # before anything here can fail
        me = _Peer(self.rank, socket.gethostname(), os.getpid(), _fingerprint(args))
        self.peers: list[_Peer] = self.comm.allgather(me)
        different = [p.rank for p in self.peers if p.fingerprint != self.peers[0].fingerprint]
        if different:
            raise InvalidInputError(
                f"MPI rank(s) {', '.join(map(str, different))} were started with shmengine-run arguments different "
                "from rank 0's; every rank must get the same model and options (only --input/--output/--source/"
                "--target may differ: rank 0 alone reads them)"
            )

    def name(self, rank: int) -> str:
        peer = self.peers[rank]
        return f"rank {rank} (pid {peer.pid} on {peer.host})"

    def send(self, message, dest: int) -> None:
        self.sends.append(self.comm.isend(message, dest=dest, tag=_TAG))
        self.flush()

    def flush(self) -> bool:
        """Complete what has left; True when nothing is in flight."""
        self.sends = [r for r in self.sends if not r.Test()]
        return not self.sends

    def receive(self) -> tuple[int, Any] | None:
        """The next message for this rank and its sender, or None; a peer's failure is raised."""
        status = self.MPI.Status()
        if not self.comm.iprobe(source=self.MPI.ANY_SOURCE, tag=_TAG, status=status):
            return None
        source = status.Get_source()
        message = self.comm.recv(source=source, tag=_TAG)
        if isinstance(message, _Failure):
            raise RankFailedError(f"{self.name(message.rank)} failed: {message.message}", message.rank)
        return source, message

    def gone(self) -> list[int]:
        """Ranks on this host whose process no longer runs (other hosts cannot be looked at)."""
        here = socket.gethostname()
        return [p.rank for p in self.peers if p.rank != self.rank and p.host == here and _process_gone(p.pid)]

    def fail_everyone(self, error: BaseException) -> None:
        """Tell every other rank why this one stops; wait a moment for the messages to leave."""
        failure = _Failure(self.rank, _describe(error))
        requests = [self.comm.isend(failure, dest=r, tag=_TAG) for r in range(self.size) if r != self.rank]
        deadline = time.monotonic() + 2.0
        while requests and time.monotonic() < deadline:
            requests = [r for r in requests if not r.Test()]
            time.sleep(_POLL_S)

    def died(self, ranks: list[int]) -> RankFailedError:
        names = ", ".join(self.name(r) for r in ranks)
        return RankFailedError(f"{names} died; rank {self.rank} stops too", ranks[0])


_world: _World | None = None


# -- rank 0 -----------------------------------------------------------------------------------


class _Dispatcher(threading.Thread):
    """Rank 0's MPI thread: sends the batches of other ranks, completes their futures."""

    def __init__(self, world: _World):
        super().__init__(name="shmengine-mpi", daemon=True)
        self.world = world
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outstanding: dict[int, tuple[int, Future]] = {}
        self.lock = threading.Lock()
        self.failure: RankFailedError | None = None
        self.stopping = threading.Event()
        self.send_end = True
        self.finished = threading.Event()

    def submit(self, call: _Call, rank: int, future: Future) -> None:
        with self.lock:
            if self.failure is not None:
                raise self.failure
            self.outstanding[call.index] = (rank, future)
        self.outbox.put((call, rank))

    def stop(self, *, ended: bool) -> None:
        """Stop the thread; with ``ended``, tell the other ranks the run is over first."""
        self.send_end = ended
        self.stopping.set()
        self.finished.wait(30)

    def run(self) -> None:
        world, last_look = self.world, 0.0
        try:
            while True:
                busy = False
                while not self.outbox.empty():
                    call, rank = self.outbox.get()
                    world.send(call, rank)
                    busy = True
                message = world.receive()
                if message is not None:
                    self._complete(message[1])
                    busy = True
                now = time.monotonic()
                if now - last_look > _LIVENESS_S:
                    last_look = now
                    gone = world.gone()
                    if gone:
                        raise world.died(gone)
                if self.stopping.is_set() and self.outbox.empty():
                    if self.send_end:
                        for r in range(1, world.size):
                            world.send(_End(), r)
                        while not world.flush():
                            time.sleep(_POLL_S)
                    return
                world.flush()
                if not busy:
                    time.sleep(_POLL_S)
        except BaseException as exc:
            error = exc if isinstance(exc, RankFailedError) else RankFailedError(f"rank 0's MPI thread failed: {exc}")
            self._fail_all(error)
        finally:
            self.finished.set()

    def _complete(self, reply: _Reply) -> None:
        with self.lock:
            _, future = self.outstanding.pop(reply.index, (None, None))
        if future is None:
            raise RuntimeError(f"a rank answered batch {reply.index}, which it was never sent or answered twice")
        if reply.error is not None:
            future.set_exception(reply.error)
        else:
            future.set_result(reply.result)

    def _fail_all(self, error: RankFailedError) -> None:
        with self.lock:
            self.failure = error
            entries, self.outstanding = list(self.outstanding.values()), {}
        for _, future in entries:
            if not future.done():
                future.set_exception(error)


class SpreadPool:
    """Rank 0's pool: the n-th batch runs on rank ``n % N`` (rank 0's own pool for its share).

    It stands where the model's :class:`pool.WorkerPool` stood, so everything above it is one
    process's code: the same tokenization, the same sub-batches (``max_batch_size``), the same
    per-batch sampling seeds, the same conversion of results. Only the (method, payload) of a
    batch travels, and its raw result comes back. Batches with a streaming callback run here.
    """

    def __init__(self, pool, world: _World, dispatcher: _Dispatcher):
        self._pool, self._world, self._dispatcher = pool, world, dispatcher
        self.batches = 0
        self.per_rank = [0] * world.size

    def __getattr__(self, name):
        return getattr(self._pool, name)

    def submit(self, method: str, payload, *, ping: bool = False, on_event=None, future: Future | None = None) -> Future:
        if ping or on_event is not None:
            return self._submit_here(method, payload, ping=ping, on_event=on_event, future=future)
        index, rank = self.batches, self.batches % self._world.size
        self.batches += 1
        self.per_rank[rank] += 1
        if rank == 0:
            return self._submit_here(method, payload, future=future)
        future = Future() if future is None else future
        if future.set_running_or_notify_cancel():
            self._dispatcher.submit(_Call(index, method, payload), rank, future)
        return future

    def _submit_here(self, method, payload, **options) -> Future:
        if options.get("future") is None:
            options.pop("future", None)
        return self._pool.submit(method, payload, **options)

    def describe(self) -> list[str]:
        return [f"Data parallel: {self._world.size} MPI ranks, this is rank 0 (it reads and writes)"] + self._pool.describe()


# -- ranks > 0 --------------------------------------------------------------------------------


class _Served(SystemExit):
    """Raised on a rank > 0 when rank 0 said the run is over: the command stops there, exit 0."""


def _serve(model, world: _World, check: Callable[[], None]) -> None:
    running: list[tuple[_Call, Future]] = []
    ended, last_look = False, 0.0
    try:
        while not ended or running:
            message = world.receive()
            busy = message is not None
            if message is not None:
                call = message[1]
                if isinstance(call, _End):
                    ended = True
                elif isinstance(call, _Call):
                    running.append((call, model._pool.submit(call.method, call.payload)))
            while running and running[0][1].done():
                call, future = running.pop(0)
                world.send(_reply(call, future), 0)
                busy = True
            now = time.monotonic()
            if now - last_look > _LIVENESS_S:
                last_look = now
                if 0 in world.gone():
                    raise world.died([0])
            world.flush()
            if not busy:
                check()
                time.sleep(_POLL_S)
        while not world.flush():
            check()
            time.sleep(_POLL_S)
    finally:
        model.close()


def _reply(call: _Call, future: Future) -> _Reply:
    error = future.exception()
    if error is not None:
        error.__cause__ = None  # a RemoteTraceback of this rank's worker: its text is in the message
        return _Reply(call.index, error=error)
    return _Reply(call.index, result=future.result())


# -- the launcher's two hooks -----------------------------------------------------------------


def run(args, command: Callable, check: Callable[[], None]) -> int:
    """Run ``command(args)`` as this MPI rank (the launcher's hook around a text command).

    ``check()`` raises KeyboardInterrupt once a stop was asked for (the launcher's signals).
    Every rank runs the command; :func:`attach` spreads rank 0's batches over the ranks
    (:class:`SpreadPool`) and makes the others serve them. Whichever rank fails tells the others first.
    """
    global _world
    if MpiInfo.getNRanks() > 1:  # MPI is up (MpiInfo asked it): its transport file must not outlive us
        remove_transport_files_at_exit()
    if args.command != "score" and args.input is None:
        # Checked on every rank alike, so all of them stop here and none waits for the others.
        raise InvalidInputError(
            "under mpirun, give the input as --input FILE: Open MPI 5's mpirun passes stdin on to rank 0 but never "
            "its end (openpmix/openpmix#4024), so the run would wait for ever (output to stdout works)"
        )
    _world = world = _World(args)
    world.check = check
    world.dispatcher = None
    try:
        code = command(args)
        if world.dispatcher is not None:
            world.dispatcher.stop(ended=True)
            counts = ", ".join(f"rank {r} {n}" for r, n in enumerate(world.spread.per_rank))
            print(f"{world.spread.batches} batches over {world.size} MPI ranks: {counts}", file=sys.stderr)
        return code
    except _Served:
        return 0
    except RankFailedError:
        raise
    except KeyboardInterrupt:
        gone = world.gone()
        if gone:
            raise world.died(gone) from None
        world.fail_everyone(RankFailedError("interrupted by a signal"))
        raise
    except BaseException as exc:
        world.fail_everyone(exc)
        raise
    finally:
        if world.dispatcher is not None and not world.dispatcher.finished.is_set():
            world.dispatcher.stop(ended=False)


def attach(model):
    """The launcher's hook on the model it built: on rank 0 its pool becomes a :class:`SpreadPool`;
    on the other ranks, serve rank 0's batches until it says the run is over, then stop the command."""
    world = _world
    if world is None:
        return model
    if world.rank == 0:
        world.dispatcher = _Dispatcher(world)
        world.spread = model._pool = SpreadPool(model._pool, world, world.dispatcher)
        world.dispatcher.start()
        return model
    _serve(model, world, world.check)
    raise _Served(0)
