"""How many threads each worker runs, and the report of it all (:func:`parallel_info`).

CTranslate2's model: ``inter_threads`` workers, each running ``intra_threads`` threads for one
batch. Here a worker is a process; ``intra_threads=0`` means "the cores this process may use,
divided among the workers", so the default never oversubscribes. The cores counted are the
ones the scheduler lets us use (affinity mask, cgroup CPU quota), not the machine's.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

__all__ = [
    "ThreadPlan",
    "plan_threads",
    "usable_cores",
    "physical_cores",
    "thread_environment",
    "parallel_info",
    "get_cuda_device_count",
    "THREAD_ENV_VARS",
]

logger = logging.getLogger("shmengine")

# Thread-count variables of the libraries a worker may load (OpenMP, MKL, OpenBLAS, numexpr).
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _cgroup_cpu_limit() -> float | None:
    """The cgroup v2 CPU quota in cores (``cpu.max``), or None when unlimited or unknown."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup CPU quota; under
    mpirun, this rank's share of them (``mpi.cores_per_rank``: ranks left the whole host
    divide it among the host's ranks)."""
    from shmengine.runtime.mpi import cores_per_rank

    cores = len(os.sched_getaffinity(0))
    machine = os.cpu_count() or cores
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, int(limit)))
        machine = min(machine, max(1, int(limit)))
    return cores_per_rank(cores, machine)


def physical_cores() -> int | None:
    """Physical cores of the machine (hyper-threads counted once), from sysfs topology."""
    seen = set()
    base = "/sys/devices/system/cpu"
    try:
        for entry in os.listdir(base):
            if entry.startswith("cpu") and entry[3:].isdigit():
                try:
                    with open(f"{base}/{entry}/topology/core_cpus_list") as f:
                        seen.add(f.read().strip())
                except OSError:
                    with open(f"{base}/{entry}/topology/thread_siblings_list") as f:
                        seen.add(f.read().strip())
    except OSError:
        return None
    return len(seen) or None


@dataclass(frozen=True)
class ThreadPlan:
    """Threads per worker, decided once in the supervisor."""

    workers: int
    intra_threads: int
    cores: int
    allow_spinning: bool

    @property
    def oversubscribed(self) -> bool:
        return self.workers * self.intra_threads > self.cores


def plan_threads(workers: int, intra_threads: int, *, cores: int | None = None, warn: bool = True) -> ThreadPlan:
    """Choose intra-op threads per worker; warn when the split asks for more threads than cores."""
    cores = cores or usable_cores()
    if intra_threads < 0:
        raise ValueError(f"intra_threads must be >= 0 (0 = automatic), got {intra_threads}")
    if intra_threads == 0:
        intra_threads = max(1, cores // workers)
    plan = ThreadPlan(
        workers=workers,
        intra_threads=intra_threads,
        cores=cores,
        # Spinning threads burn a core while waiting for work: right for one worker that owns the
        # machine, wrong when workers share cores (they would steal each other's time slices).
        allow_spinning=workers == 1 and intra_threads <= cores,
    )
    if warn and plan.oversubscribed:
        fitting = max(1, cores // workers)
        logger.warning(
            "%d workers x %d intra threads = %d threads on %d usable cores: they will fight for "
            "the CPU. Set intra_threads=%d (or 0 for automatic), or fewer inter_threads.",
            workers,
            intra_threads,
            workers * intra_threads,
            cores,
            fitting,
        )
    return plan


def thread_environment(intra_threads: int) -> dict[str, str]:
    """Environment a worker sets so that every threaded library agrees with ORT's intra threads."""
    env = {name: str(intra_threads) for name in THREAD_ENV_VARS}
    # numpy's BLAS is loaded (single-threaded) before the fork; the decoding loop's numpy work
    # is element-wise, which BLAS threads would not speed up.
    env["OPENBLAS_NUM_THREADS"] = "1"
    return env


@functools.lru_cache(maxsize=1)
def get_cuda_device_count() -> int:
    """Number of CUDA devices visible to this process (honours ``CUDA_VISIBLE_DEVICES``).

    Asked in a short-lived child process: initialising CUDA in the supervisor would make every
    later fork unsafe, and the driver API is the only count that honours the visibility mask.
    """
    probe = (
        "import ctypes,sys\n"
        "try:\n"
        "    cuda = ctypes.CDLL('libcuda.so.1')\n"
        "except OSError:\n"
        "    print(0); sys.exit()\n"
        "n = ctypes.c_int(0)\n"
        "ok = cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(n)) == 0\n"
        "print(n.value if ok else 0)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        return int(out.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def _mpi_line() -> str:
    from shmengine.runtime.mpi import MpiInfo, launched_by_mpi

    try:
        import mpi4py

        library = f"mpi4py {mpi4py.__version__}"
    except ImportError:
        library = "mpi4py not installed"
    if not launched_by_mpi():
        return f"MPI: not launched by mpirun (rank 0 of 1); {library}"
    return (
        f"MPI: rank {MpiInfo.getCurRank()} of {MpiInfo.getNRanks()} (local rank {MpiInfo.getLocalRank()}); {library}"
    )


def _numexpr_line() -> str:
    """numexpr is no dependency (numpy is faster on the decoding loop: tools/bench_numexpr.py);
    its version is reported when it is installed, since a worker program may use it."""
    try:
        import numexpr
    except ImportError:
        return "numexpr: not installed (shmengine does not use it)"
    return f"numexpr {numexpr.__version__}: {numexpr.detect_number_of_cores()} cores detected (not used by shmengine)"


def parallel_info(engine=None) -> str:
    """A readable report of the parallel settings, like ``torch.__config__.parallel_info()``.

    With an engine (any shmengine model object), its workers' effective settings are listed too:
    each worker reports what it actually runs with, not what was asked.
    """
    import numpy
    import onnxruntime

    from shmengine import __version__

    cores = usable_cores()
    lines = [
        f"shmengine {__version__}, Python {sys.version.split()[0]}, numpy {numpy.__version__}",
        # get_device() names the wheel's build, not a device that is present ("GPU" from
        # onnxruntime-gpu on a machine with no GPU): say so, the CUDA line below counts devices
        f"ONNX Runtime {onnxruntime.__version__} ({onnxruntime.get_device()} build)",
        f"  available providers: {', '.join(onnxruntime.get_available_providers())}",
        f"CPU: {os.cpu_count()} logical, {physical_cores() or '?'} physical; "
        f"{len(os.sched_getaffinity(0))} in this process's affinity mask"
        + (f", cgroup quota {_cgroup_cpu_limit():g} cores" if _cgroup_cpu_limit() else ""),
        f"  usable cores: {cores}",
        f"CUDA devices: {get_cuda_device_count()}",
        _mpi_line(),
        _numexpr_line(),
        "Environment:",
    ]
    for name in (*THREAD_ENV_VARS, "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY", "CUDA_VISIBLE_DEVICES"):
        lines.append(f"  {name} = {os.environ.get(name, '(not set)')}")
    if engine is None:
        default = plan_threads(1, 0, cores=cores, warn=False)
        lines.append(f"Default split: inter_threads=1 x intra_threads={default.intra_threads}")
    else:
        lines.extend(engine._pool.describe())
    return "\n".join(lines)
