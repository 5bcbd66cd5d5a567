"""Shared fixtures: small ONNX models built by the tests, and leak checks after every test."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # models/ as a plain package when not installed

from models.builders import mlp_model, mlp_reference, save_model  # noqa: E402
from shmengine.runtime.sharedmem import SEGMENT_PREFIX, SHM_DIR, SharedSegment, unlink_segment  # noqa: E402

# Prepacked model files go to a directory on disk (sharedmem.prepack_directory): this session's
# own, so that what the tests leave there is theirs to find (subprocesses inherit it), and gone
# with the session.
PREPACK_DIR = tempfile.mkdtemp(prefix="shmengine-test-prepacked-")
os.environ["SHMENGINE_PREPACK_DIR"] = PREPACK_DIR


class _OurSegments:
    """The ``shmengine-*`` names in /dev/shm that this test session made, and only those.

    Other programs (other test sessions, a benchmark) create and remove their own segments on
    the same machine at the same time, so "what is new in /dev/shm" is not "what this test
    made". A name is ours when this process created it (``SharedSegment.create`` is wrapped to
    record it: the supervisor of an in-process engine is this process), when a process of ours
    (a subprocess running its own engine) was seen holding it open, or when it derives from one
    of those (``<name>-*``: prepacked model files). Subprocess names are seen by looking at the
    descendants' descriptors whenever :func:`shm_segments` is called and every 50 ms in the
    background, so a subprocess that creates and leaks a segment within 50 ms of its own death
    could be missed; a real engine holds its segment for its whole life (hundreds of ms at least).
    """

    def __init__(self):
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, name: str) -> None:
        with self._lock:
            self._known.add(name)

    def look(self) -> None:
        """Record every shmengine segment that this process or one of its descendants holds open."""
        prefix = os.path.join(SHM_DIR, SEGMENT_PREFIX)
        for pid in [os.getpid(), *descendants(os.getpid())]:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(prefix):
                    self.record(os.path.basename(target.removesuffix(" (deleted)")))

    def ours(self, name: str) -> bool:
        with self._lock:
            return name in self._known or any(name.startswith(k + "-") for k in self._known)

    def start_watching(self, interval: float = 0.05) -> None:
        def watch():
            while not self._stop.wait(interval):
                self.look()

        self._thread = threading.Thread(target=watch, name="test-segment-watch", daemon=True)
        self._thread.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


OUR_SEGMENTS = _OurSegments()
_real_create = SharedSegment.create.__func__


def _create_and_record(cls, *args, **kwargs):
    segment = _real_create(cls, *args, **kwargs)
    OUR_SEGMENTS.record(segment.name)
    return segment


# A spy, not a mock: the real create runs; the wrapper only notes the name it chose.
SharedSegment.create = classmethod(_create_and_record)


def shm_segments() -> set[str]:
    """The ``shmengine-*`` entries now in /dev/shm (and prepacked model files in PREPACK_DIR)
    that this test session made (see :class:`_OurSegments`); other programs' are never in it."""
    OUR_SEGMENTS.look()
    names = os.listdir(SHM_DIR) + os.listdir(PREPACK_DIR)
    return {n for n in names if n.startswith(SEGMENT_PREFIX) and OUR_SEGMENTS.ours(n)}


def prepacked_file(name: str) -> str:
    """The path of a prepacked model file listed by :func:`shm_segments`."""
    return os.path.join(PREPACK_DIR, name)


def segment_exists(name: str) -> bool:
    """Whether ``/dev/shm/<name>`` exists, for a test that knows the exact name it checks."""
    return os.path.exists(os.path.join(SHM_DIR, name))


def remove_segments(names) -> None:
    """Unlink ``names`` (and what derives from them); only ever called with names of ours."""
    for name in names:
        assert OUR_SEGMENTS.ours(name), f"refusing to remove {name}: this test session did not make it"
        unlink_segment(name)


def kill_processes(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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


def busy_worker_pids(engine) -> list[int]:
    """PIDs of the workers of ``engine`` (an Engine or a WorkerPool) that are running a batch now."""
    pool = getattr(engine, "_pool", engine)
    return [w.pid for w in list(pool._workers.values()) if w.ready and w.pid is not None and w.batch is not None]


def start_chaos(
    engine, kills: int, interval: float, seed: int, stop: threading.Event | None = None, *, mid_batch: bool = False
) -> tuple[threading.Thread, list[int]]:
    """A thread that SIGKILLs a random live worker of ``engine`` every ``interval`` seconds until
    it has killed ``kills`` of them (or ``stop`` is set); returns it and the list of killed pids.

    With ``mid_batch`` it kills only a worker that is running a batch (waiting for one), so that
    every kill costs a batch its worker: a kill of an idle worker tests the respawn, not the retry.
    """
    killed: list[int] = []
    stop = stop or threading.Event()

    def chaos():
        rng = random.Random(seed)
        while not stop.is_set() and len(killed) < kills:
            time.sleep(interval)
            pids = [p for p in engine.worker_pids if p not in killed]
            while mid_batch and not stop.is_set() and not (pids := [p for p in busy_worker_pids(engine) if p not in killed]):
                time.sleep(0.002)
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
    """Every test leaves no new segment of ours in /dev/shm and no new process of ours behind.

    Only what this session made counts (:func:`shm_segments`, :func:`live_children`): another
    program's segments and processes are neither checked nor touched. What existed when the test
    started (a module-scoped engine, set up before this fixture) may stay;
    ``nothing_left_at_the_end`` checks that it is gone after the session. A leak is removed after
    it is reported, so that one failing test does not fail the next ones too.
    """
    segments, children = shm_segments(), set(live_children())
    yield
    _check_nothing_new(segments, children)


def _check_nothing_new(segments: set[str], children: set[int]) -> None:
    problems = []
    if not wait_until(lambda: not (shm_segments() - segments)):
        leaked = shm_segments() - segments
        problems.append(f"leaked segments: {leaked}")
        remove_segments(leaked)
    if not wait_until(lambda: not (set(live_children()) - children)):
        leaked = set(live_children()) - children
        problems.append(f"leaked processes: {leaked}")
        kill_processes(leaked)
    assert not problems, "; ".join(problems)


@pytest.fixture(autouse=True, scope="session")
def nothing_left_at_the_end():
    OUR_SEGMENTS.start_watching()
    yield
    try:
        _check_nothing_new(set(), set())
    finally:
        OUR_SEGMENTS.stop_watching()
        shutil.rmtree(PREPACK_DIR, ignore_errors=True)


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
