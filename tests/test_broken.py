"""An engine whose fork server is killed is broken, and says so as an executor would."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import BrokenExecutor
from pathlib import Path

import numpy as np
import pytest

import shmengine
from shmengine.errors import EngineBrokenError

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"


def test_killed_fork_server_breaks_the_engine_with_a_broken_executor_error():
    with shmengine.Engine(DEFAULT, inter_threads=1, intra_threads=1) as engine:
        feeds = {"x": np.zeros((2, engine.inputs[0].shape[1]), dtype=np.float32)}
        engine.run_batch(feeds)
        workers = engine.worker_pids
        os.kill(engine._pool._fork_server.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        with pytest.raises(EngineBrokenError) as caught:
            while time.monotonic() < deadline:  # the manager notices the fork server's socket close
                engine.run_batch(feeds)
                time.sleep(0.05)
        assert isinstance(caught.value, BrokenExecutor)  # concurrent.futures' meaning
        assert isinstance(caught.value, RuntimeError)  # CTranslate2's habit
        # the workers die with their fork server (PR_SET_PDEATHSIG / its socket closing)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
