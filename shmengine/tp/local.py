"""What ``Generator(path, tensor_parallel=True)`` runs on: the worker program in this rank's
process, behind the pool's ``submit`` interface, every call made collectively.

Why in the rank's process, not in a forked worker (measured here, Open MPI 5.0.11 + mpi4py
4.1.2): a child that calls ``MPI_Init`` while its parent rank already initialised MPI kills the
rank (SIGSEGV in the child's init), and the rank's process initialises MPI as soon as the user's
script asks ``MpiInfo.getCurRank()``. So MPI belongs to the rank's process; workers of a rank
(``inter_threads > 1``) would need a relay of their partial sums through it, which is not built
yet: under tensor parallelism ``inter_threads`` must be 1 here.

Every submitted batch is first agreed on: rank 0's payload is broadcast, each rank compares it
with its own (mismatched inputs fail on every rank, naming the ranks) and takes rank 0's sampling
seed, so ``set_random_seed`` on rank 0 alone is enough and an unseeded run still samples the same
tokens everywhere. Inputs being equal, every rank validates them alike, so a bad input fails on
every rank before any all-reduce.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import sys
import weakref
from concurrent.futures import Future
from pathlib import Path

from shmengine.decode.decoding import DecodingOptions
from shmengine.decode.programs import GeneratorProgram, TranslatorProgram

from .comm import Communicator, TensorParallelError
from .gpt2 import load_gpt2_shard
from .llama import load_llama_shard
from .marian import load_marian_shard
from .runner import GraphSignature, Seq2SeqTensorParallelRunner, TensorParallelRunner

__all__ = ["TensorParallelPool", "TensorParallelStore", "open_generator", "attach_generator", "attach_translator"]

logger = logging.getLogger("shmengine")


class _RankContext:
    """The worker context a program sees, in the rank's own process."""

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


class TensorParallelPool:
    """The pool's interface (``submit`` -> Future) over one program run in this process."""

    def __init__(self, program, context: _RankContext, comm: Communicator, shard_text: str):
        self.program, self.context, self.comm = program, context, comm
        self.shard_text = shard_text
        self._closed = False
        self._pending: list = []  # never anything waits: a call runs when it is submitted
        self._workers: dict = {}

    size = 1

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        return []

    def describe(self) -> list[str]:
        return [f"Tensor parallel: {self.comm.size} MPI ranks, this is {self.shard_text}; "
                f"{self.comm.calls} all-reduces so far; the shard runs in the rank's own process (1 worker)"]

    def _agreed(self, method: str, payload):
        mine = pickle.dumps((method, _without_seed(payload)), protocol=5)
        theirs = self.comm.comm.bcast((method, payload) if self.comm.rank == 0 else None, root=0)
        same = pickle.dumps((theirs[0], _without_seed(theirs[1])), protocol=5) == mine
        flags = self.comm.comm.allgather(same)
        if not all(flags):
            ranks = ", ".join(str(r) for r, ok in enumerate(flags) if not ok)
            raise TensorParallelError(
                f"rank(s) {ranks} called {method} with an input different from rank 0's: under tensor parallelism "
                "every rank must make the same call with the same input"
            )
        return theirs[1]  # rank 0's, its sampling seed included

    def submit(self, method: str, payload, *, ping: bool = False, on_event=None, future: Future | None = None) -> Future:
        """Run the batch now, in this thread (a collective call: every rank runs it together);
        the Future comes back done."""
        future = Future() if future is None else future
        if not future.set_running_or_notify_cancel():
            return future  # cancelled before it ran; every rank's caller made the same call
        if self._closed:
            from shmengine.errors import EngineClosedError

            future.set_exception(EngineClosedError("the model is closed; create a new one to run more batches"))
            return future
        try:
            if ping:
                future.set_result(payload)
                return future
            payload = self._agreed(method, payload) if self.comm.size > 1 else payload
            self.context.on_event = on_event
            future.set_result(self.program.run(method, payload))
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            self.context.on_event = None
        return future

    def close(self) -> None:
        self._closed = True


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


def open_generator(model_dir: Path, graph: Path, pad_id: int, *, inter_threads: int, intra_threads: int):
    """This rank's pool and store for a decoder-only export, sharded over ``COMM_WORLD``."""
    _check_one_worker(inter_threads)
    comm = Communicator()
    shard = load_shard(model_dir, graph, comm.rank, comm.size)
    runner = TensorParallelRunner(shard, comm, intra_threads=max(1, intra_threads))
    context = _RankContext({"model": graph}, runner)
    program = GeneratorProgram(context, pad_id=pad_id)
    pool = TensorParallelPool(program, context, comm, shard.shard.describe())
    logger.info("tensor parallel %s: %.1f of %.1f MiB of weights", shard.shard.describe(), shard.nbytes / 2**20,
                shard.model_nbytes / 2**20)
    return pool, TensorParallelStore(shard.nbytes, shard.model_nbytes)


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


def _check_one_worker(inter_threads: int) -> None:
    if inter_threads != 1:
        raise NotImplementedError(
            "tensor_parallel=True runs one worker per rank for now (inter_threads=1): the relay that lets several "
            "workers of a rank all-reduce through it is not built yet"
        )


def attach_translator(translator, *, inter_threads: int, intra_threads: int) -> None:
    """As :func:`attach_generator`, for a :class:`shmengine.Translator` over a Marian export."""
    _check_one_worker(inter_threads)
    graphs = {key: Path(path) for key, path in translator.model.graphs.items()}
    model_dir = graphs["encoder"].parent
    import json

    kind = json.loads((model_dir / "config.json").read_text()).get("model_type")
    if kind != "marian":
        from shmengine.errors import ModelLoadError

        raise ModelLoadError(f"{model_dir}: model_type {kind!r}; tensor-parallel translation is built for Marian so far")
    comm = Communicator()
    shard = load_marian_shard(model_dir, graphs["encoder"], graphs["decoder"], comm.rank, comm.size)
    runner = Seq2SeqTensorParallelRunner(shard, comm, intra_threads=max(1, intra_threads))
    context = _RankContext(graphs, runner)
    program = TranslatorProgram(context, pad_id=translator.model.pad_id, decoder_start_id=translator.model.decoder_start_id)
    pool = TensorParallelPool(program, context, comm, shard.shard.describe())
    _attach(translator, pool, TensorParallelStore(shard.nbytes, shard.model_nbytes), intra_threads)


def attach_generator(generator, *, inter_threads: int, intra_threads: int) -> None:
    """Give a :class:`shmengine.Generator` (its model directory already open) this rank's shard
    in place of a worker pool: everything above the pool (options, batching, results) is the
    same code as without tensor parallelism."""
    graph = Path(generator.model.graphs["model"])
    pool, store = open_generator(graph.parent, graph, generator.model.pad_id,
                                 inter_threads=inter_threads, intra_threads=intra_threads)
    _attach(generator, pool, store, intra_threads)


def _attach(generator, pool: TensorParallelPool, store: TensorParallelStore, intra_threads: int) -> None:
    generator._tensor_parallel = True
    generator._pool, generator._store, generator._weight_holders = pool, store, []
    generator.device, generator.device_index = "cpu", [0]
    generator.inter_threads, generator.intra_threads = 1, max(1, intra_threads)
    generator.compute_type, generator.transforms = "float32", ()
    generator._finalizer = weakref.finalize(generator, pool.close)
    if pool.comm.size > 1:
        _abort_on_uncaught_exception()
