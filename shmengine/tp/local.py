"""What ``Generator(path, tensor_parallel=True)`` runs on: the worker program in this rank's
process, behind the pool's ``submit`` interface, every call made collectively.

Why in the rank's process, not in a forked worker (measured here, Open MPI 5.0.11 + mpi4py
4.1.2): a child that calls ``MPI_Init`` while its parent rank already initialised MPI kills the
rank (SIGSEGV in the child's init), and the rank's process initialises MPI as soon as the user's
script asks ``MpiInfo.getCurRank()``. So MPI belongs to the rank's process.

``inter_threads=R`` (CTranslate2: "in mode tensor parallel, inter_threads is always supported")
gives each rank R **replicas** of its shard: R threads of the rank's process, each with its own
ORT sessions over the rank's one copy of the shard's weights, its own decoding program and its
own communicator, a ``Dup`` of ``COMM_WORLD`` made at construction in the same order on every
rank. Replica i of every rank form one group; their all-reduces never meet another group's. A
forked worker per replica would have to relay every partial sum through the rank's process
(MPI cannot be initialised in it); threads need no relay: the decoding loop is Python for 1-3%
of a step, ORT and mpi4py's MPI calls release the GIL. They need ``MPI_THREAD_MULTIPLE``
(mpi4py asks for it by default; a clear error says what to do when the MPI gives less).

Batches go to replicas round-robin in submission order: the n-th batch of every rank to replica
``n % R``. Every rank makes the same calls in the same order, so the n-th batch is the same
everywhere and lands on the same group, with no message to agree on it. A submitted batch
cannot be cancelled (it may already run on another rank) and ``close()`` finishes what was
submitted: dropping a batch on one rank would leave the others waiting in its all-reduce.

Every batch is first agreed on within its group: rank 0's payload is broadcast, each rank
compares it with its own (mismatched inputs fail on every rank, naming the ranks) and takes rank
0's sampling seed, so ``set_random_seed`` on rank 0 alone is enough and an unseeded run still
samples the same tokens everywhere. Inputs being equal, every rank validates them alike, so a bad
input fails on every rank before any all-reduce.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import queue
import sys
import threading
import weakref
from concurrent.futures import Future
from pathlib import Path

from shmengine.decode.decoding import DecodingOptions
from shmengine.decode.programs import GeneratorProgram, TranslatorProgram

from .comm import Communicator, TensorParallelError, world
from .gpt2 import load_gpt2_shard
from .llama import load_llama_shard
from .marian import load_marian_shard
from .runner import GraphSignature, Seq2SeqTensorParallelRunner, TensorParallelRunner

__all__ = ["TensorParallelPool", "TensorParallelStore", "open_generator", "attach_generator", "attach_translator"]

logger = logging.getLogger("shmengine")


class _RankContext:
    """The worker context a replica's program sees, in the rank's own process."""

    def __init__(self, graphs: dict[str, Path], runner):
        self.runner = runner
        self.on_event = None
        self.stops: list[int] = []
        self.catalog = dict(graphs)

    def create_session(self, key: str, settings=None):
        return GraphSignature(self.catalog[key], "encoder" if key == "encoder" else "decoder")

    def create_runner(self):
        return self.runner

    def emit(self, payload) -> None:
        self.stops = list(self.on_event(payload) or []) if self.on_event else []

    def wait_for_stops(self) -> list[int]:
        return self.stops


def _without_seed(payload):
    if isinstance(payload, tuple) and len(payload) == 2 and isinstance(payload[1], DecodingOptions):
        return payload[0], dataclasses.replace(payload[1], seed=None)
    return payload


class _Replica:
    """One group member: a program, its context (runner, sessions) and its communicator. With
    more than one replica per rank it runs its batches in a thread of its own."""

    def __init__(self, index: int, program, context: _RankContext, comm: Communicator):
        self.index, self.program, self.context, self.comm = index, program, context, comm
        self.batch = None  # (method, future) while a batch runs: Generator.num_active_batches reads it
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.submitted = self.started = 0  # each written by one thread only: the submitter, the replica
        self.thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return max(0, self.submitted - self.started)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name=f"shmengine-tp-replica-{self.index}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):  # drain(): everything before it is done
                item.set()
                continue
            self.started += 1
            self.run(*item)

    def run(self, method: str, payload, on_event, future: Future) -> None:
        self.batch = (method, future)
        try:
            payload = self._agreed(method, payload) if self.comm.size > 1 else payload
            self.context.on_event = on_event
            result = self.program.run(method, payload)
        except BaseException as exc:  # noqa: BLE001 - the caller's future carries it
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            self.context.on_event = None
            self.batch = None

    def _agreed(self, method: str, payload):
        comm = self.comm.comm
        mine = pickle.dumps((method, _without_seed(payload)), protocol=5)
        theirs = comm.bcast((method, payload) if self.comm.rank == 0 else None, root=0)
        same = pickle.dumps((theirs[0], _without_seed(theirs[1])), protocol=5) == mine
        flags = comm.allgather(same)
        if not all(flags):
            ranks = ", ".join(str(r) for r, ok in enumerate(flags) if not ok)
            raise TensorParallelError(
                f"rank(s) {ranks} called {method} with an input different from rank 0's: under tensor parallelism "
                "every rank must make the same call with the same input"
            )
        return theirs[1]  # rank 0's, its sampling seed included

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            if self.thread is not threading.current_thread():
                self.thread.join()
            self.thread = None


class TensorParallelPool:
    """The pool's interface (``submit`` -> Future) over this rank's replicas.

    With one replica a batch runs in the caller's thread when it is submitted (the Future comes
    back done); with more, in replica ``n % R``'s thread, and the Future completes there."""

    def __init__(self, replicas: list[_Replica], shard_text: str):
        self.replicas = replicas
        self.comm = replicas[0].comm
        self.shard_text = shard_text
        self._closed = False
        self._count = 0
        self._lock = threading.Lock()
        if len(replicas) > 1:
            for replica in replicas:
                replica.start()

    @property
    def size(self) -> int:
        return len(self.replicas)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def _pending(self) -> list:
        """Batches waiting for their replica (``Generator.num_queued_batches`` counts them)."""
        return [None] * sum(r.queued for r in self.replicas)

    @property
    def _workers(self) -> dict:
        return dict(enumerate(self.replicas))

    def worker_pids(self) -> list[int]:
        return []

    def describe(self) -> list[str]:
        where = ("the shard runs in the rank's own process (1 replica)" if self.size == 1 else
                 f"{self.size} replicas of the shard run in threads of the rank's process, replica i of every rank "
                 "one group with its own communicator, batches given to the groups round-robin")
        counts = " + ".join(str(r.comm.calls) for r in self.replicas)  # per replica: each group got work
        return [f"Tensor parallel: {self.comm.size} MPI ranks, this is {self.shard_text}; "
                f"all-reduces so far: {counts}; {where}"]

    def submit(self, method: str, payload, *, ping: bool = False, on_event=None, future: Future | None = None) -> Future:
        """Run the batch on its replica (a collective call: every rank runs it together)."""
        future = Future() if future is None else future
        # Running from here on, so no cancel() can drop it on this rank while another runs it.
        if not future.set_running_or_notify_cancel():
            return future  # cancelled before it was submitted; every rank's caller made the same call
        if self._closed:
            from shmengine.errors import EngineClosedError

            future.set_exception(EngineClosedError("the model is closed; create a new one to run more batches"))
            return future
        if ping:
            future.set_result(payload)
            return future
        if self.size == 1:
            self.replicas[0].run(method, payload, on_event, future)
            return future
        with self._lock:
            replica = self.replicas[self._count % self.size]
            self._count += 1
            replica.submitted += 1
            replica.queue.put((method, payload, on_event, future))
        return future

    def drain(self, *, cancel_queued: bool = False, timeout: float | None = None) -> bool:
        """Wait until every submitted batch is done. ``cancel_queued`` cannot be honoured: a
        batch queued here may already run on another rank, which would wait for this one."""
        if self.size == 1 or self._closed:
            return True  # one replica runs each batch as it is submitted
        if any(r.thread is threading.current_thread() for r in self.replicas):
            raise RuntimeError("close(wait=True) cannot be called from a future's callback; call close() there")
        markers = []
        for replica in self.replicas:  # a marker behind each replica's queue
            markers.append(threading.Event())
            replica.queue.put(markers[-1])
        return all(m.wait(timeout) for m in markers)

    def close(self) -> None:
        """Finish every submitted batch, then stop the replicas' threads."""
        if self._closed:
            return
        self._closed = True
        for replica in self.replicas:
            replica.stop()
        for replica in self.replicas:
            replica.comm.free()


class TensorParallelStore:
    """What a model's ``_store`` answers for a rank: the bytes of its shard."""

    def __init__(self, nbytes: int, model_nbytes: int):
        self.nbytes, self.model_nbytes = nbytes, model_nbytes

    def close(self) -> None:
        pass


def load_shard(model_dir: Path, graph: Path, rank: int, ranks: int):
    """This rank's shard of a decoder-only export, by the config's ``model_type``."""
    import json

    kind = json.loads((model_dir / "config.json").read_text()).get("model_type")
    loaders = {"gpt2": load_gpt2_shard, "llama": load_llama_shard}
    if kind not in loaders:
        from shmengine.errors import ModelLoadError

        raise ModelLoadError(
            f"{model_dir}: model_type {kind!r}; tensor parallelism is built for {', '.join(sorted(loaders))} exports so far"
        )
    return loaders[kind](model_dir, graph, rank, ranks)


@dataclasses.dataclass(frozen=True)
class RankDevice:
    """Where this rank's segments run: ``device`` "cpu" or "cuda", ``index`` the GPU (this
    process sees every GPU of its host), ``runner`` "host" (numpy) or "bound" (IOBinding)."""

    device: str
    index: int
    runner: str

    def bound_runner(self):
        """A new :class:`runners.BoundRunner` for one replica, or None for the host runner."""
        if self.runner != "bound":
            return None
        from shmengine.decode.runners import BoundRunner
        from shmengine.runtime.placement import session_providers
        from shmengine.runtime.target import WorkerTarget

        providers = session_providers(self.device, self.index)
        target = WorkerTarget(device=self.device, device_index=self.index, runner="bound")
        return BoundRunner(target, providers, device_id=self.index if self.device == "cuda" else 0, shared_stream=False)

    def describe(self) -> str:
        if self.device == "cuda":
            return f"cuda:{self.index} (KV caches on the GPU, all-reduces through host memory)"
        return "cpu (bound runner: IOBinding over CPU OrtValues)" if self.runner == "bound" else "cpu"


def rank_device(device: str, device_index, local_rank: int) -> RankDevice:
    """This rank's device. On CUDA each rank of a host takes its own GPU, as CTranslate2's
    (``MpiInfo.getLocalRank()`` is the GPU a rank uses): with ``device_index`` a list, the
    local rank's entry of it (round robin); with an int (default 0), GPU ``(device_index +
    local rank) % GPUs``. Raises ``ValueError`` as ``placement.place_workers`` does (no usable
    GPU, an index that does not exist)."""
    from shmengine.runtime.placement import get_cuda_device_count, place_workers

    placement = place_workers(device, device_index)  # the same checks and messages as without mpirun
    if placement.device != "cuda":
        return RankDevice("cpu", 0, placement.runner)
    if isinstance(device_index, int):
        index = (device_index + local_rank) % get_cuda_device_count()
    else:
        indices = placement.device_indices
        index = indices[local_rank % len(indices)]
    return RankDevice("cuda", index, "bound")


def _this_rank_device(device: str, device_index) -> RankDevice:
    from shmengine.runtime.mpi import MpiInfo

    return rank_device(device, device_index, MpiInfo.getLocalRank())


def open_generator(model_dir: Path, graph: Path, pad_id: int, *, inter_threads: int, intra_threads: int,
                   device: str = "cpu", device_index=0):
    """This rank's pool and store for a decoder-only export, sharded over ``COMM_WORLD``, with
    ``inter_threads`` replicas of the shard, on ``device`` (see :func:`rank_device`)."""
    where = _this_rank_device(device, device_index)  # before anything collective: a bad device fails alike everywhere
    comms = group_communicators(inter_threads)
    shard = load_shard(model_dir, graph, comms[0].rank, comms[0].size)
    plan = _plan(comms, intra_threads, where)
    replicas = []
    for index, comm in enumerate(comms):
        runner = TensorParallelRunner(shard, comm, intra_threads=plan.intra_threads, allow_spinning=plan.allow_spinning,
                                      bound=where.bound_runner())
        context = _RankContext({"model": graph}, runner)
        replicas.append(_Replica(index, GeneratorProgram(context, pad_id=pad_id), context, comm))
    pool = TensorParallelPool(replicas, f"{shard.shard.describe()}, on {where.describe()}")
    logger.info("tensor parallel %s on %s: %.1f of %.1f MiB of weights, %d replica(s) x %d intra threads",
                shard.shard.describe(), where.describe(), shard.nbytes / 2**20, shard.model_nbytes / 2**20,
                len(replicas), plan.intra_threads)
    return pool, TensorParallelStore(shard.nbytes, shard.model_nbytes), plan, where


def group_communicators(inter_threads: int) -> list[Communicator]:
    """One communicator per replica: ``Dup``s of ``COMM_WORLD``, made in the same order on
    every rank (``Dup`` is collective), so replica i of every rank shares the i-th."""
    if isinstance(inter_threads, bool) or not isinstance(inter_threads, int) or inter_threads < 1:
        raise ValueError(f"inter_threads must be an integer >= 1, got {inter_threads!r}")
    comm = world()
    if comm.Get_size() > 1:
        # before anything can fail on one rank only (a model missing on its host): see the hook
        _abort_on_uncaught_exception()
        pin_to_own_cores(comm)
    if inter_threads > 1:
        from mpi4py import MPI

        level = MPI.Query_thread()
        if level < MPI.THREAD_MULTIPLE:
            names = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED", MPI.THREAD_SERIALIZED: "SERIALIZED"}
            raise TensorParallelError(
                f"inter_threads={inter_threads} under tensor parallelism runs {inter_threads} replicas of this rank's "
                "shard in threads, each making its own MPI calls, which needs MPI_THREAD_MULTIPLE; MPI here was "
                f"initialised with MPI_THREAD_{names.get(level, level)}. Leave mpi4py.rc.thread_level at its default "
                "('multiple') and use an MPI library built with thread support, or run inter_threads=1 (one batch at "
                "a time per rank); to run several batches at once over ranks without a shared model, use data "
                "parallelism (mpirun -np N shmengine-run ..., each rank its own full model)"
            )
    return [Communicator(comm.Dup(), owned=True) for _ in range(inter_threads)]


def pin_to_own_cores(comm) -> list[int] | None:
    """Give this rank a block of cores of its own where the launcher left several ranks of this
    host the same cores (``--bind-to none``, ``--oversubscribe``, or Open MPI's binding to a
    package for more than 2 ranks): the ranks of a host that share one affinity mask split it in
    equal blocks, in their order on the host. Returns the cores taken, or None where nothing
    changed (the rank already had cores of its own, more ranks than cores, or
    ``SHMENGINE_TP_PIN=0``).

    Why: tensor-parallel ranks meet at every all-reduce, so any rank the scheduler moves onto a
    core another rank runs on delays all of them; Open MPI binds ranks by default for the same
    reason. On the shared 2-core development VM two runs of ``tools/bench_tp.py`` (GPT-2-124M,
    batch 1, one thread per rank) disagreed (bound 1.23 s against 2.73 s unbound, then 4.53 s
    against 4.13 s: other work had the cores); its ``--device`` mode measures it on 16 quiet
    cores. Collective over ``comm`` (every rank calls it once, at construction)."""
    import os

    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        mask = sorted(os.sched_getaffinity(0))
        masks = node.allgather(mask)
        peers = [r for r, other in enumerate(masks) if other == mask]
        index = peers.index(node.Get_rank())
    finally:
        node.Free()
    share = len(mask) // len(peers)
    if len(peers) == 1 or share == 0 or os.environ.get("SHMENGINE_TP_PIN", "1") == "0":
        return None
    cores = mask[index * share : (index + 1) * share]
    for task in os.listdir("/proc/self/task"):  # every thread, MPI's own included
        try:
            os.sched_setaffinity(int(task), cores)
        except OSError:
            pass
    logger.info("tensor parallel: rank %d takes cores %s of the %d its host's ranks shared", comm.Get_rank(),
                cores, len(mask))
    return cores


def _plan(comms: list[Communicator], intra_threads: int, where: RankDevice | None = None):
    """Intra-op threads per replica: by default this rank's share of the host's cores
    (``runtime.mpi.cores_per_rank``) divided among its replicas, so the ranks of one host never
    oversubscribe it; a warning when the threads asked for do. On a GPU, one by default (its
    CPU nodes are shape ops and copies, as for a CUDA worker)."""
    import os

    from shmengine.runtime.mpi import local_ranks
    from shmengine.runtime.threads import plan_threads

    if where is not None and where.device == "cuda" and intra_threads == 0:
        intra_threads = 1
    plan = plan_threads(len(comms), intra_threads)
    share = (os.cpu_count() or 1) // local_ranks()
    global _binding_warned
    if comms[0].size > 1 and len(os.sched_getaffinity(0)) == 1 and share > 1 and not _binding_warned:
        _binding_warned = True
        logger.warning(
            "this rank is bound to one core by the launcher (Open MPI binds each rank to a core by default for 2 "
            "ranks) while this host has %d cores per rank: run mpirun with --map-by slot:PE=%d (or --bind-to none) "
            "so that each rank's threads can use them", share, share)
    return plan


_binding_warned = False  # the one-core binding warning, once per process


def _abort_on_uncaught_exception() -> None:
    """Make an exception that ends this rank's script end the whole job.

    Without it, a rank whose script raised (a bad argument on that rank only) exits through
    ``MPI_Finalize``, which waits for every rank, while the others wait in the next call's
    collective for it: the job hangs for ever (seen here). ``python -m mpi4py`` does the same
    for a script run through it: print the traceback, then ``MPI_Abort``, which mpirun turns
    into stopping every rank, naming this one."""
    previous = sys.excepthook
    if getattr(previous, "_shmengine_aborts", False):
        return

    def hook(kind, value, traceback):
        previous(kind, value, traceback)
        if issubclass(kind, Exception):
            sys.stderr.flush()
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(1)

    hook._shmengine_aborts = True
    sys.excepthook = hook


def attach_translator(translator, *, inter_threads: int, intra_threads: int, device: str = "cpu",
                      device_index=0, compute_type: str = "default") -> None:
    """As :func:`attach_generator`, for a :class:`shmengine.Translator` over a Marian export."""
    graphs = {key: Path(path) for key, path in translator.model.graphs.items()}
    model_dir = graphs["encoder"].parent
    import json

    kind = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if kind != "marian":
        from shmengine.errors import ModelLoadError

        raise ModelLoadError(f"{model_dir}: model_type {kind!r}; tensor-parallel translation is built for Marian so far")
    where = _this_rank_device(device, device_index)  # before anything collective: a bad device fails alike everywhere
    comms = group_communicators(inter_threads)
    shard = load_marian_shard(model_dir, graphs["encoder"], graphs["decoder"], comms[0].rank, comms[0].size)
    plan = _plan(comms, intra_threads, where)
    replicas = []
    for index, comm in enumerate(comms):
        runner = Seq2SeqTensorParallelRunner(shard, comm, intra_threads=plan.intra_threads,
                                             allow_spinning=plan.allow_spinning, bound=where.bound_runner())
        context = _RankContext(graphs, runner)
        program = TranslatorProgram(context, pad_id=translator.model.pad_id,
                                    decoder_start_id=translator.model.decoder_start_id)
        replicas.append(_Replica(index, program, context, comm))
    pool = TensorParallelPool(replicas, f"{shard.shard.describe()}, on {where.describe()}")
    _attach(translator, pool, TensorParallelStore(shard.nbytes, shard.model_nbytes), plan, where, compute_type)


def attach_generator(generator, *, inter_threads: int, intra_threads: int, device: str = "cpu",
                     device_index=0, compute_type: str = "default") -> None:
    """Give a :class:`shmengine.Generator` (its model directory already open) this rank's shard
    in place of a worker pool: everything above the pool (options, batching, results) is the
    same code as without tensor parallelism."""
    graph = Path(generator.model.graphs["model"])
    pool, store, plan, where = open_generator(graph.parent, graph, generator.model.pad_id, inter_threads=inter_threads,
                                              intra_threads=intra_threads, device=device, device_index=device_index)
    _attach(generator, pool, store, plan, where, compute_type)


def _attach(generator, pool: TensorParallelPool, store: TensorParallelStore, plan, where: RankDevice,
            compute_type: str) -> None:
    if compute_type not in ("default", "auto", "float32"):
        # as CTranslate2 falls back where a type cannot run, and says so
        logger.warning("compute_type=%r is not built under tensor parallelism: the shards run float32", compute_type)
    generator._tensor_parallel = True
    generator._pool, generator._store, generator._weight_holders = pool, store, []
    generator.device, generator.device_index = where.device, [where.index]
    generator.inter_threads, generator.intra_threads = pool.size, plan.intra_threads
    generator.compute_type, generator.transforms = "float32", ()
    generator._finalizer = weakref.finalize(generator, pool.close)
