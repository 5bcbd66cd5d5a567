"""Data parallelism across MPI ranks: ``mpirun -np N shmengine-run translate|generate|score``.

Every rank builds its own engine (its own ``inter_threads`` workers). Rank 0 runs the command
exactly as one process does — it reads the input, tokenizes, writes every output line in input
order — except that its model is a :class:`RankModel`: each asynchronous batch call the command
makes (one per chunk of lines: ``translate_batch`` / ``generate_batch`` / ``score_batch``) goes
to rank ``k % N`` for the k-th call. The other ranks only serve those calls. Because rank 0 cuts
the input into the very chunks one process cuts, each chunk is batched, run and written as in
one process: the output is the same, every line exactly once, and it streams.

::

    rank 0: the command, unchanged                               rank r > 0: serve()
    ───────────────────────────────                              ───────────────────
    read, tokenize ─▶ call k ─┬─ k % N == 0: own engine
                              └─ else: _Call(k, method, args) ──▶ own engine (own workers)
    write lines in order ◀── futures ◀──── _Reply(k, results) ◀──┘
                         ◀──── _Failure(rank, why): any rank tells every rank ────▶
    end of the command ───────────────────── _End() ─────────────────▶ close, exit 0

* Only rank 0 reads the input, so a file on rank 0's host is enough. stdin is refused under
  mpirun: Open MPI 5's mpirun passes stdin on to rank 0 but never its end (openpmix/openpmix#4024).
* Rank 0's MPI traffic runs in one thread (``shmengine-mpi``), which completes the futures; the
  others poll in their main thread. Every MPI call is non-blocking and polled, so signals are
  handled: when a rank dies, mpirun sends SIGTERM to the others. Rank 0's MPI thread also
  watches the pids of the ranks on its own host, so a dead one fails its calls at once, named.
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
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError, ShmEngineError
from .mpi import MpiInfo, remove_transport_files_at_exit

__all__ = ["COMMANDS", "RankFailedError", "RankModel", "is_distributed", "run", "attach"]

COMMANDS = ("translate", "generate", "score")
_POLL_S = 0.002
_LIVENESS_S = 0.2
_TAG = 13
_BATCH_METHODS = ("translate_batch", "generate_batch", "score_batch")


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
    args: tuple
    kwargs: dict


@dataclass
class _Reply:
    index: int
    results: list | None = None
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
        me = _Peer(self.rank, socket.gethostname(), os.getpid(), _fingerprint(args))
        self.peers: list[_Peer] = self.comm.allgather(me)
        remove_transport_files_at_exit()
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


@dataclass
class _Outstanding:
    rank: int
    futures: list[Future] = field(default_factory=list)


class _Dispatcher(threading.Thread):
    """Rank 0's MPI thread: sends the calls of other ranks, completes their futures."""

    def __init__(self, world: _World, check: Callable[[], None]):
        super().__init__(name="shmengine-mpi", daemon=True)
        self.world, self.check = world, check
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.outstanding: dict[int, _Outstanding] = {}
        self.lock = threading.Lock()
        self.failure: RankFailedError | None = None
        self.stopping = threading.Event()
        self.send_end = True
        self.finished = threading.Event()

    def submit(self, call: _Call, rank: int, futures: list[Future]) -> None:
        with self.lock:
            if self.failure is not None:
                raise self.failure
            self.outstanding[call.index] = _Outstanding(rank, futures)
        self.outbox.put((call, rank))

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
            entry = self.outstanding.pop(reply.index, None)
        if entry is None:
            raise RuntimeError(f"rank answered call {reply.index}, which it was never sent or answered twice")
        if reply.error is not None:
            for future in entry.futures:
                future.set_exception(reply.error)
        elif len(reply.results) != len(entry.futures):
            error = RuntimeError(f"{self.world.name(entry.rank)} answered {len(reply.results)} of {len(entry.futures)} examples")
            for future in entry.futures:
                future.set_exception(error)
        else:
            for future, result in zip(entry.futures, reply.results):
                future.set_result(result)

    def _fail_all(self, error: RankFailedError) -> None:
        with self.lock:
            self.failure = error
            entries, self.outstanding = list(self.outstanding.values()), {}
        for entry in entries:
            for future in entry.futures:
                if not future.done():
                    future.set_exception(error)


class RankModel:
    """Rank 0's model: every asynchronous batch call goes to the next rank in turn.

    Everything else (the vocabulary, synchronous calls, ``*_iterable``, attributes) is the real
    model's; the ``*_iterable`` methods run the real class's code over this object, so their
    chunks become calls spread over the ranks.
    """

    def __init__(self, model, world: _World, check: Callable[[], None]):
        self._model, self._world = model, world
        self._calls = 0
        self._dispatcher = _Dispatcher(world, check)
        self._dispatcher.start()

    def __getattr__(self, name):
        attribute = getattr(self._model, name)
        function = getattr(type(self._model), name, None)
        if name.endswith("_iterable") and callable(function):
            return lambda *args, **kwargs: function(self, *args, **kwargs)
        return attribute

    def _spread(self, method: str, args: tuple, kwargs: dict):
        if not kwargs.get("asynchronous"):
            return getattr(self._model, method)(*args, **kwargs)
        index, rank = self._calls, self._calls % self._world.size
        self._calls += 1
        if rank == 0:
            return getattr(self._model, method)(*args, **kwargs)
        examples = len(args[0]) if args else len(kwargs.get("source", kwargs.get("start_tokens", ())))
        futures = [Future() for _ in range(examples)]
        for future in futures:
            future.set_running_or_notify_cancel()
        self._dispatcher.submit(_Call(index, method, args, kwargs), rank, futures)
        return futures

    def translate_batch(self, *args, **kwargs):
        return self._spread("translate_batch", args, kwargs)

    def generate_batch(self, *args, **kwargs):
        return self._spread("generate_batch", args, kwargs)

    def score_batch(self, *args, **kwargs):
        return self._spread("score_batch", args, kwargs)

    def close(self, *, ended: bool = True) -> None:
        """Tell the other ranks the run is over (unless it failed: :func:`run` tells them why
        instead), then close rank 0's engine."""
        self._dispatcher.send_end = ended
        self._dispatcher.stopping.set()
        self._dispatcher.finished.wait(30)
        self._model.close()
        if ended:
            size = self._world.size
            counts = [len(range(r, self._calls, size)) for r in range(size)]
            print(
                f"{self._calls} batch calls over {size} MPI ranks: "
                + ", ".join(f"rank {r} {n}" for r, n in enumerate(counts)),
                file=sys.stderr,
            )

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ended=exc_type is None)


# -- ranks > 0 --------------------------------------------------------------------------------


class _Served(SystemExit):
    """Raised on a rank > 0 when rank 0 said the run is over: the command stops there, exit 0."""


def _serve(model, world: _World, check: Callable[[], None]) -> None:
    running: list[tuple[_Call, list[Future] | BaseException]] = []
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
                    if call.method not in _BATCH_METHODS:
                        raise RuntimeError(f"rank 0 asked for {call.method!r}, which is not a batch method")
                    try:
                        running.append((call, getattr(model, call.method)(*call.args, **call.kwargs)))
                    except Exception as exc:  # the input's fault: rank 0's caller gets it
                        running.append((call, exc))
            while running and (isinstance(running[0][1], BaseException) or all(f.done() for f in running[0][1])):
                call, outcome = running.pop(0)
                world.send(_reply(call, outcome), 0)
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


def _reply(call: _Call, outcome) -> _Reply:
    if isinstance(outcome, BaseException):
        return _Reply(call.index, error=outcome)
    try:
        return _Reply(call.index, results=[f.result() for f in outcome])
    except Exception as exc:
        return _Reply(call.index, error=exc)


# -- the launcher's two hooks -----------------------------------------------------------------


def run(args, command: Callable, check: Callable[[], None]) -> int:
    """Run ``command(args)`` as this MPI rank (the launcher's hook around a text command).

    ``check()`` raises KeyboardInterrupt once a stop was asked for (the launcher's signals).
    Every rank runs the command; :func:`attach` turns rank 0's model into a :class:`RankModel`
    and makes the others serve. Whichever rank fails tells the others first.
    """
    global _world
    if args.command != "score" and args.input is None:
        # Checked on every rank alike, so all of them stop here and none waits for the others.
        raise InvalidInputError(
            "under mpirun, give the input as --input FILE: Open MPI 5's mpirun passes stdin on to rank 0 but never "
            "its end (openpmix/openpmix#4024), so the run would wait for ever (output to stdout works)"
        )
    _world = world = _World(args)
    world.check = check
    try:
        return command(args)
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


def attach(model):
    """The launcher's hook on the model it built: on rank 0 a :class:`RankModel`; on the other
    ranks, serve rank 0's calls until it says the run is over, then stop the command."""
    world = _world
    if world is None:
        return model
    if world.rank == 0:
        return RankModel(model, world, world.check)
    _serve(model, world, world.check)
    raise _Served(0)
