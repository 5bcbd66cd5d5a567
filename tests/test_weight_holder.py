"""A GPU's weight holder dying: its serving workers stop, restart on the new holder's handle,
and lose no batch; a holder that cannot restart breaks the model with the reason.

The recovery logic (``device_weights.HolderWatch`` between two real pools of forked workers)
runs here without a GPU: the holder is a stand-in whose handle is its pid, the serving workers
report the handle their settings carry. The CUDA holder itself runs in ``tools/bench_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
from conftest import wait_until

from shmengine.errors import EngineBrokenError
from shmengine.model.weights import WeightStore
from shmengine.runtime.device_weights import HolderWatch
from shmengine.runtime.placement import place_workers
from shmengine.runtime.pool import WorkerPool
from shmengine.runtime.worker import ProgramSpec


@pytest.fixture
def holder_and_serving(small_mlp, tmp_path):
    """(holder pool, serving pool of 2 workers, refuse-file): the serving slots carry the first
    holder's handle, and a HolderWatch links the two as the engine does for one GPU."""
    store = WeightStore.load({"model": small_mlp.path})
    refuse = str(tmp_path / "refuse")
    pools = []
    try:
        slots = place_workers("cpu", inter_threads=2, intra_threads=1).slots
        watch = HolderWatch(0, dict(enumerate(slots)))
        holder = WorkerPool(store, ProgramSpec("programs", "StandInHolderProgram", {"refuse_if": refuse}), slots[:1],
                            owns_segment=False, observer=watch)
        pools.append(holder)
        handle = holder.worker_info(0)["device_weights"]
        serving = WorkerPool(store, ProgramSpec("programs", "ChaosProgram"),
                             [dataclasses.replace(s, device_weights=handle) for s in slots])
        pools.append(serving)
        watch.attach(serving)
        yield holder, serving, refuse
    finally:
        for pool in reversed(pools):
            pool.close()
        store.close()


def handles_seen(serving, count=8):
    return {f.result(timeout=30) for f in [serving.submit("device_weights", None) for _ in range(count)]}


def test_serving_workers_restart_on_the_new_holder_and_lose_no_batch(holder_and_serving, tmp_path):
    holder, serving, _ = holder_and_serving
    first_holder = holder.worker_pids()[0]
    assert handles_seen(serving) == {first_holder}
    serving_before = set(serving.worker_pids())

    # both serving workers busy when the holder dies: their batches must come back, not fail
    marker = str(tmp_path / "go")
    running = [serving.submit("wait_for", marker) for _ in range(2)]
    assert wait_until(lambda: all(f.running() for f in running))
    os.kill(first_holder, signal.SIGKILL)

    assert wait_until(lambda: holder.worker_pids() and holder.worker_pids()[0] != first_holder, timeout=30)
    new_holder = holder.worker_pids()[0]
    assert wait_until(lambda: len(serving.worker_pids()) == 2 and not serving_before & set(serving.worker_pids()), timeout=30)
    open(marker, "w").close()
    assert [f.result(timeout=30) for f in running] == [True, True]
    # every serving worker now maps the new holder's copy, none the old one
    assert handles_seen(serving) == {new_holder}


def test_a_holder_that_cannot_restart_breaks_the_model_naming_why(holder_and_serving):
    holder, serving, refuse = holder_and_serving
    open(refuse, "w").close()
    os.kill(holder.worker_pids()[0], signal.SIGKILL)
    assert wait_until(lambda: serving.closed, timeout=60)
    with pytest.raises(EngineBrokenError, match="weight holder of GPU 0 cannot be restarted.*refuses to start"):
        serving.submit("echo", 1)


def test_a_resume_before_the_workers_exit_reports_is_not_taken_for_a_crash(small_mlp, tmp_path, caplog):
    """hold then resume at once (the new copy was ready before the fork server reported the old
    workers' deaths): their batches come back, not as failed attempts, the workers restart on
    the new settings, and nothing is logged as a crash."""
    store = WeightStore.load({"model": small_mlp.path})
    slots = place_workers("cpu", inter_threads=2, intra_threads=1).slots
    pool = WorkerPool(store, ProgramSpec("programs", "ChaosProgram"), [dataclasses.replace(s, device_weights="old") for s in slots])
    try:
        marker = str(tmp_path / "go")
        running = [pool.submit("wait_for", marker) for _ in range(2)]
        assert wait_until(lambda: all(f.running() for f in running))
        before = set(pool.worker_pids())
        with caplog.at_level("WARNING", logger="shmengine"):
            pool.hold_slots({0, 1}, "a test")
            pool.resume_slots({n: dataclasses.replace(s, device_weights="new") for n, s in enumerate(slots)})
            assert wait_until(lambda: len(pool.worker_pids()) == 2 and not before & set(pool.worker_pids()), timeout=30)
            open(marker, "w").close()
            assert [f.result(timeout=30) for f in running] == [True, True]
            assert handles_seen(pool) == {"new"}
        assert "starting a replacement" not in caplog.text
    finally:
        pool.close()
        store.close()
