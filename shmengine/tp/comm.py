"""The sum over ranks between two segments (and the LM head's logits gathered), with mpi4py, and what
a failed rank looks like."""

from __future__ import annotations

import time

import numpy as np

from shmengine.errors import ShmEngineError

__all__ = ["Communicator", "TensorParallelError", "world"]


class TensorParallelError(ShmEngineError):
    """The ranks of a tensor-parallel model disagree or one of them failed."""


def world():
    """``MPI.COMM_WORLD``; a clear error when mpi4py is missing."""
    from shmengine.runtime.mpi import mpi_module

    try:
        MPI = mpi_module()
    except ImportError as exc:
        raise TensorParallelError(
            "tensor_parallel=True needs mpi4py (pip install 'shmengine[mpi]') and a launch by mpirun"
        ) from exc
    return MPI.COMM_WORLD


class Communicator:
    """All-reduces of float32 activations over the ranks of one tensor-parallel group."""

    def __init__(self, comm=None, *, owned: bool = False):
        self.comm = comm if comm is not None else world()
        self.owned = owned  # a Dup made for this group: free() releases it
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.calls = 0
        self.seconds = 0.0  # spent in all-reduces, waiting for the other ranks included (tools/bench_tp.py)
        # a single process too: Open MPI 5 then runs as a singleton, whose MPI_Finalize leaves
        # its 16 MiB /dev/shm transport file behind (seen here, tensor_parallel=True without mpirun)
        from shmengine.runtime.mpi import remove_transport_files_at_exit

        remove_transport_files_at_exit()

    def free(self) -> None:
        """Release an owned communicator (collective in principle: every rank closes its model
        at the same point of its script). Nothing once MPI has been finalized."""
        if not self.owned or self.comm is None:
            return
        from mpi4py import MPI

        if not MPI.Is_finalized():
            self.comm.Free()
        self.comm = None

    def sum(self, partial: np.ndarray) -> np.ndarray:
        """The elementwise sum of every rank's ``partial`` (same shape everywhere), in place."""
        self.calls += 1
        if self.size == 1:
            return partial
        from mpi4py import MPI

        buffer = np.ascontiguousarray(partial)
        start = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        self.seconds += time.perf_counter() - start
        return buffer

    def gather_columns(self, block: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
        """Every rank's ``block`` [rows, sizes[rank]] side by side, in rank order: [rows, sum(sizes)]
        on every rank (the logits of an LM head split by vocabulary)."""
        self.calls += 1
        if self.size == 1:
            return block
        from mpi4py import MPI

        block = np.ascontiguousarray(block, dtype=np.float32)
        rows = block.shape[0]
        counts = [rows * size for size in sizes]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        received = np.empty(sum(counts), np.float32)
        start = time.perf_counter()
        self.comm.Allgatherv(block, [received, counts, offsets, MPI.FLOAT])
        self.seconds += time.perf_counter() - start
        return np.concatenate(
            [received[o : o + c].reshape(rows, size) for o, c, size in zip(offsets, counts, sizes)], axis=1
        )

    def agree(self, value, what: str) -> None:
        """Raise on every rank when the ranks were not given the same ``value`` (a collective
        call must get the same input everywhere)."""
        if self.size == 1:
            return
        values = self.comm.allgather(value)
        different = [r for r, v in enumerate(values) if v != values[0]]
        if different:
            raise TensorParallelError(
                f"rank(s) {', '.join(map(str, different))} were given a different {what} than rank 0: every rank must "
                "make the same call with the same input under tensor parallelism"
            )
