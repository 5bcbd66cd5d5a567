"""``shmengine.Engine``: any ONNX model, run by a pool of forked workers over shared weights."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import onnx

from shmengine.api.model_options import ModelOptions
from shmengine.errors import InvalidInputError
from shmengine.model.transforms import prepare_models
from shmengine.model.weights import TensorSpec, WeightStore
from shmengine.runtime.placement import place_workers
from shmengine.runtime.pool import WorkerPool
from shmengine.runtime.sharedmem import prepack_directory
from shmengine.runtime.worker import ProgramSpec, WorkerContext

logger = logging.getLogger("shmengine")

__all__ = ["Engine", "PooledModel", "OnnxProgram", "validate_feeds"]


class OnnxProgram:
    """The worker side of :class:`Engine`: one session, ``run`` returns outputs by name."""

    def __init__(self, context: WorkerContext, model_key: str = "model"):
        self.session = context.create_session(model_key)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def describe(self) -> dict:
        return {"session_providers": self.session.get_providers()}

    def run(self, method: str, payload):
        if method != "run":
            raise ValueError(f"unknown method {method!r}")
        feeds, output_names = payload
        names = output_names or self.output_names
        return dict(zip(names, self.session.run(names, feeds)))


def _describe_spec(spec: TensorSpec) -> str:
    dims = "?" if spec.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
    return f"{spec.name} ({spec.type_name}, {dims})"


def validate_feeds(feeds: Any, inputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Check one batch against the model's inputs; return it as contiguous numpy arrays.

    Raises :class:`InvalidInputError` naming the input and saying what was expected.
    """
    expected = {spec.name: spec for spec in inputs}
    catalogue = "; ".join(_describe_spec(s) for s in inputs)
    if not isinstance(feeds, Mapping):
        raise InvalidInputError(
            f"a batch must be a dict of input name -> numpy array, got {type(feeds).__name__}; "
            f"the model's inputs are: {catalogue}"
        )
    unknown = [name for name in feeds if name not in expected]
    if unknown:
        raise InvalidInputError(f"unknown input {unknown[0]!r}; the model's inputs are: {catalogue}")
    missing = [s.name for s in inputs if not s.optional and s.name not in feeds]
    if missing:
        raise InvalidInputError(f"missing input {missing[0]!r}; the model's inputs are: {catalogue}")
    symbols: dict[str, tuple[int, str]] = {}
    checked = {}
    for name, value in feeds.items():
        spec = expected[name]
        want = spec.dtype
        if isinstance(value, np.ndarray):
            array = value
        else:
            try:
                array = np.asarray(value, dtype=want)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"input {name!r} cannot be made a {spec.type_name} array: {exc}") from exc
        if want is not None and array.dtype != want:
            raise InvalidInputError(
                f"input {name!r} must be {spec.type_name} ({want}), got {array.dtype}; "
                f"convert it with array.astype(numpy.{want})"
            )
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise InvalidInputError(
                    f"input {name!r} must have {len(spec.shape)} dimensions {_describe_spec(spec)}, "
                    f"got shape {array.shape}"
                )
            for axis, (dim, size) in enumerate(zip(spec.shape, array.shape)):
                if isinstance(dim, int) and dim > 0 and dim != size:
                    raise InvalidInputError(
                        f"input {name!r} must have size {dim} on axis {axis} {_describe_spec(spec)}, got shape {array.shape}"
                    )
                if isinstance(dim, str):
                    seen = symbols.setdefault(dim, (size, name))
                    if seen[0] != size:
                        raise InvalidInputError(
                            f"dimension {dim!r} is {seen[0]} in input {seen[1]!r} but {size} in input {name!r}; "
                            "inputs of one batch must agree on it"
                        )
        checked[name] = np.ascontiguousarray(array)
    return checked


class PooledModel:
    """What every shmengine model object is: ONNX graphs in one weight store, served by a pool.

    Subclasses say which graphs (``graphs``: store key -> ONNX file), what each graph is
    (``roles``: store key -> ``"decoder"``, ``"seq2seq_encoder"``, ...; it picks the model
    transforms of ``transforms.py``) and which worker program; this class resolves
    ``compute_type`` for the device (``self.compute_type`` is what runs), owns placement, the
    store, the pool and their lifetime (``close``, ``with``, garbage collection and interpreter
    exit all end in the same clean shutdown).
    """

    def __init__(
        self,
        graphs: Mapping[str, str | os.PathLike],
        program: ProgramSpec,
        device: str = "cpu",
        *,
        device_index: int | Sequence[int] = 0,
        inter_threads: int = 1,
        intra_threads: int = 0,
        max_queued_batches: int = 0,
        prepack_weights: bool | None = None,
        graph_optimization_level: str = "all",
        graph_edits: Mapping[str, Callable[[onnx.ModelProto], object]] | None = None,
        compute_type: str = "default",
        roles: Mapping[str, str] | None = None,
    ):
        options = ModelOptions(
            device=device,
            device_index=device_index,
            compute_type=compute_type,
            inter_threads=inter_threads,
            intra_threads=intra_threads,
            max_queued_batches=max_queued_batches,
            prepack_weights=prepack_weights,
            graph_optimization_level=graph_optimization_level,
        )
        self._start(graphs, program, options, roles=roles, graph_edits=graph_edits)

    def _start(
        self,
        graphs: Mapping[str, str | os.PathLike],
        program: ProgramSpec,
        options: ModelOptions,
        *,
        roles: Mapping[str, str] | None = None,
        graph_edits: Mapping[str, Callable[[onnx.ModelProto], object]] | None = None,
    ) -> None:
        """Place the workers, transform and pack the graphs, start the pool (``options`` are
        already checked: :class:`ModelOptions` did it when it was made)."""
        placement = place_workers(
            options.device,
            options.device_index,
            inter_threads=options.inter_threads,
            intra_threads=options.intra_threads,
            prepack_weights=bool(options.prepack_weights),
            graph_optimization_level=options.graph_optimization_level,
        )
        self.device = placement.device
        self.device_index = placement.device_indices
        self.inter_threads = options.inter_threads
        self.intra_threads = placement.plan.intra_threads
        # The model transforms (graph edits, quantization, casts) run before the weights are
        # packed, so every worker maps the transformed weights from the one segment.
        prepared = prepare_models(graphs, roles or {}, placement.device, options.compute_type, placement.runner)
        self.compute_type = prepared.compute_type
        self.transforms = prepared.applied
        self._store = WeightStore.load(prepared.models, graph_edits)
        prepack_weights = options.prepack_weights
        if prepack_weights is None:
            # ORT's int8 CPU kernels run ~2.5x faster on prepacked weights (the speed a
            # CTranslate2 int8 user has); float32 keeps the smaller unpacked default
            prepack_weights = placement.device == "cpu" and self.compute_type.startswith("int8")
            placement.slots = [dataclasses.replace(s, prepack_weights=prepack_weights) for s in placement.slots]
        self.prepack_weights = bool(prepack_weights) and placement.device == "cpu"
        self._weight_holders: list[WorkerPool] = []
        self._holder_watches: list = []  # device_weights.HolderWatch per holder
        try:
            slots = placement.slots
            if prepack_weights and placement.device == "cpu":
                slots = self._prepack_once(slots)
            if placement.device == "cuda":
                slots = self._share_device_weights(slots)
            self._pool = WorkerPool(self._store, program, slots, max_queued_batches=options.max_queued_batches)
            for watch in self._holder_watches:
                watch.attach(self._pool)
        except BaseException:
            _close_all(self._weight_holders)
            self._store.close()
            raise
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, self._store, self._weight_holders)

    def _share_device_weights(self, slots: list) -> list:
        """Where several workers share a GPU: one holder worker per GPU uploads the segment once
        and every slot on that GPU maps its device copy instead of uploading its own
        (``device_weights.py``). Without cupy, or if the holder cannot start, each worker keeps
        its own copy, and a log line says why."""
        from shmengine.runtime.device_weights import HolderWatch, sharing_available

        per_device = collections.Counter(s.target.device_index for s in slots)
        shared_devices = sorted(index for index, count in per_device.items() if count > 1)
        if not shared_devices:
            return slots  # one worker per GPU: a holder would only add a CUDA context
        if not sharing_available():
            logger.warning(
                "cupy is not installed (pip install 'shmengine[cuda]'): each CUDA worker uploads its own copy of the weights"
            )
            return slots
        found = {}
        try:
            for index in shared_devices:
                on_device = {n: s for n, s in enumerate(slots) if s.target.device_index == index}
                watch = HolderWatch(index, on_device)
                holder = WorkerPool(
                    self._store,
                    ProgramSpec("shmengine.runtime.device_weights", "DeviceWeightsProgram", {"device_index": index}),
                    [next(iter(on_device.values()))],
                    owns_segment=False,
                    observer=watch,
                )
                self._weight_holders.append(holder)
                self._holder_watches.append(watch)
                found[index] = holder.worker_info(0)["device_weights"]
        except Exception as exc:
            logger.warning("sharing the weights on the GPU failed (%s): each CUDA worker uploads its own copy", exc)
            _close_all(self._weight_holders)
            self._weight_holders.clear()
            self._holder_watches.clear()
            return slots
        return [dataclasses.replace(s, device_weights=found.get(s.target.device_index)) for s in slots]

    def _prepack_once(self, slots: list) -> list:
        """Have one worker write the optimized models with prepacked weights (to disk,
        ``sharedmem.prepack_directory``, where it can), point
        every slot at them, and free the original tensor pages (no worker reads them now)."""
        preparer = WorkerPool(
            self._store,
            ProgramSpec("shmengine.runtime.sessions", "PrepackProgram",
                        {"directory": prepack_directory(), "prefix": self._store.segment.name}),
            slots[:1],
            owns_segment=False,
        )
        try:
            paths = preparer.worker_info(0)["prepacked_models"]
        finally:
            preparer.close()
        self._store.discard_tensor_data()
        return [dataclasses.replace(s, prepacked_models=paths) for s in slots]

    @property
    def num_workers(self) -> int:
        return self._pool.size

    @property
    def worker_pids(self) -> list[int]:
        """PIDs of the live workers (for monitoring; a replaced worker has a new PID)."""
        return self._pool.worker_pids()

    @property
    def weights_nbytes(self) -> int:
        """Bytes of weights held once in shared memory."""
        return self._store.nbytes

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def parallel_info(self) -> str:
        from shmengine.runtime.threads import parallel_info

        return parallel_info(self)

    def ping(self, payload: Any = None) -> Future:
        """Send an empty batch through the pool and back (measures the pool's own overhead)."""
        return self._pool.submit("ping", payload, ping=True)

    def close(self, wait: bool = False, *, cancel_futures: bool = False) -> None:
        """Stop the workers and free the shared memory. Idempotent.

        By default whatever is queued or running fails with ``EngineClosedError``. With
        ``wait=True`` (``Executor.shutdown``'s meaning) no new batch is taken and every
        submitted one finishes first; ``cancel_futures=True`` with it cancels the batches no
        worker has started and waits only for the running ones."""
        if wait and not self.closed:
            self._pool.drain(cancel_queued=cancel_futures)
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self) -> str:
        return (
            f"<shmengine.{type(self).__name__} device={self.device} workers={self.num_workers} "
            f"intra_threads={self.intra_threads} weights={self.weights_nbytes / 2**20:.1f} MiB"
            f"{' closed' if self.closed else ''}>"
        )


class Engine(PooledModel):
    """Run any ONNX model with ``inter_threads`` forked workers over one shared copy of its weights.

    Args:
        model_path: an ``.onnx`` file, or a directory holding ``model.onnx`` (or one ``.onnx``
            file). External data files must lie inside the model's directory.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        device_index: a GPU id or a list of them (CUDA only); ``inter_threads`` workers each.
        inter_threads: number of worker processes (per GPU on CUDA): batches run in parallel.
        intra_threads: ONNX Runtime intra-op threads per worker; 0 = usable cores / workers.
        max_queued_batches: batches allowed to wait: 0 = 4 x workers, -1 = unlimited, N = N.
            Submitting into a full queue blocks until a worker takes a batch.
        prepack_weights: let ORT prepack MatMul weights for its kernels (about 1.8x faster at
            batch 8 on a GPT-2-sized model). Done once by a helper worker into a file on disk
            (``SHMENGINE_PREPACK_DIR``, else ``~/.cache/shmengine/prepacked``; removed with the
            engine) that every worker maps: the prepacked weights cost their size once in
            memory, and the originals ORT keeps beside them in the file are read only while a
            worker loads. CPU only. Default (None): on
            for an int8 compute type (ORT's int8 kernels are ~2.5x faster prepacked), off else.
        graph_optimization_level: ORT's ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``.
        compute_type: CTranslate2's names and meanings: ``"default"`` (the graph's own type),
            ``"auto"`` (the fastest the device runs), ``"float32"``, ``"int8"`` /
            ``"int8_float32"`` (CPU: int8 weights, quantized once and cached beside the model),
            ``"int8_float16"``, ``"float16"``, ``"bfloat16"`` (CUDA), ``"int8_bfloat16"``,
            ``"int16"``; see :func:`shmengine.get_supported_compute_types`. ``self.compute_type``
            says what runs.

    Every batch runs whole on one worker. ``close()`` (or leaving a ``with`` block) fails any
    batch still queued or running with ``EngineClosedError`` and stops every process; to finish
    outstanding work first, wait on its futures.
    """

    def __init__(self, model_path: str | os.PathLike, device: str = "cpu", **options):
        super().__init__({"model": model_path}, ProgramSpec("shmengine.api.engine", "OnnxProgram"), device, **options)
        entry = self._store.catalog["model"]
        self.inputs: list[TensorSpec] = entry.inputs
        self.outputs: list[TensorSpec] = entry.outputs

    def run_batch(self, feeds, *, output_names: Sequence[str] | None = None, asynchronous: bool = False):
        """Run one batch (a dict of input name -> array) or several (a list of dicts).

        Returns the outputs as a dict of name -> array (a list of them for a list of batches);
        with ``asynchronous=True``, a ``concurrent.futures.Future`` per batch instead. Batches of
        a list run in parallel on the workers. Bad feeds raise ``InvalidInputError`` here,
        before anything is queued.
        """
        # Anything but a list of batches is one batch; validate_feeds says what is wrong with it.
        single = not isinstance(feeds, (list, tuple))
        batches = [feeds] if single else list(feeds)
        if output_names is not None:
            known = {o.name for o in self.outputs}
            unknown = [n for n in output_names if n not in known]
            if unknown:
                raise InvalidInputError(f"unknown output {unknown[0]!r}; the model's outputs are: {', '.join(sorted(known))}")
            output_names = list(output_names)
        checked = [validate_feeds(b, self.inputs) for b in batches]
        futures = [self._pool.submit("run", (b, output_names)) for b in checked]
        if asynchronous:
            return futures[0] if single else futures
        results = [f.result() for f in futures]
        return results[0] if single else results


def _close_all(pools: list[WorkerPool]) -> None:
    for pool in pools:
        pool.close()


def _shutdown(pool: WorkerPool, store: WeightStore, weight_holders: list[WorkerPool]) -> None:
    """Close a pool, then the GPU weight holders its workers map, then the store; runs on
    close(), garbage collection, or interpreter exit."""
    try:
        pool.close()
    finally:
        try:
            _close_all(weight_holders)
        finally:
            store.close()
