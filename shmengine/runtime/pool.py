"""The worker pool: a bounded queue of batches, forked workers, futures, and crash recovery.

Data flow (after ``concurrent.futures.process``)::

    caller threads                      manager thread (owns every socket)           workers
    ──────────────                      ──────────────────────────────────           ───────
    submit() ─▶ pending (bounded deque) ─▶ dispatch to an idle worker ── socket+arena ─▶ run
      ▲   blocks while full                                                              │
      └─ Future ◀── set_result / set_exception ◀── result or error ◀── socket+arena ─────┘
                                              ◀── "exited pid, code" ◀── fork server

* Each worker has at most one batch in flight. That keeps the arenas single-writer, balances
  load perfectly, and makes crash handling exact: the manager knows which batch a dead worker
  held.
* The manager sleeps in one selector on every worker socket, the fork server's socket and a
  wake-up pipe: a worker's death is seen at once (its socket reads EOF, then the fork server
  reports the exit status), never by polling. The selector lives as long as the pool, so a
  wake-up costs one ``epoll_wait``, however many workers there are.
* A batch whose worker dies is retried once on a fresh worker; if that one dies too, its future
  fails with :class:`WorkerCrashedError` naming the signal or exit code. The dead worker is
  replaced, so the pool stays at full strength.
* ``close()`` fails what is queued or running with :class:`EngineClosedError`, kills the workers
  and returns; nothing is left running.
* The dispatch policy decides which worker takes a batch and what a death means. The default,
  :class:`AnyIdleWorker`, is what the points above describe (data parallel). :class:`Lockstep`
  gives the n-th batch submitted to slot ``n % workers`` and nothing else: the pools of the
  ranks of a tensor-parallel group, fed the same calls in the same order, run each batch on the
  same-numbered worker everywhere. A member that dies cannot be replaced (its peers are inside a
  collective with it), so the batch fails with :class:`WorkerCrashedError` and the pool breaks:
  every other queued or running batch fails with :class:`EngineBrokenError`, no respawn.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from shmengine.errors import (
    EngineBrokenError,
    EngineClosedError,
    RemoteTraceback,
    WorkerCrashedError,
    WorkerStartupError,
    describe_exit,
)
from shmengine.model.weights import WeightStore
from shmengine.runtime.messages import (
    BatchDone,
    BatchEvent,
    BatchFailed,
    RunBatch,
    StopExamples,
    WorkerExited,
    WorkerReady,
    WorkerSpawned,
    WorkerStartFailed,
)
from shmengine.runtime.sessions import SessionSettings
from shmengine.runtime.sharedmem import Arena
from shmengine.runtime.threads import THREAD_ENV_VARS, thread_environment
from shmengine.runtime.transport import recv_message, send_message
from shmengine.runtime.worker import ProgramSpec, WorkerConfig
from shmengine.runtime.zygote import ForkServer

__all__ = ["WorkerPool", "DispatchPolicy", "AnyIdleWorker", "Lockstep", "PoolObserver", "resolve_queue_size"]

logger = logging.getLogger("shmengine")

# A worker that dies this many times in a row before becoming ready is not respawned again:
# something (memory, a driver) makes starting impossible, and looping would hide it.
MAX_CONSECUTIVE_START_FAILURES = 3
# After a worker's socket reads EOF, how long to wait for the fork server's exit report before
# asking it to SIGKILL the pid (a worker that closed its socket but did not exit).
EXIT_REPORT_GRACE = 3.0


def resolve_queue_size(max_queued_batches: int, workers: int) -> int | None:
    """CTranslate2's convention: 0 = automatic (4 x workers), -1 = unlimited (None), N = N."""
    if max_queued_batches == 0:
        return 4 * workers
    if max_queued_batches == -1:
        return None
    if max_queued_batches < -1:
        raise ValueError(f"max_queued_batches must be -1 (unlimited), 0 (automatic) or > 0, got {max_queued_batches}")
    return max_queued_batches


@dataclass
class _Batch:
    id: int
    kind: str  # "run": the program's method; "ping": echoed by the worker itself
    method: str
    payload: Any
    future: Future
    attempts: int = 0
    on_event: Callable[[Any], list[int] | None] | None = None  # runs in the manager thread
    slot: int | None = None  # the only worker that may run it (Lockstep); None: any


class DispatchPolicy:
    """Which worker runs a batch, and what the death of a worker that held one means."""

    #: replace a dead worker (and retry its batch once) instead of failing the pool
    respawn = True

    def slot_for(self, number: int, workers: int) -> int | None:
        """The slot the ``number``-th submitted batch must run on, or None for any idle worker."""
        return None

    def take(self, pending: collections.deque, slot: int) -> _Batch | None:
        """Remove and return the next batch worker ``slot`` may run, or None."""
        return pending.popleft() if pending else None

    def describe(self) -> str:
        return type(self).__name__


class AnyIdleWorker(DispatchPolicy):
    """Data parallel: any idle worker takes the oldest batch; a dead worker is replaced and its
    batch retried once on the replacement."""


class Lockstep(DispatchPolicy):
    """Tensor parallel: the n-th batch runs on slot ``n % workers`` only, in submission order; a
    dead worker fails its batch and breaks the pool (no respawn, no retry)."""

    respawn = False

    def slot_for(self, number: int, workers: int) -> int | None:
        return number % workers

    def take(self, pending: collections.deque, slot: int) -> _Batch | None:
        for index, batch in enumerate(pending):
            if batch.slot == slot:
                del pending[index]
                return batch
        return None


class PoolObserver:
    """What a pool tells its owner about its workers, called in the pool's manager thread (so
    each call must be quick and must not wait on this pool). The engine watches the GPU weight
    holders this way: a holder's death invalidates every mapping of its device copy."""

    def worker_ready(self, slot: int, info: dict, first: bool) -> None:
        """Worker ``slot`` is ready (``first``: for the first time since the pool started)."""

    def worker_exited(self, slot: int, exitcode: int) -> None:
        """Worker ``slot``'s process exited (a replacement may follow)."""

    def pool_broken(self, reason: BaseException) -> None:
        """The pool cannot run batches any more."""


@dataclass
class _Worker:
    slot: int
    generation: int
    conn: Connection | None
    arena_in: Arena
    arena_out: Arena
    pid: int | None = None
    ready: bool = False
    batch: _Batch | None = None
    eof_at: float | None = None  # when its socket read EOF; the exit report is then awaited
    info: dict = field(default_factory=dict)
    exited: bool = False  # its exit report came (a slot on hold then waits for resume_slots)

    @property
    def idle(self) -> bool:
        return self.ready and self.batch is None and self.eof_at is None

    def close_channels(self, selector: selectors.BaseSelector) -> None:
        if self.conn is not None:
            _unwatch(selector, self.conn)
            self.conn.close()
            self.conn = None
        self.arena_in.close()
        self.arena_out.close()


class WorkerPool:
    """Forked workers serving batches from a bounded queue; every batch gets a Future.

    ``slot_settings`` gives each worker slot its session settings (one entry per worker; GPU
    slots differ in their target's device index). ``program`` says what a worker runs (see ``worker.py``).
    """

    def __init__(
        self,
        store: WeightStore,
        program: ProgramSpec,
        slot_settings: list[SessionSettings],
        *,
        max_queued_batches: int = 0,
        environment: dict[str, str] | None = None,
        numexpr_threads: int = 1,
        start_timeout: float = 600.0,
        owns_segment: bool = True,
        dispatch: DispatchPolicy | None = None,
        observer: PoolObserver | None = None,
    ):
        if not slot_settings:
            raise ValueError("a pool needs at least one worker")
        self._store = store
        self._program = program
        self._slot_settings = list(slot_settings)
        self._environment = dict(environment or {})
        self._numexpr_threads = numexpr_threads
        self._queue_size = resolve_queue_size(max_queued_batches, len(slot_settings))

        # An RLock, not a Lock: a KeyboardInterrupt raised while a Condition wait re-takes it
        # leaves the waiter's `with` releasing a lock it does not hold; a Lock would then be
        # released from under whichever thread holds it, an RLock refuses (RuntimeError).
        self._lock = threading.RLock()
        self._not_full = threading.Condition(self._lock)
        self._pending: collections.deque[_Batch] = collections.deque()
        self._retry: collections.deque[_Batch] = collections.deque()  # manager thread only
        self._closed = False
        self._draining = False  # drain(): no new batches, the submitted ones finish
        self._outstanding: set[Future] = set()  # every submitted batch's future until it is done
        self._broken: BaseException | None = None
        self._ids = itertools.count()
        self._dispatch_policy = dispatch or AnyIdleWorker()
        self._observer = observer or PoolObserver()
        # Slots stopped on purpose (hold_slots): their workers are killed, their batches go back
        # to the queue, and nothing is respawned there until resume_slots.
        self._held: set[int] = set()
        # held slots resumed before their worker's exit report came: that report starts them
        self._resume_on_exit: set[int] = set()
        self._ever_ready: set[int] = set()
        self._wake_closed = False  # set, under the lock, before the wake pipe's fds are closed
        # Requests from other threads, run by the manager thread (which alone touches workers).
        self._requests: collections.deque[Callable[[], None]] = collections.deque()

        self._workers: dict[int, _Worker] = {}
        self._start_failures = collections.Counter()
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._generations = itertools.count()

        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        # The fork server must start no thread pool while it preloads libraries: one thread each.
        # The fork server removes the segment if the supervisor dies; a helper pool that only
        # borrows the store (the prepacking worker) must not.
        owned = [store.segment.name] if owns_segment else []
        self._fork_server = ForkServer(owned, {name: "1" for name in THREAD_ENV_VARS})
        self._selector.register(self._fork_server.sock, selectors.EVENT_READ)
        self._manager = threading.Thread(target=self._manage, name="shmengine-manager", daemon=True)
        try:
            for slot in range(len(slot_settings)):
                self._start_worker(slot)
            self._manager.start()
            if not self._started.wait(start_timeout):
                raise WorkerStartupError(f"workers did not become ready within {start_timeout:.0f} s")
            if self._startup_error is not None:
                raise self._startup_error
        except BaseException:
            self.close()
            raise

    # -- public -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._slot_settings)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(
        self, method: str, payload: Any, *, ping: bool = False, on_event=None, future: Future | None = None
    ) -> Future:
        """Queue one batch; blocks while ``max_queued_batches`` batches already wait.

        ``on_event(payload)`` is called, in the manager thread, for each event the worker emits
        while running the batch (the tokens of a decoding step); the worker waits for it, so it
        must be quick. It returns the keys of the examples to stop (or None). ``future`` is the
        pending Future to complete (a new one by default); a batch whose future is cancelled
        before a worker takes it never runs.
        """
        future = Future() if future is None else future
        with self._not_full:
            while True:
                self._raise_if_unusable()
                if self._draining:
                    raise EngineClosedError("the engine is closing: it finishes what it has and takes no new batches")
                if self._queue_size is None or len(self._pending) < self._queue_size:
                    break
                self._not_full.wait()
            number = next(self._ids)
            slot = self._dispatch_policy.slot_for(number, self.size)
            self._pending.append(
                _Batch(number, "ping" if ping else "run", method, payload, future, on_event=on_event, slot=slot)
            )
            self._outstanding.add(future)
        future.add_done_callback(self._forget)
        self._wake()
        return future

    def _forget(self, future: Future) -> None:
        # No lock: one set operation is atomic under the GIL, and this runs on every batch.
        self._outstanding.discard(future)

    def drain(self, *, cancel_queued: bool = False, timeout: float | None = None) -> bool:
        """Take no new batches and wait until every submitted one is done (``cancel_queued``:
        cancel those no worker has taken yet, and wait only for the running ones). Returns
        False if ``timeout`` seconds passed first. ``close()`` then stops the workers."""
        if threading.current_thread() is self._manager:
            # a done-callback or an event callback: the batches it would wait for complete on
            # this very thread
            raise RuntimeError("close(wait=True) cannot be called from a future's callback; call close() there")
        with self._not_full:
            self._draining = True
            self._not_full.notify_all()
            if cancel_queued:
                for batch in self._pending:
                    batch.future.cancel()
            waiting = list(self._outstanding)
        done, not_done = wait(waiting, timeout=timeout)
        return not not_done

    def hold_slots(self, slots, reason: str) -> None:
        """Stop the workers of ``slots`` now and run nothing there until :meth:`resume_slots`:
        what they were running goes back to the queue (not counted as a failed attempt). For
        workers whose inputs became invalid under them, e.g. a GPU whose shared device copy of
        the weights was lost. Returns at once; the manager thread does the work."""
        slots = set(slots)

        def hold():
            self._held |= slots
            self._resume_on_exit -= slots
            for slot in sorted(slots):
                worker = self._workers.get(slot)
                if worker is not None and not worker.exited and worker.pid is not None:
                    logger.warning("stopping worker %d (pid %s): %s", slot, worker.pid, reason)
                    self._fork_server.kill(worker.pid)
                # a worker whose spawn is not reported yet (no pid) is killed when it is

        self._request(hold)

    def resume_slots(self, settings: dict[int, SessionSettings]) -> None:
        """Give held slots new session settings and start their workers again."""

        def resume():
            for slot, slot_settings in settings.items():
                self._slot_settings[slot] = slot_settings
                worker = self._workers.get(slot)
                if worker is None or worker.exited:
                    self._held.discard(slot)
                    if not self._closed and self._broken is None:
                        self._start_worker(slot)
                else:
                    # still dying (or not even reported spawned): the slot stays held, so its
                    # exit is not taken for a crash, and that exit starts the replacement
                    self._resume_on_exit.add(slot)
                    if worker.pid is not None:
                        self._fork_server.kill(worker.pid)

        self._request(resume)

    def abort(self, reason: BaseException) -> None:
        """Break the pool from another thread: every queued and running batch fails with
        :class:`EngineBrokenError` naming ``reason``, and the workers stop."""
        self._request(lambda: self._break(reason))

    def _request(self, action: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                return  # nothing runs any more: an observer's late call (a holder exiting) is moot
            self._requests.append(action)
        self._wake()

    def worker_pids(self) -> list[int]:
        return [w.pid for w in list(self._workers.values()) if w.pid is not None and w.eof_at is None]

    def worker_info(self, slot: int = 0) -> dict:
        """What worker ``slot`` reported when it became ready."""
        return dict(self._workers[slot].info)

    def describe(self) -> list[str]:
        """Lines for :func:`shmengine.parallel_info`: each worker's effective settings."""
        lines = [
            f"Workers: {self.size}, queue: {self._queue_size or 'unlimited'} batches, "
            f"dispatch: {self._dispatch_policy.describe()}"
        ]
        for slot, w in sorted(self._workers.items()):
            i = w.info
            if not i:
                lines.append(f"  worker {slot}: starting")
                continue
            env = ", ".join(f"{k}={v}" for k, v in sorted(i.get("environment", {}).items()))
            lines.append(
                f"  worker {slot}: pid {i['pid']}, providers {','.join(i['providers'])}, "
                f"intra_op_num_threads={i['intra_threads']}, inter_op_num_threads=1, "
                f"spinning={'on' if i['allow_spinning'] else 'off'}, numexpr threads={i['numexpr_threads']}, "
                f"OS threads={i['process_threads']}"
            )
            lines.append(f"    {env}")
        return lines

    def close(self) -> None:
        """Fail queued and running batches with EngineClosedError, stop every process."""
        with self._not_full:
            if self._closed:
                already = True
            else:
                already = False
                self._closed = True
                dropped = list(self._pending)
                self._pending.clear()
                self._not_full.notify_all()
        if already:
            if self._manager.is_alive() and threading.current_thread() is not self._manager:
                self._manager.join()
            return
        for batch in dropped:
            _fail(batch.future, EngineClosedError("the engine was closed before this batch ran"))
        self._wake()
        if self._manager.is_alive():
            if threading.current_thread() is not self._manager:
                self._manager.join()
        else:
            self._shutdown_processes()

    # -- caller-side helpers --------------------------------------------------------------------

    def _raise_if_unusable(self) -> None:
        if self._broken is not None:
            raise EngineBrokenError(f"the engine cannot run batches any more: {self._broken}") from self._broken
        if self._closed:
            raise EngineClosedError("the engine is closed; create a new one to run more batches")

    def _wake(self) -> None:
        # Under the lock, and never once the manager closed the pipe: its fd number may by then
        # belong to another file, which a late wake (another thread, an observer) would write to.
        with self._lock:
            if self._wake_closed:
                return
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: the manager will wake anyway

    # -- manager thread -------------------------------------------------------------------------

    def _start_worker(self, slot: int) -> None:
        """Create a worker's channels and ask the fork server for the process."""
        generation = next(self._generations)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        arena_in = Arena.create(f"in-{slot}")
        arena_out = Arena.create(f"out-{slot}")
        conn = Connection(ours.detach())
        worker = _Worker(slot, generation, conn, arena_in, arena_out)
        self._workers[slot] = worker
        self._selector.register(conn, selectors.EVENT_READ, worker)
        settings = self._slot_settings[slot]
        config = WorkerConfig(
            slot=slot,
            generation=generation,
            program=self._program,
            session_settings=settings,
            environment=self._environment_for(settings),
            segment_name=self._store.segment.name,
            numexpr_threads=self._numexpr_threads or settings.intra_threads,
        )
        conn.send(config)  # buffered in the socket until the worker reads it
        try:
            self._fork_server.spawn(slot, generation, [theirs.fileno(), self._store.segment.fd, arena_in.fd, arena_out.fd])
        finally:
            theirs.close()

    def _environment_for(self, settings: SessionSettings) -> dict[str, str]:
        env = thread_environment(settings.intra_threads)
        if settings.target.device == "cuda":
            from shmengine.runtime.placement import cuda_visible_devices

            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(settings.target.device_index)
        env.update(self._environment)
        return env

    def _manage(self) -> None:
        try:
            while True:
                while self._requests and not self._closed:
                    self._requests.popleft()()
                if self._closed:
                    break
                self._dispatch()
                timeout = EXIT_REPORT_GRACE / 4 if any(w.eof_at for w in self._workers.values()) else None
                for key, _ in self._selector.select(timeout):
                    if key.fileobj == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif key.fileobj is self._fork_server.sock:
                        self._on_fork_server_report()
                    else:
                        worker = key.data
                        # An exit report handled earlier in this round may have closed it already.
                        if worker.conn is key.fileobj:
                            self._on_worker_readable(worker)
                self._check_silent_deaths()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            logger.exception("shmengine manager thread failed")
            self._break(exc)
        finally:
            self._fail_everything(EngineClosedError("the engine was closed while this batch ran"))
            self._shutdown_processes()

    def _dispatch(self) -> None:
        for worker in self._workers.values():
            if not worker.idle or worker.slot in self._held:
                continue
            batch = self._next_batch(worker.slot)
            if batch is None:
                continue
            batch.attempts += 1
            message = RunBatch(batch.id, batch.kind == "ping", batch.method, batch.payload)
            try:
                send_message(worker.conn, message, worker.arena_in)
            except (BrokenPipeError, ConnectionResetError):
                batch.attempts -= 1  # it never reached the worker
                self._retry.appendleft(batch)
                self._on_worker_eof(worker)
                continue
            except Exception as exc:  # the payload cannot be pickled: the caller's mistake
                _fail(batch.future, TypeError(f"this batch cannot be sent to a worker: {exc}"))
                continue
            worker.batch = batch

    def _next_batch(self, slot: int) -> _Batch | None:
        while True:
            if self._retry:
                return self._retry.popleft()
            with self._not_full:
                batch = self._dispatch_policy.take(self._pending, slot)
                if batch is None:
                    return None
                self._not_full.notify()
            if batch.future.set_running_or_notify_cancel():
                return batch
            # cancelled while queued: drop it and look again

    def _on_worker_readable(self, worker: _Worker) -> None:
        try:
            message = recv_message(worker.conn, worker.arena_out, copy=True)
        except (EOFError, ConnectionResetError, OSError):
            self._on_worker_eof(worker)
            return
        self._on_worker_message(worker, message)

    def _on_worker_message(self, worker: _Worker, message) -> None:
        if isinstance(message, WorkerReady):
            worker.ready = True
            worker.info = message.info
            self._start_failures[worker.slot] = 0
            self._mark_started_if_ready()
            first = worker.slot not in self._ever_ready
            self._ever_ready.add(worker.slot)
            self._notify(self._observer.worker_ready, worker.slot, dict(worker.info), first)
        elif isinstance(message, WorkerStartFailed):
            exc = _rebuild_exception(message.exception, message.traceback)
            worker.info = {"startup_error": exc}
        elif isinstance(message, BatchEvent):
            # The worker waits for the answer: always send one, whatever the callback does.
            batch = worker.batch
            stops = []
            if batch is not None and batch.id == message.batch_id and batch.on_event is not None:
                try:
                    stops = list(batch.on_event(message.payload) or [])
                except Exception:  # a failing callback must not take the manager down
                    logger.exception("an event callback raised; the batch goes on")
            try:
                send_message(worker.conn, StopExamples(message.batch_id, stops), None)
            except OSError:
                pass  # the worker is dying; its exit report follows
        elif isinstance(message, (BatchDone, BatchFailed)):
            batch = worker.batch
            if batch is None or batch.id != message.batch_id:
                raise RuntimeError(f"worker {worker.slot} answered batch {message.batch_id}, but runs {batch and batch.id}")
            worker.batch = None
            if isinstance(message, BatchDone):
                batch.future.set_result(message.result)
            else:
                batch.future.set_exception(_rebuild_exception(message.exception, message.traceback))
        else:
            raise RuntimeError(f"worker {worker.slot} sent an unknown message {type(message).__name__}")

    def _mark_started_if_ready(self) -> None:
        # Ready *and* its pid known: a worker's ready message (its own socket) can arrive before
        # the fork server's spawn report, and the constructor must not return with worker_pids()
        # still missing one.
        if not self._started.is_set() and all(w.ready and w.pid is not None for w in self._workers.values()):
            self._started.set()

    def _on_worker_eof(self, worker: _Worker) -> None:
        """Its socket closed: the worker is dying. Wait for the fork server to say how."""
        if worker.eof_at is None:
            worker.eof_at = time.monotonic()
            _unwatch(self._selector, worker.conn)

    def _check_silent_deaths(self) -> None:
        now = time.monotonic()
        for worker in self._workers.values():
            if worker.eof_at and worker.pid and now - worker.eof_at > EXIT_REPORT_GRACE:
                self._fork_server.kill(worker.pid)
                worker.eof_at = now

    def _on_fork_server_report(self) -> None:
        report = self._fork_server.receive()
        if report is None:
            raise EngineBrokenError("the fork server exited; every worker died with it")
        worker = self._workers.get(report.slot)
        if worker is None or worker.generation != report.generation:
            return  # a report about a worker already replaced
        if isinstance(report, WorkerSpawned):
            worker.pid = report.pid
            self._mark_started_if_ready()
            if report.slot in self._held:  # held while its spawn was on the way: it must not serve
                self._fork_server.kill(report.pid)
        elif isinstance(report, WorkerExited):
            self._on_worker_exit(worker, report.exitcode)

    def _on_worker_exit(self, worker: _Worker, exitcode: int) -> None:
        # Whatever it sent before dying is still in its socket: a result must not be lost, nor
        # the batch run twice.
        while worker.conn is not None and worker.eof_at is None:
            try:
                if not worker.conn.poll(0):
                    break
            except OSError:
                break
            self._on_worker_readable(worker)
        worker.close_channels(self._selector)
        worker.exited = True
        self._notify(self._observer.worker_exited, worker.slot, exitcode)
        how = describe_exit(exitcode)
        if worker.slot in self._held:
            # stopped on purpose: its batch is retried (not as a failed attempt) by another
            # worker or by this slot's next one, which resume_slots starts
            batch, worker.batch = worker.batch, None
            if batch is not None:
                batch.attempts -= 1
                self._retry.appendleft(batch)
            if worker.slot in self._resume_on_exit:
                self._resume_on_exit.discard(worker.slot)
                self._held.discard(worker.slot)
                if not self._closed and self._broken is None:
                    self._start_worker(worker.slot)
            return
        if not worker.ready:
            error = worker.info.get("startup_error")
            failure = WorkerStartupError(
                f"worker {worker.slot} (pid {worker.pid}) {how} while starting"
                + (f": {type(error).__name__}: {error}" if error else "")
            )
            if error is not None:
                failure.__cause__ = error
            if not self._started.is_set():
                self._startup_error = failure
                self._started.set()
                self._closed = True
                return
            self._start_failures[worker.slot] += 1
            if self._start_failures[worker.slot] >= MAX_CONSECUTIVE_START_FAILURES:
                self._break(failure)
                return
        elif not self._dispatch_policy.respawn:
            batch, worker.batch = worker.batch, None
            failure = WorkerCrashedError(
                f"worker {worker.slot} (pid {worker.pid}) {how}; under {self._dispatch_policy.describe()} dispatch "
                "(tensor parallel) a dead member fails its group: it is not replaced and nothing more runs on "
                "this engine. Create a new one.",
                exitcode=exitcode,
                pid=worker.pid,
            )
            if batch is not None:
                _fail(batch.future, failure)
            self._break(failure)
            return
        else:
            logger.warning("worker %d (pid %s) %s; starting a replacement", worker.slot, worker.pid, how)
        batch = worker.batch
        worker.batch = None
        if batch is not None:
            if batch.attempts < 2:
                self._retry.appendleft(batch)
            else:
                _fail(
                    batch.future,
                    WorkerCrashedError(
                        f"worker {worker.slot} (pid {worker.pid}) {how} while running this batch; "
                        "it had already been retried once after an earlier worker died on it",
                        exitcode=exitcode,
                        pid=worker.pid,
                    ),
                )
        if not self._closed and self._broken is None:
            self._start_worker(worker.slot)

    def _notify(self, callback, *args) -> None:
        try:
            callback(*args)
        except Exception:  # an observer's bug must not take the manager down
            logger.exception("a pool observer raised")

    def _break(self, reason: BaseException) -> None:
        if self._broken is None:
            self._notify(self._observer.pool_broken, reason)
        with self._not_full:
            self._broken = reason
            dropped = list(self._pending)
            self._pending.clear()
            self._not_full.notify_all()
        error = EngineBrokenError(f"the engine cannot run batches any more: {reason}")
        error.__cause__ = reason
        for batch in dropped:
            _fail(batch.future, error)
        self._fail_everything(error)
        if not self._started.is_set():
            self._startup_error = reason
            self._started.set()
        self._closed = True  # stops the manager loop; the processes go in its finally

    def _fail_everything(self, error: BaseException) -> None:
        for batch in self._retry:
            _fail(batch.future, error)
        self._retry.clear()
        for worker in self._workers.values():
            if worker.batch is not None:
                _fail(worker.batch.future, error)
                worker.batch = None

    def _shutdown_processes(self) -> None:
        fork_server = self.__dict__.pop("_fork_server", None)
        if fork_server is not None:
            fork_server.shutdown()
        for worker in self._workers.values():
            worker.close_channels(self._selector)
        self._selector.close()
        with self._lock:
            self._wake_closed = True
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass


def _unwatch(selector: selectors.BaseSelector, conn: Connection) -> None:
    try:
        selector.unregister(conn)
    except (KeyError, ValueError):
        pass  # not registered (any more), or the selector is closed


def _fail(future: Future, error: BaseException) -> None:
    if not future.done():
        if future.running() or future.set_running_or_notify_cancel():
            future.set_exception(error)


def _rebuild_exception(data: bytes, tb: str) -> BaseException:
    try:
        exc = pickle.loads(data)
    except Exception as err:
        exc = RuntimeError(f"a worker raised an exception that could not be rebuilt here: {err}")
    exc.__cause__ = RemoteTraceback(tb)
    return exc
