"""``MpiInfo``: which MPI rank this process is, as CTranslate2 reports it under ``mpirun``.

Under a launcher (its rank variables are set) with mpi4py installed, the answer comes from MPI
itself (``COMM_WORLD``), which initialises MPI in this process the first time, as CTranslate2's
``MpiInfo`` does. Otherwise the launcher's environment is read (Open MPI, MPICH/Hydra, PMI,
Slurm) and MPI is never initialised: a process started without ``mpirun`` is rank 0 of 1, and
asking costs nothing. The local rank (the rank among those on this host) always comes from the
environment: MPI has no non-collective call for it.
"""

from __future__ import annotations

import itertools
import os
import subprocess

__all__ = ["MpiInfo", "launched_by_mpi", "local_ranks", "cores_per_rank", "mpi_module", "remove_transport_files_at_exit"]

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")
# ranks on this host: Open MPI, MPICH/Hydra; Slurm's "2(x3)" per-node list starts with this node's count
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_TASKS_PER_NODE")


def _first_int(names, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return default


def launched_by_mpi() -> bool:
    """Whether a launcher (mpirun, srun, hydra) started this process as one of its ranks."""
    return any(os.environ.get(name) is not None for name in _RANK_VARS)


def local_ranks() -> int:
    """How many ranks of this job run on this host (1 when not launched by mpirun)."""
    if not launched_by_mpi():
        return 1
    for name in _LOCAL_SIZE_VARS:
        digits = "".join(itertools.takewhile(str.isdigit, os.environ.get(name, "").strip()))
        if digits and int(digits) > 0:
            return int(digits)
    return 1


def cores_per_rank(cores: int, machine: int | None = None) -> int:
    """This rank's share of ``cores`` (the cores its affinity mask and cgroup let it use).

    Launchers either bind each rank to its own cores (Open MPI's default for 2 ranks binds each
    to one core; ``--map-by slot:PE=K`` to K) or leave every rank the whole host
    (``--bind-to none``, ``--oversubscribe``). In the second case every rank sees all cores,
    and N ranks each running that many threads would oversubscribe the host N times over
    (measured here: two ranks of 2 threads each on 2 cores). So a rank counts at most
    ``machine // local ranks`` cores, and never more than its own mask: a rank bound to its
    share keeps it, a rank given the whole host takes its fair part of it."""
    ranks = local_ranks()
    if ranks <= 1:
        return cores
    machine = machine if machine is not None else (os.cpu_count() or cores)
    return max(1, min(cores, machine // ranks))


def mpi_module():
    """``mpi4py.MPI``; where shmengine is the first to import it (which initialises MPI) in a
    launched rank, with ``OMPI_MCA_mpi_yield_when_idle=1`` unless the variable is set.

    Open MPI's ranks busy-poll while they wait (in an all-reduce, a barrier) unless it knows the
    host is oversubscribed, and a polling rank takes the CPU from whatever shares its core: the
    other ranks, the rank's own replicas and ORT threads, other work. Measured here: two ranks on
    one core, one computing for 0.9 s while the other waits, took 1.59 / 1.83 s busy-polling and
    0.91 / 0.97 s yielding; GPT-2-124M tensor parallel on the shared 2-core VM, batch 1: 0.45-0.48x
    the busy-polling latency in 2 of 3 runs (1.57x in the other). Where nothing else wants the
    core, yielding returns at once. ``OMPI_MCA_mpi_yield_when_idle=0`` (or ``--mca
    mpi_yield_when_idle 0``) keeps busy-polling; a script that imports ``mpi4py.MPI`` before
    shmengine keeps Open MPI's default."""
    import sys

    if "mpi4py.MPI" not in sys.modules and launched_by_mpi():
        os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    from mpi4py import MPI

    return MPI


def _world():
    """``MPI.COMM_WORLD`` when mpi4py is installed and this process is a launched rank, else None."""
    if not launched_by_mpi():
        return None
    try:
        MPI = mpi_module()
    except ImportError:
        return None
    if MPI.Is_finalized():
        return None
    return MPI.COMM_WORLD


class MpiInfo:
    """CTranslate2's ``MpiInfo`` (camelCase) with snake_case aliases."""

    @staticmethod
    def getCurRank() -> int:  # noqa: N802 - CTranslate2's name
        world = _world()
        return world.Get_rank() if world is not None else _first_int(_RANK_VARS, 0)

    @staticmethod
    def getNRanks() -> int:  # noqa: N802
        world = _world()
        return world.Get_size() if world is not None else _first_int(_SIZE_VARS, 1)

    @staticmethod
    def getLocalRank() -> int:  # noqa: N802
        return _first_int(_LOCAL_RANK_VARS, 0)

    get_cur_rank = getCurRank
    get_n_ranks = getNRanks
    get_local_rank = getLocalRank


_guarded: subprocess.Popen | None = None


def remove_transport_files_at_exit() -> list[str]:
    """Make sure Open MPI's shared-memory transport file of this rank goes when the rank does.

    Open MPI 5's ``btl/sm`` backs each rank's segment with ``/dev/shm/sm_segment.<host>.<uid>.
    <job>.<local rank>`` (16 MiB here) and removes it in ``MPI_Finalize`` only: a rank that is
    SIGKILLed, aborts, or is stopped by mpirun after another rank failed leaves it behind (21 of
    them were left in /dev/shm by the fault tests here). A tiny watcher in its own session
    (``sh``: ``cat`` until the rank's end of a pipe closes, then ``rm -f``) removes this rank's
    file however the rank ends; after a clean ``MPI_Finalize`` it finds nothing to remove.
    Call once MPI is initialised; returns the paths watched.
    """
    global _guarded
    if _guarded is not None:
        return []
    suffix = f".{MpiInfo.getLocalRank()}"
    try:
        with open("/proc/self/maps") as maps:
            # sm_segment: Open MPI 5's btl/sm; vader_segment: 4.x's btl/vader (same naming)
            mapped = {line.split()[-1] for line in maps if "/sm_segment." in line or "/vader_segment." in line}
    except OSError:
        return []
    own = sorted(p for p in mapped if p.endswith(suffix) and p.startswith("/dev/shm/"))
    if not own:
        return []
    try:
        watcher = subprocess.Popen(
            ["sh", "-c", 'cat > /dev/null; rm -f -- "$@"', "sh", *own],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    except OSError:
        return []
    # the pipe's write end stays open in this process only (children get close_fds) until it ends
    _guarded = watcher
    return own
