"""shmengine-run as a user runs it: a real subprocess on the bundled default model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

from models.builders import mlp_model, mlp_reference
from shmengine.threads import usable_cores
from shmengine.tuning import candidate_splits


def shmengine_run(*args, timeout=240, cpus=None):
    """Run the launcher; ``cpus`` (a set of CPU numbers) is the affinity it runs with."""
    return subprocess.run(
        [sys.executable, "-m", "shmengine.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )


def test_run_on_the_default_model_matches_numpy(tmp_path):
    _, params = mlp_model([256, 512, 512, 256], seed=1984)  # how models/default was built
    x = np.random.default_rng(5).standard_normal((300, 256)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    out = shmengine_run("run", "--inter-threads", "2", "--batch-size", "64",
                        "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    assert out.returncode == 0, out.stderr
    assert "300 examples in 5 batches" in out.stderr and "examples/s" in out.stderr
    with np.load(tmp_path / "out.npz") as result:
        np.testing.assert_allclose(result["y"], mlp_reference(x.astype(np.float64), params), rtol=1e-4, atol=1e-4)


def test_info_reports_each_worker():
    out = shmengine_run("info", "--inter-threads", "2", "--intra-threads", "1")
    assert out.returncode == 0, out.stderr
    assert "ONNX Runtime" in out.stdout and "usable cores" in out.stdout
    assert out.stdout.count("intra_op_num_threads=1") == 2
    assert "worker 0: pid" in out.stdout and "worker 1: pid" in out.stdout


def test_tune_sweeps_splits_writes_a_plot_and_names_the_best(tmp_path):
    """The sweep covers every split that fits the cores the launcher may use. It runs on two CPUs
    of this machine (three splits), so that it takes the same time on 2 cores as on 128 (645)."""
    plot = tmp_path / "tune.png"
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    # what usable_cores() reports in the child: its affinity, capped by this cgroup's CPU quota
    cores = min(len(cpus), usable_cores())
    out = shmengine_run("tune", "--batch-size", "4", "--batches", "20", "--latency-runs", "5", "--plot", str(plot), cpus=cpus)
    assert out.returncode == 0, out.stderr
    assert "best for throughput: inter_threads=" in out.stdout
    assert "best for latency:    inter_threads=" in out.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in out.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert sorted((int(r.split()[0]), int(r.split()[1])) for r in rows) == sorted(candidate_splits(cores))


def test_bad_model_path_is_a_clear_error_with_exit_code_2(tmp_path):
    out = shmengine_run("run", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_candidate_splits_are_every_split_that_fits():
    assert candidate_splits(2) == [(1, 1), (1, 2), (2, 1)]
    assert all(i * j <= 8 for i, j in candidate_splits(8)) and (8, 1) in candidate_splits(8) and (1, 8) in candidate_splits(8)
