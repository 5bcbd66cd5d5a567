"""Shared fixtures: small ONNX models built by the tests, and leak checks after every test."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # models/ as a plain package when not installed

from models.builders import mlp_model, mlp_reference, save_model  # noqa: E402


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("shmengine-")}


def live_children() -> list[int]:
    """PIDs of processes whose parent is this test process, or one of their children."""
    me = os.getpid()
    parents = {me}
    found = []
    for _ in range(2):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) in parents and int(entry) not in found:
                found.append(int(entry))
        parents |= set(found)
    return found


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        found += frontier
    return found


def start_chaos(engine, kills: int, interval: float, seed: int, stop: threading.Event | None = None) -> tuple[threading.Thread, list[int]]:
    """A thread that SIGKILLs a random live worker of ``engine`` every ``interval`` seconds until
    it has killed ``kills`` of them (or ``stop`` is set); returns it and the list of killed pids."""
    killed: list[int] = []
    stop = stop or threading.Event()

    def chaos():
        rng = random.Random(seed)
        while not stop.is_set() and len(killed) < kills:
            time.sleep(interval)
            pids = engine.worker_pids
            if pids:
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass

    thread = threading.Thread(target=chaos)
    thread.start()
    return thread, killed


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test leaves no new shmengine segment in /dev/shm and no new process behind.

    What existed when the test started (a module-scoped engine, set up before this fixture)
    may stay; ``nothing_left_at_the_end`` checks that it is gone after the session.
    """
    segments, children = shm_segments(), set(live_children())
    yield
    assert wait_until(lambda: not (shm_segments() - segments)), f"leaked segments: {shm_segments() - segments}"
    assert wait_until(lambda: not (set(live_children()) - children)), f"leaked processes: {set(live_children()) - children}"


@pytest.fixture(autouse=True, scope="session")
def nothing_left_at_the_end():
    segments = shm_segments()
    yield
    assert wait_until(lambda: not live_children()), f"processes left after the session: {live_children()}"
    assert wait_until(lambda: not (shm_segments() - segments)), "segments left after the session"


class MlpModel:
    """A built MLP model on disk with its numpy reference."""

    def __init__(self, directory: Path, widths, params):
        self.path = directory
        self.widths = widths
        self.params = params

    def inputs(self, batch: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((batch, self.widths[0])).astype(np.float32)

    def reference(self, x: np.ndarray) -> np.ndarray:
        return mlp_reference(x.astype(np.float64), self.params).astype(np.float32)


def make_mlp(directory: Path, widths, *, seed=0, external_data=False) -> MlpModel:
    model, params = mlp_model(widths, seed=seed)
    save_model(model, directory, external_data=external_data)
    return MlpModel(directory, widths, params)


@pytest.fixture(scope="session")
def small_mlp(tmp_path_factory) -> MlpModel:
    """64 -> 128 -> 32: fast to load, enough to check numbers."""
    return make_mlp(tmp_path_factory.mktemp("small_mlp"), [64, 128, 32], seed=1)


@pytest.fixture(scope="session")
def slow_mlp(tmp_path_factory) -> MlpModel:
    """1024-wide, 8 layers: a batch of 256 rows takes tens of milliseconds, so kills land mid-batch."""
    return make_mlp(tmp_path_factory.mktemp("slow_mlp"), [1024] * 9, seed=2, external_data=True)
