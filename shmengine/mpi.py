"""``MpiInfo``: which MPI rank this process is, as CTranslate2 reports it under ``mpirun``.

Under a launcher (its rank variables are set) with mpi4py installed, the answer comes from MPI
itself (``COMM_WORLD``), which initialises MPI in this process the first time, as CTranslate2's
``MpiInfo`` does. Otherwise the launcher's environment is read (Open MPI, MPICH/Hydra, PMI,
Slurm) and MPI is never initialised: a process started without ``mpirun`` is rank 0 of 1, and
asking costs nothing. The local rank (the rank among those on this host) always comes from the
environment: MPI has no non-collective call for it.
"""

from __future__ import annotations

import os

__all__ = ["MpiInfo", "launched_by_mpi"]

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def _first_int(names, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return default


def launched_by_mpi() -> bool:
    """Whether a launcher (mpirun, srun, hydra) started this process as one of its ranks."""
    return any(os.environ.get(name) is not None for name in _RANK_VARS)


def _world():
    """``MPI.COMM_WORLD`` when mpi4py is installed and this process is a launched rank, else None."""
    if not launched_by_mpi():
        return None
    try:
        from mpi4py import MPI
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
