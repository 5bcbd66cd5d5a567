"""Dispatch policies of the pool, with real forked workers: Lockstep pins the n-th batch to slot
n % workers and fails the pool when a member dies; AnyIdleWorker (the default) replaces it."""

from __future__ import annotations

import pytest
from conftest import wait_until

from shmengine.errors import EngineBrokenError, WorkerCrashedError
from shmengine.model.weights import WeightStore
from shmengine.runtime.placement import place_workers
from shmengine.runtime.pool import AnyIdleWorker, Lockstep, WorkerPool
from shmengine.runtime.worker import ProgramSpec


@pytest.fixture
def pool_with(small_mlp):
    made = []

    def make(dispatch, workers=2):
        store = WeightStore.load({"model": small_mlp.path})
        try:
            pool = WorkerPool(store, ProgramSpec("programs", "ChaosProgram", {}),
                              place_workers("cpu", inter_threads=workers, intra_threads=1).slots, dispatch=dispatch)
        except BaseException:
            store.close()
            raise
        made.append((pool, store))
        return pool

    yield make
    for pool, store in made:
        pool.close()
        store.close()


def test_lockstep_runs_the_nth_batch_on_slot_n_mod_workers(pool_with, tmp_path):
    pool = pool_with(Lockstep(), workers=2)
    pid_of_slot = {slot: pool.worker_info(slot)["pid"] for slot in range(2)}
    # batch 0 holds slot 0 until a file appears: batches 2 and 4 must wait for slot 0 although
    # slot 1 is idle, and 1, 3, 5 run on slot 1 meanwhile
    gate = tmp_path / "gate"
    first = pool.submit("wait_for", str(gate))
    pids = [pool.submit("pid", None) for _ in range(5)]
    assert [f.result(timeout=30) for f in pids[0::2]] == [pid_of_slot[1]] * 3
    assert not any(f.done() for f in pids[1::2])
    gate.touch()
    assert first.result(timeout=30) is True
    assert [f.result(timeout=30) for f in pids[1::2]] == [pid_of_slot[0]] * 2


def test_lockstep_member_death_fails_its_batch_and_the_pool_without_respawn(pool_with):
    pool = pool_with(Lockstep(), workers=2)
    pids_before = set(pool.worker_pids())
    dying = pool.submit("exit", 9)   # slot 0
    queued = pool.submit("sleep", (0.5, "x"))  # slot 1: may finish or fail with the pool
    later = pool.submit("echo", 1)  # slot 0 again: can never run
    with pytest.raises(WorkerCrashedError, match=r"worker 0 .* exited with code 9.*not replaced"):
        dying.result(timeout=30)
    with pytest.raises(EngineBrokenError):
        later.result(timeout=30)
    try:
        queued.result(timeout=30)
    except EngineBrokenError:
        pass
    with pytest.raises(EngineBrokenError):
        pool.submit("echo", 2)
    assert wait_until(lambda: not (set(pool.worker_pids()) - pids_before), timeout=10), "a replacement was started"


def test_any_idle_worker_replaces_a_dead_worker_and_retries_its_batch(pool_with, tmp_path):
    pool = pool_with(AnyIdleWorker(), workers=2)
    marker = tmp_path / "crashed-once"
    assert pool.submit("crash_once", str(marker)).result(timeout=60) == "survived"
    assert pool.submit("echo", 3).result(timeout=30) == 3
    assert wait_until(lambda: len(pool.worker_pids()) == 2, timeout=30)
