"""What can go wrong, named so that a caller can tell the cases apart.

The taxonomy follows joblib/loky: an error says *what happened* (a model that cannot be read, a
worker that was killed by a signal, an engine that was closed) rather than where it was noticed.
Every class derives from :class:`ShmEngineError`, itself a ``RuntimeError``: CTranslate2 raises
``RuntimeError`` for a missing model, an input too long, mismatched score files and a failed
batch, so ``except RuntimeError`` in a script written against it keeps catching ours. The ones
about the caller's input also derive from ``ValueError`` (ONNX Runtime's and numpy's habit), and
:class:`TokenTypeError` — a string where a list of tokens belongs — from ``TypeError``, as
CTranslate2 raises there.
"""

from __future__ import annotations

import signal
from concurrent.futures import BrokenExecutor

__all__ = [
    "ShmEngineError",
    "ModelLoadError",
    "InvalidInputError",
    "TokenTypeError",
    "WorkerCrashedError",
    "WorkerStartupError",
    "EngineClosedError",
    "EngineBrokenError",
    "DeviceOutOfMemoryError",
    "RemoteTraceback",
    "describe_exit",
]


class ShmEngineError(RuntimeError):
    """Base class of every error raised by shmengine itself (a ``RuntimeError``, as CTranslate2's)."""


class ModelLoadError(ShmEngineError, ValueError):
    """The model files cannot be used: missing, not ONNX, unsafe or inconsistent external data."""


class InvalidInputError(ShmEngineError, ValueError):
    """A batch does not match what the model accepts (names, dtypes, shapes)."""


class TokenTypeError(InvalidInputError, TypeError):
    """A string (or something else) where a list of tokens belongs: CTranslate2 raises TypeError."""


class WorkerCrashedError(ShmEngineError):
    """A worker process died while it ran this batch, and the one retry died too.

    ``exitcode`` follows :attr:`subprocess.Popen.returncode`: negative for a signal.
    """

    def __init__(self, message: str, *, exitcode: int | None = None, pid: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode
        self.pid = pid


class WorkerStartupError(ShmEngineError):
    """A worker could not be started (session creation failed, or it died while starting)."""


class EngineClosedError(ShmEngineError):
    """The engine was closed: new batches are refused, queued and running ones fail with this."""


class EngineBrokenError(ShmEngineError, BrokenExecutor):
    """The engine can no longer run batches (its fork server died, or workers keep dying on start).

    Also a ``concurrent.futures.BrokenExecutor``, as CPython's ``BrokenProcessPool`` and loky's
    ``TerminatedWorkerError`` are: code that handles a broken executor handles this one."""


class DeviceOutOfMemoryError(ShmEngineError, MemoryError):
    """A GPU ran out of memory running one batch: that batch fails, the worker and the pool go on."""


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised inside a worker.

    It is set as ``__cause__`` of the exception the caller sees, as ``concurrent.futures.process``
    does, so the traceback printed in the caller shows where the worker failed.
    """

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def describe_exit(exitcode: int | None) -> str:
    """Say how a process ended, e.g. ``"killed by signal SIGKILL (-9)"`` or ``"exited with code 3"``."""
    if exitcode is None:
        return "ended for an unknown reason"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by signal {name} ({exitcode})"
    return f"exited with code {exitcode}"
