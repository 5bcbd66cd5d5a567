"""Every message that crosses a process boundary, as a small class (CPython's ``_CallItem`` /
``_ResultItem`` habit): a renamed field fails where it is read, not as a wrong tuple position.

Supervisor and worker (pickled through the worker's socket, big buffers through its arenas)::

    supervisor ── WorkerConfig (worker.py) ──▶ worker      once, first
    supervisor ◀── WorkerReady | WorkerStartFailed ── worker
    supervisor ── RunBatch ──▶ worker
    supervisor ◀── BatchEvent ── worker                    zero or more (streamed tokens) ...
    supervisor ── StopExamples ──▶ worker                  ... each answered before it goes on
    supervisor ◀── BatchDone | BatchFailed ── worker

Supervisor and fork server (``zygote.py``)::

    supervisor ── SpawnWorker (+ the worker's fds) | KillWorker | ShutdownForkServer ──▶ fork server
    supervisor ◀── WorkerSpawned | WorkerExited ── fork server
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "RunBatch",
    "BatchEvent",
    "StopExamples",
    "BatchDone",
    "BatchFailed",
    "WorkerReady",
    "WorkerStartFailed",
    "SpawnWorker",
    "KillWorker",
    "ShutdownForkServer",
    "WorkerSpawned",
    "WorkerExited",
]


# -- supervisor <-> worker -------------------------------------------------------------------------


@dataclass(slots=True)
class RunBatch:
    batch_id: int
    ping: bool  # echo the payload without running the program (the pool's own overhead)
    method: str  # the program method that runs the batch
    payload: Any


@dataclass(slots=True)
class BatchEvent:
    batch_id: int
    payload: Any  # e.g. the tokens of one decoding step


@dataclass(slots=True)
class StopExamples:
    batch_id: int
    keys: list  # the examples of the running batch to stop now (maybe none)


@dataclass(slots=True)
class BatchDone:
    batch_id: int
    result: Any


@dataclass(slots=True)
class BatchFailed:
    batch_id: int
    exception: bytes  # the pickled exception (or a RuntimeError describing it)
    traceback: str


@dataclass(slots=True)
class WorkerReady:
    info: dict  # pid, threads, providers, and whatever the program's describe() adds


@dataclass(slots=True)
class WorkerStartFailed:
    exception: bytes
    traceback: str


# -- supervisor <-> fork server --------------------------------------------------------------------


@dataclass(slots=True)
class SpawnWorker:
    slot: int
    generation: int


@dataclass(slots=True)
class KillWorker:
    pid: int
    signal: int


@dataclass(slots=True)
class ShutdownForkServer:
    pass


@dataclass(slots=True)
class WorkerSpawned:
    slot: int
    generation: int
    pid: int


@dataclass(slots=True)
class WorkerExited:
    slot: int
    generation: int
    pid: int
    exitcode: int
