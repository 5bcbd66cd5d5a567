"""The worker pool with real forked workers: futures, concurrency, back-pressure, crashes."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from concurrent.futures import wait as wait_futures

import numpy as np
import pytest
from conftest import start_chaos, wait_until

import shmengine
from shmengine.errors import RemoteTraceback
from shmengine.model.weights import WeightStore
from shmengine.runtime.placement import place_workers
from shmengine.runtime.pool import WorkerPool
from shmengine.runtime.threads import usable_cores
from shmengine.runtime.worker import ProgramSpec


@pytest.fixture
def chaos_pool(small_mlp):
    """A factory of pools running ChaosProgram (the weights are the small MLP's, unused)."""
    made = []

    def make(workers=2, max_queued_batches=0, **options):
        store = WeightStore.load({"model": small_mlp.path})
        try:
            pool = WorkerPool(
                store,
                ProgramSpec("programs", "ChaosProgram", options),
                place_workers("cpu", inter_threads=workers, intra_threads=1).slots,
                max_queued_batches=max_queued_batches,
            )
        except BaseException:
            store.close()
            raise
        made.append((pool, store))
        return pool

    yield make
    for pool, store in made:
        pool.close()
        store.close()


# -- results ------------------------------------------------------------------------------------


@pytest.mark.parametrize("inter_threads", [1, 2])
def test_outputs_match_numpy(small_mlp, inter_threads):
    with shmengine.Engine(small_mlp.path, inter_threads=inter_threads, intra_threads=1) as engine:
        x = small_mlp.inputs(5)
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], small_mlp.reference(x), rtol=1e-4, atol=1e-5)
        batches = [{"x": small_mlp.inputs(3 + i, seed=i)} for i in range(7)]
        results = engine.run_batch(batches)
        assert len(results) == 7
        for batch, result in zip(batches, results):
            np.testing.assert_allclose(result["y"], small_mlp.reference(batch["x"]), rtol=1e-4, atol=1e-5)
        futures = engine.run_batch(batches, asynchronous=True)
        for batch, future in zip(batches, futures):
            np.testing.assert_allclose(future.result(timeout=30)["y"], small_mlp.reference(batch["x"]), rtol=1e-4, atol=1e-5)
        assert engine.run_batch([]) == []


def test_large_tensors_cross_through_the_arena(small_mlp, tmp_path):
    """Inputs and outputs far above the arena threshold (and its initial size) arrive intact, and
    each result is the caller's own writable array: the arena it came through carries the next
    batches' results, which must not change it."""
    with shmengine.Engine(small_mlp.path, inter_threads=1) as engine:
        results = []
        for rows in (20_000, 70_000, 20_000):  # 5 and 18 MiB of input; the arena starts at 1 MiB
            x = small_mlp.inputs(rows, seed=len(results))
            y = engine.run_batch({"x": x})["y"]
            assert y.flags.writeable, "a result must be the caller's own array, not a view of the arena"
            np.testing.assert_allclose(y, small_mlp.reference(x), rtol=1e-4, atol=1e-4)
            results.append((x, y))
        for x, y in results:  # still right after later results crossed the same arena
            np.testing.assert_allclose(y, small_mlp.reference(x), rtol=1e-4, atol=1e-4)


def test_many_caller_threads_get_their_own_results(small_mlp):
    with shmengine.Engine(small_mlp.path, inter_threads=2, intra_threads=1) as engine:
        errors = []

        def caller(seed):
            try:
                for i in range(25):
                    x = small_mlp.inputs(1 + (seed + i) % 7, seed=seed * 100 + i)
                    np.testing.assert_allclose(engine.run_batch({"x": x})["y"], small_mlp.reference(x), rtol=1e-4, atol=1e-5)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=caller, args=(s,)) for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]


def test_engine_created_in_a_thread_that_exits_keeps_working(small_mlp):
    """The fork server must not depend on the thread that created it (no PDEATHSIG on it)."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("engine", shmengine.Engine(small_mlp.path, inter_threads=2)))
    t.start()
    t.join()
    with box["engine"] as engine:
        time.sleep(0.3)
        x = small_mlp.inputs(4)
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], small_mlp.reference(x), rtol=1e-4, atol=1e-5)
        assert len(engine.worker_pids) == 2


def test_worker_exception_carries_remote_traceback(chaos_pool):
    pool = chaos_pool(workers=1)
    with pytest.raises(KeyError) as info:
        pool.submit("raise", "nope").result(timeout=10)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "programs.py" in info.value.__cause__.tb
    pid = pool.worker_pids()
    assert pool.submit("echo", 5).result(timeout=10) == 5
    assert pool.worker_pids() == pid  # an exception is not a crash


def test_cancelled_queued_batch_never_runs(chaos_pool, tmp_path):
    """A batch cancelled while queued is dropped: its program method never runs (it would leave
    a file), and the batches after it run as usual."""
    pool = chaos_pool(workers=1)
    trace = tmp_path / "second-ran"
    first = pool.submit("sleep", (0.3, "first"))
    second = pool.submit("touch", str(trace))
    assert second.cancel()
    assert first.result(timeout=10) == "first"
    assert pool.submit("echo", "third").result(timeout=10) == "third"  # one worker: after the second
    assert second.cancelled()
    assert not trace.exists(), "the cancelled batch ran"
    assert pool.submit("touch", str(trace)).result(timeout=10) == str(trace) and trace.exists()  # the trace works


# -- back-pressure ---------------------------------------------------------------------------------


def test_full_queue_blocks_the_submitter(chaos_pool, tmp_path):
    """With the worker busy and the queue (1) full, a third submit blocks until there is room,
    then goes through. The running batch holds until the test releases it (it waits for a file),
    so no sleep of the test can outlast it on a slow machine."""
    pool = chaos_pool(workers=1, max_queued_batches=1)
    release = tmp_path / "release"
    running = pool.submit("wait_for", str(release))
    assert wait_until(lambda: pool._workers[0].batch is not None, timeout=10)  # the worker has it
    queued = pool.submit("echo", 2)  # fills the queue
    submitted = threading.Event()
    third = []

    def submit_third():
        third.append(pool.submit("echo", 3))
        submitted.set()

    t = threading.Thread(target=submit_third)
    t.start()
    assert not submitted.wait(0.3), "a submit into a full queue must block"
    assert not running.done() and not queued.done()
    release.touch()
    assert running.result(timeout=10) is True and queued.result(timeout=10) == 2
    assert submitted.wait(10)
    assert third[0].result(timeout=10) == 3
    t.join()


@pytest.mark.parametrize("setting, expected", [(0, 8), (-1, None), (3, 3)])
def test_queue_size_settings(setting, expected):
    from shmengine.runtime.pool import resolve_queue_size

    assert resolve_queue_size(setting, 2) == expected


# -- crashes ------------------------------------------------------------------------------------------


def test_batch_is_retried_once_on_a_fresh_worker(chaos_pool, tmp_path):
    pool = chaos_pool(workers=2)
    pids_before = set(pool.worker_pids())
    marker = str(tmp_path / "marker")
    assert pool.submit("crash_once", marker).result(timeout=30) == "survived"
    assert wait_until(lambda: len(pool.worker_pids()) == 2)
    assert len(set(pool.worker_pids()) - pids_before) == 1  # exactly the dead one was replaced


@pytest.mark.parametrize(
    "method, payload, expected_code, text",
    [("exit", 3, 3, "exited with code 3"), ("segfault", None, -signal.SIGSEGV, "SIGSEGV (-11)")],
)
def test_batch_that_kills_every_worker_fails_with_worker_crashed(chaos_pool, method, payload, expected_code, text, capfd):
    pool = chaos_pool(workers=2)
    with pytest.raises(shmengine.WorkerCrashedError, match=re.escape(text)) as info:
        pool.submit(method, payload).result(timeout=30)
    assert info.value.exitcode == expected_code
    # the pool serves on, at full strength
    assert [f.result(timeout=30) for f in [pool.submit("echo", i) for i in range(6)]] == list(range(6))
    assert wait_until(lambda: len(pool.worker_pids()) == 2)
    if method == "segfault":
        assert "Fatal Python error: Segmentation fault" in capfd.readouterr().err  # faulthandler


def test_sigkill_twice_names_the_signal(chaos_pool):
    pool = chaos_pool(workers=1)
    future = pool.submit("sleep", (30, None))
    killed = set()
    for _ in range(2):
        # kill a worker only once it runs the batch: not while starting, not the one already killed
        assert wait_until(
            lambda: (w := pool._workers[0]).ready
            and w.pid is not None
            and w.pid not in killed
            and w.batch is not None
            and w.batch.future is future,
            timeout=10,
        )
        killed.add(pool._workers[0].pid)
        os.kill(pool._workers[0].pid, signal.SIGKILL)
    with pytest.raises(shmengine.WorkerCrashedError, match=r"SIGKILL \(-9\)"):
        future.result(timeout=30)
    assert pool.submit("echo", "alive").result(timeout=30) == "alive"


def test_sigkill_under_concurrent_load_loses_nothing(slow_mlp):
    """Kill workers in the middle of their batches while distinct batches keep coming: each future
    gets its own right answer or WorkerCrashedError, and only a batch that two workers died on
    fails (a batch is retried once); none hangs; the pool ends at full strength.

    The submitter keeps a few batches in flight until the six kills are done, however fast this
    machine runs them, and each kill waits for a worker that is running a batch."""
    with shmengine.Engine(slow_mlp.path, inter_threads=2, intra_threads=1, max_queued_batches=-1) as engine:
        inputs, futures = [], []
        stop = threading.Event()
        t, killed = start_chaos(engine, kills=6, interval=0.05, seed=0, stop=stop, mid_batch=True)
        deadline = time.monotonic() + 120
        while (t.is_alive() or len(futures) < 40) and time.monotonic() < deadline:
            if sum(not f.done() for f in futures[-6:]) >= 4:
                time.sleep(0.002)
                continue
            inputs.append(slow_mlp.inputs(64, seed=len(inputs)))
            futures.append(engine.run_batch({"x": inputs[-1]}, asynchronous=True))
        stop.set()
        t.join()
        done, not_done = wait_futures(futures, timeout=120)
        assert not not_done, f"{len(not_done)} futures hung"
        assert len(killed) == 6, f"{len(killed)} kills in 120 s"
        ok = crashed = 0
        expected = np.split(slow_mlp.reference(np.concatenate(inputs)), len(inputs))  # one numpy pass
        for reference, future in zip(expected, futures):
            exc = future.exception()
            if exc is None:
                np.testing.assert_allclose(future.result()["y"], reference, rtol=1e-3, atol=1e-3)
                ok += 1
            else:
                assert isinstance(exc, shmengine.WorkerCrashedError), repr(exc)
                crashed += 1
        # each kill takes one batch's worker; a batch fails only on its second one
        assert crashed <= len(killed) // 2, f"{crashed} batches failed after {len(killed)} kills"
        assert wait_until(lambda: len(engine.worker_pids) == 2, timeout=10)
        assert not set(engine.worker_pids) & set(killed)
        x = slow_mlp.inputs(2)
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], slow_mlp.reference(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode, text", [("raise", "refuses to start"), ("segfault", "SIGSEGV"), ("exit", "exited with code 7")])
def test_worker_that_dies_while_starting_fails_the_constructor(chaos_pool, mode, text):
    start = time.monotonic()
    with pytest.raises(shmengine.WorkerStartupError, match=text):
        chaos_pool(workers=2, fail_start=mode)
    assert time.monotonic() - start < 30


# -- threads --------------------------------------------------------------------------------------------


def test_oversubscription_warns_with_the_fix(small_mlp, caplog):
    with caplog.at_level(logging.WARNING, logger="shmengine"):
        with shmengine.Engine(small_mlp.path, inter_threads=2, intra_threads=4) as engine:
            info = engine.parallel_info()
    cores = usable_cores()  # what the engine divides: affinity capped by the cgroup quota
    if 2 * 4 > cores:
        assert f"Set intra_threads={max(1, cores // 2)}" in caplog.text
    else:  # 8 threads fit (the 16-core device machine): no warning
        assert "fight for the CPU" not in caplog.text
    assert info.count("intra_op_num_threads=4") == 2


def test_automatic_intra_threads_divide_the_cores(small_mlp):
    cores = usable_cores()
    with shmengine.Engine(small_mlp.path, inter_threads=2) as engine:
        assert engine.intra_threads == max(1, cores // 2)
        info = engine.parallel_info()
    assert f"intra_op_num_threads={max(1, cores // 2)}" in info
    assert f"OMP_NUM_THREADS={max(1, cores // 2)}" in info
    assert "ONNX Runtime" in info and "CUDA devices" in info


def test_ping_round_trip(small_mlp):
    with shmengine.Engine(small_mlp.path) as engine:
        assert engine.ping({"a": 1}).result(timeout=10) == {"a": 1}
