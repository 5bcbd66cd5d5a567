"""Worker programs for the pool tests: they sleep, echo, crash or segfault on demand.

They run inside real forked workers (the fork server gets the caller's sys.path, so this module
imports there as ``programs``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time


class ChaosProgram:
    """``run(method, payload)``: ``echo`` returns payload; ``sleep`` sleeps then echoes;
    ``exit`` calls ``os._exit(payload)``; ``segfault`` dereferences NULL; ``pid`` returns the pid;
    ``touch`` creates the file ``payload``; ``wait_for`` waits until the file ``payload`` exists;
    ``crash_once`` dies by SIGKILL unless the marker file ``payload`` exists (it creates it first)."""

    def __init__(self, context, fail_start: str | None = None):
        self.context = context
        if fail_start == "raise":
            raise RuntimeError("this program refuses to start")
        if fail_start == "segfault":
            ctypes.string_at(0)
        if fail_start == "exit":
            os._exit(7)

    def run(self, method, payload):
        if method == "echo":
            return payload
        if method == "sleep":
            seconds, value = payload
            time.sleep(seconds)
            return value
        if method == "exit":
            os._exit(payload)
        if method == "segfault":
            ctypes.string_at(0)
        if method == "pid":
            return os.getpid()
        if method == "wait_for":  # returns once the file ``payload`` exists (30 s at most)
            deadline = time.monotonic() + 30
            while not os.path.exists(payload) and time.monotonic() < deadline:
                time.sleep(0.005)
            return os.path.exists(payload)
        if method == "touch":  # leaves a trace: the file ``payload``
            open(payload, "w").close()
            return payload
        if method == "crash_once":
            if not os.path.exists(payload):
                open(payload, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return "survived"
        if method == "raise":
            raise KeyError(payload)
        if method == "device_weights":  # what its session settings say about a GPU's shared weights
            return self.context.session_settings.device_weights
        raise ValueError(f"unknown method {method!r}")


class StandInHolderProgram:
    """Stands in for a GPU's weight holder (``device_weights.DeviceWeightsProgram``) where no GPU
    is: its "handle" is its own pid, so a serving worker can tell which holder it was given.
    Refuses to start while the file ``refuse_if`` exists."""

    def __init__(self, context, refuse_if: str | None = None):
        if refuse_if and os.path.exists(refuse_if):
            raise RuntimeError("this holder refuses to start")

    def describe(self) -> dict:
        return {"device_weights": os.getpid()}

    def run(self, method, payload):
        raise ValueError("a holder runs no batches")
