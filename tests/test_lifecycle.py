"""Lifetime: close, with-exit, interpreter exit and a killed supervisor leave nothing behind;
and N workers cost the weights once (PSS)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import PREPACK_DIR, ROOT, descendants, make_mlp, prepacked_file, segment_exists, shm_segments, wait_until

import shmengine


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _supervisor_script(model: str, body: str, options: str = "") -> str:
    return textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        import shmengine
        engine = shmengine.Engine({model!r}, inter_threads=2, intra_threads=1{options})
        print("PIDS", *engine.worker_pids, engine._store.segment.name, flush=True)
        """
    ) + textwrap.dedent(body)


def test_close_fails_queued_batches_and_returns_promptly(slow_mlp):
    engine = shmengine.Engine(slow_mlp.path, inter_threads=1, intra_threads=1, max_queued_batches=-1)
    pids = engine.worker_pids
    futures = engine.run_batch([{"x": slow_mlp.inputs(256, seed=i)} for i in range(50)], asynchronous=True)
    time.sleep(0.2)
    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 5
    for future in futures:
        exc = future.exception(timeout=5)
        assert exc is None or isinstance(exc, shmengine.EngineClosedError)
    assert sum(isinstance(f.exception(), shmengine.EngineClosedError) for f in futures) >= 40
    assert "closed" in str(futures[-1].exception())
    with pytest.raises(shmengine.EngineClosedError):
        engine.run_batch({"x": slow_mlp.inputs(1)})
    engine.close()  # idempotent
    assert not any(_alive(p) for p in pids)


def test_blocked_submitter_is_released_by_close(slow_mlp):
    engine = shmengine.Engine(slow_mlp.path, inter_threads=1, intra_threads=1, max_queued_batches=1)
    outcome = []

    def flood():
        try:
            for i in range(100):
                engine.run_batch({"x": slow_mlp.inputs(256, seed=i)}, asynchronous=True)
        except shmengine.EngineClosedError as exc:
            outcome.append(exc)

    t = threading.Thread(target=flood)
    t.start()
    time.sleep(0.5)
    assert t.is_alive(), "the flood should be blocked on the full queue"
    engine.close()
    t.join(5)
    assert not t.is_alive() and outcome


def test_exception_in_caller_code_inside_with_cleans_up(small_mlp):
    pids = []
    with pytest.raises(ZeroDivisionError):
        with shmengine.Engine(small_mlp.path, inter_threads=2) as engine:
            pids = engine.worker_pids
            engine.run_batch({"x": small_mlp.inputs(2)})
            raise ZeroDivisionError("an error in the caller's own code")
    assert pids and not any(_alive(p) for p in pids)


def _started(stdout_line: str) -> tuple[list[int], str]:
    """(worker pids, segment name) from the PIDS line the supervisor script prints."""
    fields = stdout_line.split()
    assert fields[0] == "PIDS"
    return [int(p) for p in fields[1:3]], fields[3]


def test_interpreter_exit_without_close_leaves_nothing(small_mlp):
    script = _supervisor_script(str(small_mlp.path), "engine.run_batch({'x': np.zeros((2, 64), np.float32)})\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pids, segment = _started(out.stdout)
    # Nothing to wait for: the engine's finalizer ran before the interpreter exited.
    assert not segment_exists(segment)
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=5)


def test_uncaught_exception_at_top_level_leaves_nothing(small_mlp):
    script = _supervisor_script(str(small_mlp.path), "raise SystemExit('boom')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "boom" in out.stderr
    pids, segment = _started(out.stdout)
    assert not segment_exists(segment)
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=5)


@pytest.mark.parametrize("repeat", range(20))
def test_killed_supervisor_takes_workers_and_segment_down(slow_mlp, repeat):
    script = _supervisor_script(
        str(slow_mlp.path),
        """
        futures = engine.run_batch([{'x': np.ones((256, 1024), np.float32)}] * 50, asynchronous=True)
        print("RUNNING", flush=True)
        time.sleep(60)
        """,
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids, segment = _started(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "RUNNING"
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    assert segment_exists(segment)
    time.sleep(0.1 * repeat)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=5), "workers outlived the supervisor"
    assert wait_until(lambda: not segment_exists(segment), timeout=5), "segment outlived the supervisor"


def test_killed_supervisor_takes_the_prepacked_files_down(slow_mlp):
    """The prepacked model files live on disk, where no reboot would clear them: the fork server
    removes them when the supervisor dies, as it removes the segment."""
    script = _supervisor_script(
        str(slow_mlp.path),
        """
        futures = engine.run_batch([{'x': np.ones((256, 1024), np.float32)}] * 50, asynchronous=True)
        print("RUNNING", flush=True)
        time.sleep(60)
        """,
        options=", prepack_weights=True",
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids, segment = _started(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "RUNNING"
    files = [n for n in os.listdir(PREPACK_DIR) if n.startswith(segment + "-")]
    assert any(n.endswith(".data") for n in files), files
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert wait_until(lambda: not any(_alive(p) for p in pids), timeout=5), "workers outlived the supervisor"
    assert wait_until(lambda: not [n for n in os.listdir(PREPACK_DIR) if n.startswith(segment + "-")], timeout=5)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _maps_onnxruntime(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "onnxruntime" in f.read()


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_fork_server_never_loads_onnxruntime_so_forks_hold_no_ort_thread(small_mlp):
    """Importing onnxruntime starts a thread of ORT's own; a fork taken while it holds a lock can
    deadlock the child. So the fork server must never load ORT and must run one thread only,
    also across respawns, while every worker does load ORT (which shows the check can see the
    library when it is there)."""
    with shmengine.Engine(small_mlp.path, inter_threads=2, intra_threads=1) as engine:
        first = engine.worker_pids
        fork_server = _parent(first[0])
        assert fork_server != os.getpid() and all(_parent(p) == fork_server for p in first)
        assert all(_maps_onnxruntime(p) for p in first)
        assert not _maps_onnxruntime(fork_server)
        assert _threads(fork_server) == 1
        os.kill(first[0], signal.SIGKILL)
        assert wait_until(lambda: len(set(engine.worker_pids) - set(first)) == 1, timeout=10)
        x = small_mlp.inputs(4)
        for _ in range(4):
            np.testing.assert_allclose(engine.run_batch({"x": x})["y"], small_mlp.reference(x), rtol=1e-4, atol=1e-5)
        respawned = (set(engine.worker_pids) - set(first)).pop()
        # The replacement is listed as soon as it is forked, before it has built its session.
        assert _parent(respawned) == fork_server
        assert wait_until(lambda: _maps_onnxruntime(respawned), timeout=10)
        assert not _maps_onnxruntime(fork_server)
        assert _threads(fork_server) == 1


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError("no Pss line")


def test_two_workers_cost_the_weights_once(tmp_path):
    """Supervisor + fork server + 2 workers on a 256 MiB model: PSS <= 1.1 x weights + 2 x 100 MiB.

    The supervisor is a fresh subprocess, so pytest's own memory does not count."""
    model = make_mlp(tmp_path / "big", [4096, 4096, 4096, 4096, 4096], seed=3, external_data=True)
    weights_mib = sum(w.nbytes + b.nbytes for w, b in model.params) / 2**20
    assert weights_mib >= 256
    script = _supervisor_script(
        str(model.path),
        """
        out = engine.run_batch([{'x': np.ones((4, 4096), np.float32)}] * 4)
        print("RAN", flush=True)
        sys.stdin.readline()
        """,
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        assert proc.stdout.readline().strip() == "RAN"
        processes = [proc.pid, *descendants(proc.pid)]
        assert len(processes) == 4  # supervisor, fork server, 2 workers
        total_mib = sum(_pss_kib(p) for p in processes) / 1024
    finally:
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(30)
    budget = 1.1 * weights_mib + 2 * 100
    assert total_mib <= budget, f"total PSS {total_mib:.0f} MiB > {budget:.0f} MiB for {weights_mib:.0f} MiB of weights"


def _mapped_kib(pid: int, path: str) -> int:
    """Resident KiB of ``path``'s mappings in process ``pid`` (its smaps)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) > 5 and fields[5] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def _prepacked_originals(model_path: str) -> int:
    """Bytes of the originals of prepacked weights in a prepacked model's data file (the
    initializers whose external-data entry names a prepacked copy)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        if any(key.startswith("prepacked") for key in entries):
            total += int(entries["length"])
    return total


def test_prepacked_weights_are_written_once_shared_and_removed(slow_mlp):
    """prepack_weights=True: same numbers; the prepacked model files exist once while the engine
    runs, named after its segment, on disk rather than in /dev/shm (there the originals that ORT
    keeps beside each prepacked weight, and reads only while loading, would be memory for the
    engine's life); no worker keeps those originals resident; the files go with the engine."""
    x = slow_mlp.inputs(8)
    with shmengine.Engine(slow_mlp.path, inter_threads=2, intra_threads=1, prepack_weights=True) as engine:
        segment = engine._store.segment.name
        files = [n for n in shm_segments() if n.startswith(segment + "-")]
        assert any(n.endswith(".onnx") for n in files) and any(n.endswith(".data") for n in files)
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(segment + "-")]  # on disk
        (model_name,) = [n for n in files if n.endswith(".onnx")]
        (data_name,) = [n for n in files if n.endswith(".data")]
        data = os.path.realpath(prepacked_file(data_name))
        originals = _prepacked_originals(prepacked_file(model_name))
        assert originals > 1 << 20, "no prepacked weight found: the check below would prove nothing"
        results = engine.run_batch([{"x": x}] * 4)
        packed = os.path.getsize(data) - originals
        for pid in engine.worker_pids:
            resident = _mapped_kib(pid, data) * 1024
            assert resident <= packed + (1 << 20), (resident, originals)
        # and the workers do compute from the file's prepacked copies (mapped, not copied)
        assert max(_mapped_kib(pid, data) * 1024 for pid in engine.worker_pids) >= packed // 2
        for out in results:
            np.testing.assert_allclose(out["y"], slow_mlp.reference(x), rtol=1e-3, atol=1e-3)
        # the original tensor pages were given back: the segment file now holds little
        assert os.stat(f"/dev/shm/{segment}").st_blocks * 512 < 1 << 20
        pids = engine.worker_pids
        os.kill(pids[0], signal.SIGKILL)  # a respawned worker loads the prepacked file too
        assert wait_until(lambda: len(engine.worker_pids) == 2 and engine.worker_pids != pids, timeout=10)
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], slow_mlp.reference(x), rtol=1e-3, atol=1e-3)
    assert not [n for n in shm_segments() if n.startswith(segment)]


def test_prepacked_merged_decoder_names_each_initializer_once():
    """ORT's optimizer turns the Constant nodes of both branches of a merged decoder's If into
    initializers of one name in two subgraphs; ONNX Runtime 1.30 refuses to load that model
    ("initializer name is not unique", seen on the device machine). The file the workers load
    must name each initializer once across all its graphs."""
    import collections

    import onnx

    with shmengine.Translator(ROOT / "models" / "numbers-marian", prepack_weights=True) as translator:
        segment = translator._store.segment.name
        written = [n for n in shm_segments() if n.startswith(segment + "-") and n.endswith("decoder.onnx")]
        assert written, "no prepacked decoder was written (the test would check nothing)"
        model = onnx.load(prepacked_file(written[0]), load_external_data=False)
        names = collections.Counter()

        def walk(graph):
            names.update(t.name for t in graph.initializer)
            for node in graph.node:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        walk(attr.g)

        walk(model.graph)
        assert any(node.op_type == "If" for node in model.graph.node), "not a merged decoder"
        assert [n for n, c in names.items() if c > 1] == []
        out = translator.translate_batch([list("1984") + ["</s>"]])
        assert " ".join(out[0].hypotheses[0]) == "one thousand nine hundred eighty four"
