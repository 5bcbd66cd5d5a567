"""Tensor parallelism under a real ``mpirun -np 2``: a GPT-2 export split over two ranks gives
the tokens and scores of one plain process (whose model is the export's own full graph)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, wait_until
from test_mpi import mpi_transport_files, mpirun_command

pytestmark = pytest.mark.mpi

GPT2 = ROOT / "models" / "numbers-gpt2"
SCRIPT = ROOT / "tests" / "tp_script.py"


def _run(command, timeout=180):
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "result"
    plain = _run([sys.executable, str(SCRIPT), str(GPT2), "plain", "equal", str(out) + "-plain"])
    assert plain.returncode == 0, plain.stderr
    tp = _run([*mpirun_command(), sys.executable, str(SCRIPT), str(GPT2), "tp", "equal", str(out)])
    assert tp.returncode == 0, tp.stderr
    load = lambda p: json.loads(open(p).read())  # noqa: E731
    return load(f"{out}-plain.0"), load(f"{out}.0"), load(f"{out}.1")


def test_greedy_beam_and_seeded_sampling_tokens_equal_one_process(results):
    plain, rank0, rank1 = results
    for key in ("greedy", "beam", "sample"):
        assert rank0[key] == plain[key], key
        assert rank1[key] == plain[key], key
    assert rank0["tensor_parallel"] and not plain["tensor_parallel"]


def test_scores_within_1e_4_of_one_process(results):
    plain, rank0, rank1 = results
    for key in ("greedy_scores",):
        np.testing.assert_allclose(rank0[key], plain[key], atol=1e-4)
    for mine, ref in zip(rank0["score"], plain["score"]):
        np.testing.assert_allclose(mine, ref, atol=1e-4)
    assert rank0["score"] == rank1["score"]


def test_each_rank_holds_at_most_0_6_of_the_weights(results):
    plain, rank0, rank1 = results
    for rank in (rank0, rank1):
        assert rank["weights_nbytes"] <= 0.6 * plain["weights_nbytes"], (rank["weights_nbytes"], plain["weights_nbytes"])
    assert "Tensor parallel: 2 MPI ranks, this is rank 0/2: heads 0-1" in rank0["info"]
    assert "this is rank 1/2: heads 2-3" in rank1["info"]


def test_mismatched_inputs_fail_on_every_rank(tmp_path):
    out = _run([*mpirun_command(), sys.executable, str(SCRIPT), str(GPT2), "tp", "mismatch", str(tmp_path / "r")])
    assert out.returncode != 0
    assert out.stderr.count("rank(s) 1 called generate with an input different from rank 0's") == 2, out.stderr


def test_an_input_error_on_one_rank_ends_the_job_instead_of_hanging(tmp_path):
    start = time.monotonic()
    out = _run([*mpirun_command(), sys.executable, str(SCRIPT), str(GPT2), "tp", "bad-option", str(tmp_path / "r")], timeout=120)
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
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = job.communicate(timeout=30)
        assert time.monotonic() - killed < 10
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "rank 1" in stderr and "signal 9" in stderr, stderr  # mpirun names the dead rank
    assert wait_until(lambda: not os.path.exists(f"/proc/{rank0}"), timeout=10)
    # Open MPI leaves killed ranks' transport files in /dev/shm; shmengine's watcher removes them
    assert wait_until(lambda: not any(os.path.exists(p) for p in transport), timeout=10), transport


MARIAN = ROOT / "models" / "numbers-marian"
TRANSLATE_SCRIPT = ROOT / "tests" / "tp_translate_script.py"


def test_translator_over_two_ranks_equals_one_process(tmp_path):
    """Marian: encoder and decoder (self- and cross-attention, FFN) split over the ranks."""
    out = tmp_path / "r"
    plain = _run([sys.executable, str(TRANSLATE_SCRIPT), str(MARIAN), "plain", f"{out}-plain"])
    assert plain.returncode == 0, plain.stderr
    tp = _run([*mpirun_command(), sys.executable, str(TRANSLATE_SCRIPT), str(MARIAN), "tp", str(out)])
    assert tp.returncode == 0, tp.stderr
    reference = json.loads(open(f"{out}-plain.0").read())
    assert reference["greedy"][0] == ["one", "thousand", "nine", "hundred", "eighty", "four"]
    for rank in (0, 1):
        mine = json.loads(open(f"{out}.{rank}").read())
        for key in ("greedy", "beam", "sample"):
            assert mine[key] == reference[key], (rank, key)
        for a, b in zip(mine["score"] + mine["beam_scores"], reference["score"] + reference["beam_scores"]):
            np.testing.assert_allclose(a, b, atol=1e-4)
        assert mine["weights_nbytes"] <= 0.6 * reference["weights_nbytes"]
        assert f"this is rank {rank}/2" in mine["info"]
