"""Tensor parallelism under a real ``mpirun -np 2``: a GPT-2 export split over two ranks gives
the tokens and scores of one plain process (whose model is the export's own full graph), also
with two replicas of the shard per rank (``inter_threads=2``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from conftest import ROOT, wait_until
from tp_common import assert_ranks_equal_plain, kill_rank, mpi_transport_files, mpirun_command, run_plain_and_tp

pytestmark = pytest.mark.mpi

GPT2 = ROOT / "models" / "numbers-gpt2"
MARIAN = ROOT / "models" / "numbers-marian"
SCRIPT = ROOT / "tests" / "tp_script.py"
TRANSLATE_SCRIPT = ROOT / "tests" / "tp_translate_script.py"


def _run(command, timeout=180, env=None):
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_plain_and_tp(SCRIPT, GPT2, tmp_path_factory.mktemp("tp") / "result", "equal")


def test_greedy_beam_seeded_sampling_and_scores_equal_one_process(results):
    plain, ranks = results
    assert_ranks_equal_plain(plain, ranks, scores=("score", "greedy_scores"))
    assert ranks[0]["score"] == ranks[1]["score"]


def test_each_rank_holds_its_own_heads(results):
    _, (rank0, rank1) = results
    assert "Tensor parallel: 2 MPI ranks, this is rank 0/2: heads 0-1" in rank0["info"]
    assert "this is rank 1/2: heads 2-3" in rank1["info"]


def _replica_calls(info: str) -> list[int]:
    found = re.search(r"all-reduces so far: ([\d +]+);", info)
    assert found, info
    return [int(x) for x in found.group(1).split("+")]


def test_two_replicas_per_rank_share_the_batches_and_equal_one_process(tmp_path):
    """inter_threads=2: each rank runs two replicas of its shard, replica i of both ranks one
    group; max_batch_size=1 cuts every call into batches that the two groups share. The
    reference is one plain process with one worker and the same batches (each has its seed)."""
    plain, ranks = run_plain_and_tp(SCRIPT, GPT2, tmp_path / "r", "equal",
                                    env={"TP_SCRIPT_MAX_BATCH": "1", "TP_SCRIPT_INTER": "2"},
                                    plain_env={"TP_SCRIPT_INTER": "1"})
    assert plain["inter_threads"] == 1
    assert_ranks_equal_plain(plain, ranks, scores=("score", "greedy_scores"))
    for rank in ranks:
        assert rank["inter_threads"] == 2
        calls = _replica_calls(rank["info"])
        assert len(calls) == 2 and min(calls) > 0, calls  # both groups ran batches
        assert "2 replicas of the shard run in threads" in rank["info"]


def test_replicas_without_thread_multiple_are_refused_naming_why(tmp_path):
    code = ("import shmengine; "
            f"shmengine.Generator({str(GPT2)!r}, tensor_parallel=True, inter_threads=2)")
    out = _run([*mpirun_command(), "-x", "MPI4PY_RC_THREAD_LEVEL=serialized", sys.executable, "-c", code],
               timeout=120)
    assert out.returncode != 0
    assert "needs MPI_THREAD_MULTIPLE; MPI here was initialised with MPI_THREAD_SERIALIZED" in out.stderr, out.stderr
    assert "inter_threads=1" in out.stderr and "data parallelism" in out.stderr


def test_mismatched_inputs_fail_on_every_rank(tmp_path):
    out = _run([*mpirun_command(), sys.executable, str(SCRIPT), str(GPT2), "tp", "mismatch", str(tmp_path / "r")])
    assert out.returncode != 0
    assert out.stderr.count("rank(s) 1 called generate with an input different from rank 0's") == 2, out.stderr


def test_an_input_error_on_one_rank_ends_the_job_instead_of_hanging(tmp_path):
    start = time.monotonic()
    out = _run([*mpirun_command(), sys.executable, str(SCRIPT), str(GPT2), "tp", "bad-option", str(tmp_path / "r")],
               timeout=120)
    assert out.returncode != 0
    assert "beam_size must be" in out.stderr and "MPI_ABORT was invoked on rank 1" in out.stderr, out.stderr
    assert time.monotonic() - start < 60


def test_a_rank_killed_mid_step_stops_the_other_within_10_s(tmp_path):
    out = tmp_path / "r"
    job = subprocess.Popen([*mpirun_command(), sys.executable, str(SCRIPT), str(GPT2), "tp", "loop", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert wait_until(lambda: os.path.exists(f"{out}.progress.0"), timeout=90), "the ranks never generated"
        rank0 = int(open(f"{out}.pid.0").read())
        rank1 = int(open(f"{out}.pid.1").read())
        transport = mpi_transport_files([rank0, rank1])
        assert transport, "the ranks map no Open MPI transport file (the test would check nothing)"
        stderr = kill_rank(job, rank1)
    finally:
        if job.poll() is None:
            job.kill()
    assert "rank 1" in stderr and "signal 9" in stderr, stderr  # mpirun names the dead rank
    assert wait_until(lambda: not os.path.exists(f"/proc/{rank0}"), timeout=10)
    # Open MPI leaves killed ranks' transport files in /dev/shm; shmengine's watcher removes them
    assert wait_until(lambda: not any(os.path.exists(p) for p in transport), timeout=10), transport


def test_translator_with_two_replicas_per_rank_equals_one_process(tmp_path):
    """Marian: encoder and decoder (self- and cross-attention, FFN) split over the ranks, two
    replicas per rank sharing the batches (the parity suite runs one replica on a reference
    export)."""
    plain, ranks = run_plain_and_tp(TRANSLATE_SCRIPT, MARIAN, tmp_path / "r",
                                    env={"TP_SCRIPT_MAX_BATCH": "2", "TP_SCRIPT_INTER": "2"},
                                    plain_env={"TP_SCRIPT_INTER": "1"})
    assert plain["greedy"][0] == ["one", "thousand", "nine", "hundred", "eighty", "four"]
    assert_ranks_equal_plain(plain, ranks, scores=("score", "beam_scores"))
    for rank in ranks:
        assert min(_replica_calls(rank["info"])) > 0


def _cuda_available() -> bool:
    try:
        import onnxruntime

        from shmengine.runtime.threads import get_cuda_device_count
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers() and get_cuda_device_count() > 0


# (script, model, the scores it reports): the two models the GPU path's tests run
_BOTH = [(SCRIPT, GPT2, ("score", "greedy_scores")), (TRANSLATE_SCRIPT, MARIAN, ("score", "beam_scores"))]


@pytest.mark.parametrize("script,model,scores", _BOTH, ids=["gpt2", "marian"])
def test_segments_through_the_bound_runner_equal_one_process(tmp_path, script, model, scores):
    """SHMENGINE_RUNNER=bound: each rank runs its segments through IOBinding, the KV caches kept
    as OrtValues between steps and reordered by the runner's Gather graph (what a GPU rank runs,
    here over CPU OrtValues); the tokens and scores are still one plain process's."""
    plain, ranks = run_plain_and_tp(script, model, tmp_path / "r", *(("equal",) if script == SCRIPT else ()),
                                    env={"SHMENGINE_RUNNER": "bound"})
    assert_ranks_equal_plain(plain, ranks, scores=scores)
    for rank in ranks:
        assert "on cpu (bound runner" in rank["info"], rank["info"]


@pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu and a CUDA device")
@pytest.mark.parametrize("script,model,scores", _BOTH, ids=["gpt2", "marian"])
def test_ranks_on_a_gpu_equal_one_process_on_it(tmp_path, script, model, scores):
    """device="cuda": every rank's segments on its GPU (the ranks of a one-GPU host share it),
    against one plain process on that GPU. Scores within 1e-2: ORT's CUDA float32 MatMuls run in
    TF32, and the ranks sum their partial products in another order."""
    plain, ranks = run_plain_and_tp(script, model, tmp_path / "r", *(("equal",) if script == SCRIPT else ()),
                                    env={"TP_SCRIPT_DEVICE": "cuda"})
    assert_ranks_equal_plain(plain, ranks, scores=scores, atol=1e-2)
    for rank in ranks:
        assert "on cuda:" in rank["info"], rank["info"]


@pytest.mark.skipif(_cuda_available(), reason="checks the refusal on a machine without a GPU")
def test_tensor_parallel_on_cuda_without_a_gpu_is_refused_not_run_on_the_cpu():
    for cls, model in (("Generator", GPT2), ("Translator", MARIAN)):
        code = f"import shmengine; shmengine.{cls}({str(model)!r}, tensor_parallel=True, device='cuda')"
        out = _run([sys.executable, "-c", code], timeout=120)
        assert out.returncode != 0
        assert "ValueError: device='cuda' was asked for, but no CUDA device is usable here" in out.stderr, out.stderr


def test_a_compute_type_not_built_under_tensor_parallelism_is_said_not_silently_dropped():
    """Also, in one process (no mpirun: Open MPI's singleton), the transport file it maps in
    /dev/shm is gone after it exits (its MPI_Finalize leaves it; shmengine's watcher removes it)."""
    code = ("import logging, shmengine; logging.basicConfig(); "
            f"g = shmengine.Generator({str(GPT2)!r}, tensor_parallel=True, compute_type='int8'); "
            "print('runs', g.compute_type); "
            "print('maps', *sorted({l.split()[-1] for l in open('/proc/self/maps') if '_segment.' in l})); g.close()")
    out = _run([sys.executable, "-c", code], timeout=120)
    assert out.returncode == 0, out.stderr
    assert "runs float32" in out.stdout
    assert "compute_type='int8' is not built under tensor parallelism: the shards run float32" in out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("maps")]
    transport = line.split()[1:]
    assert wait_until(lambda: not any(os.path.exists(p) for p in transport), timeout=5), transport


def test_ranks_left_the_same_cores_take_a_block_each_and_yield_while_waiting():
    """mpirun --oversubscribe binds nothing: both ranks see every core. Under tensor parallelism
    they split them (each all-reduce waits for the slowest rank, so two ranks the scheduler puts
    on one core delay each other), and MPI is initialised to yield the core while waiting;
    SHMENGINE_TP_PIN=0 and a user's own OMPI_MCA_mpi_yield_when_idle=0 are kept."""
    code = ("import os, shmengine; before = sorted(os.sched_getaffinity(0)); "
            f"g = shmengine.Generator({str(GPT2)!r}, tensor_parallel=True); "
            "print(before, sorted(os.sched_getaffinity(0)), g.intra_threads, "
            "repr(os.environ.get('OMPI_MCA_mpi_yield_when_idle')), sep=';')")
    for mine in (False, True):
        settings = ["-x", "SHMENGINE_TP_PIN=0", "-x", "OMPI_MCA_mpi_yield_when_idle=0"] if mine else []
        out = _run([*mpirun_command(), *settings, sys.executable, "-c", code], timeout=120)
        assert out.returncode == 0, out.stderr
        rows = [[eval(x) for x in line.split(";")] for line in out.stdout.splitlines()]  # noqa: S307 - our own print
        assert len(rows) == 2
        (before0, after0, intra0, yield0), (before1, after1, intra1, yield1) = rows
        assert before0 == before1, "the launcher bound the ranks: the test would check nothing"
        if mine:
            assert after0 == before0 and after1 == before1
            assert yield0 == yield1 == "0"
            continue
        share = len(before0) // 2
        assert len(after0) == len(after1) == share and not set(after0) & set(after1), rows
        assert intra0 == intra1 == share  # the default threads: the rank's own cores
        assert yield0 == yield1 == "1"


@pytest.mark.parametrize("vocab,ranks", [(50257, 2), (50257, 4), (58101, 3), (8, 8)])
def test_vocabulary_blocks_cover_the_vocabulary_once(vocab, ranks):
    """The LM head and the token embedding are split by vocabulary with no divisibility asked:
    the ranks' blocks, in rank order, are the whole vocabulary once, as even as the count
    allows; an untied head's block is the matching columns; the ranks' embedding lookups sum
    to numpy's lookup of the whole table, each rank holding only its rows."""
    import numpy as np

    from shmengine.tp.sharding import EmbeddingBlock, head_block, vocab_blocks

    sizes = vocab_blocks(vocab, ranks)
    assert sum(sizes) == vocab and max(sizes) - min(sizes) <= 1
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, 3)).astype(np.float32)
    untied = [head_block(table.T, r, ranks)[0] for r in range(ranks)]
    np.testing.assert_array_equal(np.concatenate(untied, axis=1), table.T)
    assert all(b.flags.c_contiguous for b in untied)
    blocks = [EmbeddingBlock(table, r, ranks) for r in range(ranks)]
    np.testing.assert_array_equal(np.concatenate([b.rows for b in blocks]), table)
    assert [len(b.rows) for b in blocks] == list(sizes)
    assert not any(np.shares_memory(b.rows, table) for b in blocks)  # the whole table can be freed
    ids = np.concatenate([[0, vocab - 1], rng.integers(0, vocab, size=40)]).reshape(2, 21)
    np.testing.assert_allclose(sum(b.lookup(ids) for b in blocks), table[ids], rtol=0, atol=0)
    negative = np.array([[-1, -vocab]])  # from the end, as ONNX's Gather takes them
    np.testing.assert_array_equal(sum(b.lookup(negative) for b in blocks), table[negative])
    for bad in (vocab, -vocab - 1):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            blocks[0].lookup(np.array([[bad]]))
