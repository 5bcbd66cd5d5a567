"""Fault and abuse: workers killed under heavy load, signals during a long translation, a flood of
requests against a small queue. Each test is bounded in time; the conftest fixtures check that
no process and no /dev/shm segment is left behind."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import wait as wait_futures

import numpy as np
import pytest
from conftest import ROOT, descendants, remove_segments, shm_segments, start_chaos, wait_until

import shmengine
from models.train_numbers import number_to_words


def test_1000_requests_while_a_chaos_thread_kills_20_workers(slow_mlp):
    """Every future completes with its own correct output or WorkerCrashedError; none hangs; the
    pool ends at full strength; no result goes to the wrong request."""
    with shmengine.Engine(slow_mlp.path, inter_threads=2, intra_threads=1, max_queued_batches=-1) as engine:
        inputs = [slow_mlp.inputs(4, seed=i) for i in range(1000)]
        # each kill lands on a worker that is running a batch, so each one exercises the retry
        killer, kills = start_chaos(engine, kills=20, interval=0.1, seed=1, mid_batch=True)
        futures = []
        for x in inputs:  # submitted while the killing goes on
            futures.append(engine.run_batch({"x": x}, asynchronous=True))
            time.sleep(0.004)
        killer.join(60)
        done, not_done = wait_futures(futures, timeout=180)
        assert not not_done, f"{len(not_done)} futures hung"
        assert len(kills) == 20
        ok = crashed = 0
        # one numpy pass over every input: 1000 small ones cost minutes on a busy 2-core machine
        expected = np.split(slow_mlp.reference(np.concatenate(inputs)), len(inputs))
        for reference, future in zip(expected, futures):
            exc = future.exception()
            if exc is None:
                np.testing.assert_allclose(future.result()["y"], reference, rtol=1e-3, atol=1e-3)
                ok += 1
            else:
                assert isinstance(exc, shmengine.WorkerCrashedError), repr(exc)
                crashed += 1
        # each kill takes one batch's worker; a batch fails only if a second worker dies on it
        assert crashed <= len(kills) // 2, f"{crashed} of {ok + crashed} failed after {len(kills)} kills"
        assert wait_until(lambda: len(engine.worker_pids) == 2, timeout=10)
        assert not set(engine.worker_pids) & set(kills)


def _cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "shmengine.cli", *map(str, args)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _interrupt(proc, sig, before: set[str], *, twice: bool = False) -> str:
    """Send ``sig`` once the run is under way (``twice``: a second one right after the first);
    its stderr, after checking it exited with 130 and left no process or segment behind (its
    own: other programs' segments are not looked at)."""
    children = descendants(proc.pid)
    made = shm_segments() - before  # the run's weights segment, seen while it holds it
    assert made, "the run holds no shmengine segment: nothing to check that it removes"
    proc.send_signal(sig)
    if twice:
        time.sleep(0.01)
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # a hang: get every thread's stack (the CLI's SIGUSR1), then clean up
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        for pid in [proc.pid, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, err = proc.communicate()
        remove_segments(made)
        pytest.fail(f"shmengine-run did not exit within 30 s of {sig.name}; its stacks:\n{err[-20000:]}")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in children), timeout=5)
    assert wait_until(lambda: not (shm_segments() & made), timeout=5), f"left behind: {shm_segments() & made}"
    return err


def _complete_lines(path) -> list[str]:
    text = path.read_text()
    assert text.endswith("\n"), "the output ends in the middle of a line"
    return text.splitlines()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_long_translate_file(tmp_path, sig):
    """SIGTERM / Ctrl-C while shmengine-run translates a long file: a clean exit (130), the output
    holds complete, correct lines only, and no process or segment is left."""
    numbers = [random.Random(i).randrange(1_000_000) for i in range(200_000)]
    source, output = tmp_path / "numbers.txt", tmp_path / "words.txt"
    source.write_text("".join(f"{n}\n" for n in numbers))
    before = shm_segments()
    proc = _cli("translate", "--input", source, "--output", output, "--beam-size", 1, "--max-batch-size", 16)
    assert wait_until(lambda: output.exists() and output.stat().st_size > 20_000, timeout=60), proc.stderr.read()
    _interrupt(proc, sig, before)
    lines = _complete_lines(output)
    assert 0 < len(lines) < len(numbers)
    assert lines == [number_to_words(n) for n in numbers[: len(lines)]]


def test_ctrl_c_during_a_long_generate_file(tmp_path):
    """The same for ``shmengine-run generate``: complete lines, each the right continuation."""
    numbers = [random.Random(i).randrange(1_000_000) for i in range(100_000)]
    source, output = tmp_path / "prompts.txt", tmp_path / "words.txt"
    source.write_text("".join(f"{n} =\n" for n in numbers))
    before = shm_segments()
    proc = _cli("generate", "--input", source, "--output", output, "--max-batch-size", 16)
    assert wait_until(lambda: output.exists() and output.stat().st_size > 20_000, timeout=60), proc.stderr.read()
    _interrupt(proc, signal.SIGINT, before)
    lines = _complete_lines(output)
    assert 0 < len(lines) < len(numbers)
    assert lines == [number_to_words(n) for n in numbers[: len(lines)]]


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The first signal waits for the current line; a second one does not: with a first batch of
    50,000 lines under way (seconds before its first line), two signals end the run with no line
    written, exit 130, no traceback, nothing left."""
    numbers = [random.Random(i).randrange(1_000_000) for i in range(100_000)]
    source, output = tmp_path / "numbers.txt", tmp_path / "words.txt"
    source.write_text("".join(f"{n}\n" for n in numbers))
    before = shm_segments()
    proc = _cli("translate", "--input", source, "--output", output, "--beam-size", 1, "--max-batch-size", 50_000)
    assert wait_until(lambda: shm_segments() - before, timeout=60), proc.stderr.read()
    time.sleep(0.5)
    err = _interrupt(proc, signal.SIGINT, before, twice=True)
    assert "stopping after the current line" in err
    assert not output.exists() or output.read_text() == "", "it waited for a line after the second signal"


def test_signal_during_a_long_score_file(tmp_path):
    """The same for ``shmengine-run score``: each written line scores its own pair, in order."""
    numbers = [random.Random(i).randrange(1_000_000) for i in range(100_000)]
    source, target, output = tmp_path / "numbers.txt", tmp_path / "words.txt", tmp_path / "scores.txt"
    source.write_text("".join(f"{n}\n" for n in numbers))
    target.write_text("".join(f"{number_to_words(n)}\n" for n in numbers))
    before = shm_segments()
    proc = _cli("score", "--source", source, "--target", target, "--output", output, "--max-batch-size", 16)
    assert wait_until(lambda: output.exists() and output.stat().st_size > 20_000, timeout=60), proc.stderr.read()
    _interrupt(proc, signal.SIGINT, before)
    lines = _complete_lines(output)
    assert 0 < len(lines) < len(numbers)
    scored = [line.split(" ||| ") for line in lines]
    assert [words for _, words in scored] == [number_to_words(n) for n in numbers[: len(lines)]]
    # each score is its own pair's: the Python API's mean log-prob of these words given this
    # number, checked on up to 300 lines spread over the file (the last one included)
    sample = sorted({*range(0, len(lines), max(1, len(lines) // 300)), len(lines) - 1})
    with shmengine.Translator(ROOT / "models" / "numbers-marian", inter_threads=1, intra_threads=1) as translator:
        expected = translator.score_batch(
            [[*str(numbers[i]), "</s>"] for i in sample], [scored[i][1].split() for i in sample], max_batch_size=64
        )
    for i, result in zip(sample, expected):
        mean = sum(result.log_probs) / len(result.log_probs)
        assert float(scored[i][0]) == pytest.approx(mean, abs=1e-4), f"line {i + 1}: {lines[i]!r}, expected {mean:.6f}"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_flood_of_100k_requests_blocks_the_submitter_and_close_is_prompt(small_mlp, request):
    """A producer submitting 100,000 requests with max_queued_batches=8 is held back by the queue
    (which never holds more than 8), the supervisor's memory stays flat while it floods, and
    close() with requests still queued fails them with EngineClosedError and returns promptly.

    The producer keeps only a window of its latest futures, as a real one would; the engine must
    not hold on to anything that the producer let go."""
    engine = shmengine.Engine(small_mlp.path, inter_threads=2, intra_threads=1, max_queued_batches=8)
    request.addfinalizer(engine.close)  # a failed assertion must not leave the producer blocked
    x = small_mlp.inputs(1)
    expected = small_mlp.reference(x)
    recent: collections.deque = collections.deque(maxlen=200)
    counts = {"submitted": 0, "checked": 0}
    peak_queue = [0]
    done_producing = threading.Event()
    errors = []

    def producer():
        try:
            for _ in range(100_000):
                recent.append(engine.run_batch({"x": x}, asynchronous=True))
                counts["submitted"] += 1
                peak_queue[0] = max(peak_queue[0], len(engine._pool._pending))
                oldest = recent[0]
                if oldest.done() and oldest.exception() is None:
                    np.testing.assert_allclose(oldest.result()["y"], expected, atol=1e-4)
                    counts["checked"] += 1
        except shmengine.EngineClosedError:
            pass
        except BaseException as exc:  # raised in this thread it would reach pytest only as a warning
            errors.append(exc)
        finally:
            done_producing.set()

    thread = threading.Thread(target=producer)
    thread.start()
    time.sleep(1.5)
    rss_start, submitted_start = _rss_mb(), counts["submitted"]
    time.sleep(4)
    rss_end = _rss_mb()
    assert not errors, errors[0]
    assert thread.is_alive(), "the producer should still be held back by the queue"
    assert peak_queue[0] <= 8
    assert counts["submitted"] - submitted_start > 200 and counts["checked"] > 200
    assert rss_end - rss_start < 50, f"RSS grew {rss_end - rss_start:.0f} MB over {counts['submitted'] - submitted_start} requests"
    # Requests must be queued when close() comes. Workers that outrun a CPU-starved producer can
    # leave the queue empty at that moment, so the workers are stopped (SIGSTOP; close() kills
    # them with SIGKILL) and the producer fills the queue and blocks on it.
    for pid in engine.worker_pids:
        os.kill(pid, signal.SIGSTOP)
    assert wait_until(lambda: len(engine._pool._pending) == 8, timeout=10), "the producer did not fill the queue"
    with engine._pool._not_full:  # the queue's lock
        queued = [batch.future for batch in engine._pool._pending]
    waiting = [f for f in list(recent) if not f.done()]  # the producer is blocked: recent is still
    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 5
    assert done_producing.wait(10)
    thread.join(10)
    assert not errors, errors[0]
    # The 8 queued fail (a stopped worker handed one of them would never answer it); every other
    # future is done, with its right result or EngineClosedError: none is left waiting.
    assert len(queued) == 8 and all(isinstance(f.exception(timeout=0), shmengine.EngineClosedError) for f in queued)
    for f in waiting:
        exc = f.exception(timeout=0)
        assert exc is None or isinstance(exc, shmengine.EngineClosedError), repr(exc)
        if exc is None:
            np.testing.assert_allclose(f.result()["y"], expected, atol=1e-4)
