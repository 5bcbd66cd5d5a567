"""``MpiInfo``: which MPI rank this process is, as CTranslate2 reports it under ``mpirun``.

Read from the launcher's environment (Open MPI, MPICH/Hydra, PMI, Slurm), so asking does not
initialise MPI: a process started without ``mpirun`` is rank 0 of 1.
"""

from __future__ import annotations

import os

__all__ = ["MpiInfo"]

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID")


def _first_int(names, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return default


class MpiInfo:
    """CTranslate2's ``MpiInfo`` (camelCase) with snake_case aliases."""

    @staticmethod
    def getCurRank() -> int:  # noqa: N802 - CTranslate2's name
        return _first_int(_RANK_VARS, 0)

    @staticmethod
    def getNRanks() -> int:  # noqa: N802
        return _first_int(_SIZE_VARS, 1)

    @staticmethod
    def getLocalRank() -> int:  # noqa: N802
        return _first_int(_LOCAL_RANK_VARS, 0)

    get_cur_rank = getCurRank
    get_n_ranks = getNRanks
    get_local_rank = getLocalRank
