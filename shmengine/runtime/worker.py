"""The worker process: maps the weights, builds its sessions, then serves one batch at a time.

A worker is forked by the fork server (``zygote.py``) and talks only to the supervisor, over
one socket (control and small tensors) and two arenas (large tensors, see ``transport.py``); the
messages are the classes of ``messages.py``: a :class:`WorkerConfig` first, then ``RunBatch``
in, ``BatchEvent`` / ``StopExamples`` while a batch streams, ``BatchDone`` / ``BatchFailed`` out.

What a worker *does* with a batch is its **program**: an object built in the worker from a
:class:`ProgramSpec` (module, class, options) with a :class:`WorkerContext`, whose ``run(method,
payload)`` returns the result. The generic ONNX engine, the Generator and the Translator are
programs; nothing here knows about any of them.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib
import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from shmengine.model.weights import ModelEntry, read_catalog
from shmengine.runtime.messages import (
    BatchDone,
    BatchEvent,
    BatchFailed,
    RunBatch,
    StopExamples,
    WorkerReady,
    WorkerStartFailed,
)
from shmengine.runtime.sessions import SessionSettings, create_session
from shmengine.runtime.sharedmem import Arena, SharedSegment
from shmengine.runtime.transport import recv_message, send_message

__all__ = ["ProgramSpec", "WorkerConfig", "WorkerContext", "worker_main"]


@dataclass(frozen=True)
class ProgramSpec:
    """Which program a worker runs: ``module.qualname(context, **options)``."""

    module: str
    qualname: str
    options: dict[str, Any] = field(default_factory=dict)

    def instantiate(self, context: "WorkerContext"):
        target = importlib.import_module(self.module)
        for part in self.qualname.split("."):
            target = getattr(target, part)
        return target(context, **self.options)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs besides its descriptors; the first message on its socket."""

    slot: int
    generation: int
    program: ProgramSpec
    session_settings: SessionSettings
    environment: dict[str, str]
    segment_name: str
    numexpr_threads: int = 1


class WorkerContext:
    """What a program gets from its worker: the weight catalog and a way to build sessions."""

    def __init__(self, config: WorkerConfig, segment: SharedSegment, catalog: dict[str, ModelEntry], conn: Connection):
        self.config = config
        self.slot = config.slot
        self.session_settings = config.session_settings
        self.catalog = catalog
        self._segment = segment
        self._conn = conn
        self.batch_id: int | None = None

    def emit(self, payload) -> None:
        """Send an event (a streamed token, say) of the running batch to the supervisor now."""
        send_message(self._conn, BatchEvent(self.batch_id, payload), None)

    def wait_for_stops(self) -> list[int]:
        """After an event: block until the supervisor says which examples to stop (maybe none)."""
        answer = recv_message(self._conn, None, copy=True)
        if not isinstance(answer, StopExamples) or answer.batch_id != self.batch_id:
            raise RuntimeError(f"expected the answer to an event of batch {self.batch_id}, got {answer!r}")
        return answer.keys

    def begin(self, batch_id: int) -> None:
        self.batch_id = batch_id

    @property
    def target(self):
        """The worker's :class:`target.WorkerTarget` (device, compute type, rank)."""
        return self.session_settings.target

    def create_runner(self):
        """The runner (``runners.py``) this worker's target calls for: where tensors live between steps."""
        from shmengine.decode.runners import create_runner

        return create_runner(self.target, self.session_settings.providers)

    def create_session(self, key: str, settings: SessionSettings | None = None):
        """An ORT session for model ``key`` of the store, over the shared weights."""
        return create_session(self.catalog[key], self._segment.buffer, settings or self.session_settings)


# A batch that ran this long freed its activations and KV cache; giving those pages back to
# the system costs a few ms (malloc_trim), under 1% of such a batch and nothing for short ones.
_TRIM_AFTER_S = 0.2


def _return_freed_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _process_threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _describe_exception(exc: BaseException) -> bytes:
    """Pickle an exception for the supervisor, or a RuntimeError saying what it was."""
    try:
        data = pickle.dumps(exc, protocol=5)
        pickle.loads(data)  # an exception that pickles but cannot be rebuilt is useless there
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__qualname__}: {exc}"), protocol=5)


def worker_main(data_fd: int, weights_fd: int, arena_in_fd: int, arena_out_fd: int) -> int:
    """Run a worker until the supervisor closes its socket; returns the process exit code."""
    faulthandler.enable()  # a crash inside ORT prints the Python stack of every thread
    conn = Connection(data_fd)
    try:
        config: WorkerConfig = conn.recv()
    except EOFError:
        return 0
    os.environ.update(config.environment)
    # shmengine itself does not use numexpr (tools/bench_numexpr.py: numpy is faster on the
    # decoding loop's passes), but a program may import it: it then starts with this worker's
    # thread count, read from the environment on import. numexpr prints an error (into the
    # launcher's summary line) for a count above its limit, so the count is capped at it.
    numexpr_limit = int(os.environ.get("NUMEXPR_MAX_THREADS") or 64)
    numexpr_threads = min(config.numexpr_threads, numexpr_limit)
    os.environ["NUMEXPR_NUM_THREADS"] = str(numexpr_threads)
    try:
        segment = SharedSegment.attach(weights_fd, name=config.segment_name)
        context = WorkerContext(config, segment, read_catalog(segment), conn)
        program = config.program.instantiate(context)
        info = {
            "pid": os.getpid(),
            "slot": config.slot,
            "intra_threads": config.session_settings.intra_threads,
            "allow_spinning": config.session_settings.allow_spinning,
            "providers": [name for name, _ in config.session_settings.providers],
            "numexpr_threads": numexpr_threads,
            "process_threads": _process_threads(),
            "environment": {k: os.environ.get(k, "") for k in config.environment},
        }
        if hasattr(program, "describe"):
            info.update(program.describe())
    except BaseException as exc:
        send_message(conn, WorkerStartFailed(_describe_exception(exc), traceback.format_exc()), None)
        return 1
    send_message(conn, WorkerReady(info), None)

    arena_in = Arena(arena_in_fd, writable=False)
    arena_out = Arena(arena_out_fd, writable=True)
    while True:
        try:
            message: RunBatch = recv_message(conn, arena_in, copy=False)
        except (EOFError, ConnectionResetError):
            return 0  # the supervisor closed us, or died: nothing left to serve
        batch_id, payload = message.batch_id, message.payload
        ping, method = message.ping, message.method
        del message
        context.begin(batch_id)
        started = time.monotonic()
        result = None
        try:
            result = payload if ping else program.run(method, payload)
            reply = BatchDone(batch_id, result)
        except Exception as exc:
            reply = BatchFailed(batch_id, _describe_exception(exc), traceback.format_exc())
        # The inputs are views into arena_in; drop them before the supervisor may write it again.
        del payload
        try:
            send_message(conn, reply, arena_out)
        except Exception as exc:  # a result that cannot be pickled
            send_message(conn, BatchFailed(batch_id, _describe_exception(exc), traceback.format_exc()), None)
        del reply, result
        if time.monotonic() - started > _TRIM_AFTER_S:
            _return_freed_memory()


if __name__ == "__main__":  # pragma: no cover - workers are started by the fork server
    sys.exit("shmengine.runtime.worker is started by the fork server, not directly")
