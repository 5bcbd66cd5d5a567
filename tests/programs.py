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
        raise ValueError(f"unknown method {method!r}")
