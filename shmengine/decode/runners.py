"""Runners: where a worker's tensors live between decoding steps, and how sessions are run.

A stepper (``steppers.py``) knows an export's *names*: which inputs a step takes, which output
feeds which cache input next step, where the logits are. A runner knows *where* tensors live:

    runner.run(session, feeds, fetch) -> outputs   feeds: name -> host array or a kept tensor;
                                                   fetch: output name -> HOST | KEEP | LOGITS
    runner.take(tensors, rows)        -> tensors   keep / reorder / repeat batch rows (beams,
                                                   finished examples leaving the batch)
    runner.empty(meta, batch)         -> tensor    a zero-length cache shaped as an input declares

``KEEP`` outputs stay where the session computed them and are fed back as they are; ``HOST``
outputs come back as numpy arrays; ``LOGITS`` come back as a :class:`decoding.Logits` of the last
position, which the search asks for its top-k (or, when a logits processor needs them, the full
rows).

* :class:`HostRunner` — numpy arrays and ``session.run``: on CPU the fastest (no binding objects
  per step; measured: OrtValues instead of arrays gained 1-2% at most on GPT-2).
* :class:`BoundRunner` — IOBinding: kept outputs are ``OrtValue``\\ s on the worker's device,
  reordered there by a small Gather graph, and the logits are reduced there (TopK and a
  log-sum-exp graph), so per step only the new token ids go to the device and ``rows x k``
  values come back. On CPU it runs the same code over CPU OrtValues: that is how the test suite
  exercises the device path on a machine without a GPU.

The helper graphs are tiny ONNX models built here and run by the same execution provider as the
model, so no device-array library is needed (ORT's own OrtValue/IOBinding API does the work).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shmengine.decode.decoding import HostLogits
from shmengine.errors import DeviceOutOfMemoryError
from shmengine.model.graph_edits import STEP_TOP, STEP_TOP_K, top_nodes
from shmengine.runtime.target import WorkerTarget

__all__ = ["HOST", "KEEP", "LOGITS", "Runner", "HostRunner", "BoundRunner", "BoundLogits", "create_runner", "ORT_TYPES"]

HOST = "host"
KEEP = "keep"
LOGITS = "logits"

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def empty_cache_shape(meta, batch: int) -> list[int]:
    """[batch, heads, 0, head_dim] for a cache input declared [batch, heads, past, head_dim]."""
    shape = []
    for axis, dim in enumerate(meta.shape):
        if axis == 0:
            shape.append(batch)
        elif axis == len(meta.shape) - 2:
            shape.append(0)
        else:
            if not isinstance(dim, int):
                raise ValueError(f"cache input {meta.name!r} has a symbolic dimension {dim!r} at axis {axis}; cannot size it")
            shape.append(dim)
    return shape


def _empty_like_input(meta, batch: int) -> np.ndarray:
    if meta.type == "tensor(bfloat16)":
        raise ValueError(f"cache input {meta.name!r} is bfloat16: use the bound runner (device='cuda')")
    return np.zeros(empty_cache_shape(meta, batch), dtype=ORT_TYPES.get(meta.type, np.float32))


class Runner:
    """The interface; see the module docstring."""

    def run(self, session, feeds: Mapping[str, Any], fetch: Mapping[str, str]) -> dict[str, Any]:
        raise NotImplementedError

    def take(self, tensors: Mapping[str, Any], rows: np.ndarray) -> dict[str, Any]:
        raise NotImplementedError

    def empty(self, meta, batch: int):
        """A zero-length cache tensor for ``meta`` (an input's metadata); host memory suffices:
        it holds no bytes, and a bound runner copies it to the device when it binds it."""
        return _empty_like_input(meta, batch)


class HostRunner(Runner):
    """Tensors as numpy arrays, sessions run with ``session.run``."""

    def run(self, session, feeds, fetch):
        names = list(fetch)
        outputs = dict(zip(names, session.run(names, dict(feeds))))
        for name, where in fetch.items():
            if where == LOGITS:
                outputs[name] = HostLogits(outputs[name][:, -1, :])
        return outputs

    def take(self, tensors, rows):
        return {name: value[rows] for name, value in tensors.items()}


class BoundRunner(Runner):
    """Tensors as ``OrtValue``\\ s on the target's device, sessions run through IOBinding."""

    def __init__(self, target: WorkerTarget, providers: Sequence[tuple[str, dict]], device_id: int = 0,
                 shared_stream: bool = True):
        # Where a step's logits are reduced to its top-k (tools/bench_gpu.py's strategies
        # section compares them): "graph" (default) in the model's own run where its graph has
        # the step_top outputs, else in the helper graph; "helper" always in the helper graph;
        # "topk" the same with TopK for greedy's top-1 too (else ArgMax); "host" copies the
        # logits to the host and reduces them with numpy.
        reduce = os.environ.get("SHMENGINE_DEVICE_REDUCE", "graph")
        self.reduce_on_host = reduce == "host"
        self.top1_by_topk = reduce == "topk"
        self.step_top_allowed = reduce == "graph"
        self.device = target.ort_device
        # A CUDA worker sees only its own GPU (CUDA_VISIBLE_DEVICES), as device 0; the index
        # the user named is kept for messages. A tensor-parallel rank's process sees every GPU
        # of its host and names its own (``device_id``).
        self.device_id = device_id
        self.device_index = target.device_index
        self.providers = [name for name, _ in providers]
        self.provider_options = [dict(options) for _, options in providers]
        self._helpers: dict[tuple, Any] = {}
        # Sessions whose graph computes the step's top-k itself (graph_edits.expose_step_top),
        # and the k to ask of them: the last one a search asked for (one search runs a batch,
        # and asks the same k every step; a different k is answered by the helper graph once).
        self._has_step_top: dict[Any, bool] = {}
        self.step_top_k = 1
        # One stream for the model and the helper graphs (runtime/cuda_stream.py): a run whose
        # outputs all stay on the device then skips its end-of-run sync; the helper run that
        # brings results to the host is ordered after it by the stream and synchronises.
        self._run_async = None
        # (``shared_stream=False``: a tensor-parallel rank's replicas are threads of one process,
        # on a GPU of its choosing, where the one worker stream of cuda_stream.py does not apply)
        if self.device == "cuda" and shared_stream:
            from shmengine.runtime.cuda_stream import stream_is_shared, with_shared_stream

            self.provider_options = with_shared_stream(self.providers, self.provider_options)
            if stream_is_shared():
                import onnxruntime as ort

                self._run_async = ort.RunOptions()
                self._run_async.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def empty(self, meta, batch: int):
        if meta.type == "tensor(bfloat16)":
            # numpy has no bfloat16: an empty cache needs no bytes, only the ONNX type
            import onnxruntime as ort
            from onnx import TensorProto

            zeros = np.zeros(empty_cache_shape(meta, batch), np.uint16)
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(zeros, TensorProto.BFLOAT16)
        return super().empty(meta, batch)

    # -- running the model ---------------------------------------------------------------------

    def run(self, session, feeds, fetch):
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        step_top = self._step_top(session)
        if step_top:
            binding.bind_cpu_input(STEP_TOP_K, np.array([self.step_top_k], dtype=np.int64))
        for name, where in fetch.items():
            if where == HOST:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, self.device, self.device_id)
        # the model's own top-k comes to the host with its run, for the search to read
        prefetch = step_top and self.step_top_allowed and LOGITS in fetch.values()
        if prefetch:
            for name in STEP_TOP:
                binding.bind_output(name, "cpu")
        run_options = None
        if self._run_async is not None and HOST not in fetch.values() and not prefetch:
            run_options = self._run_async  # nothing comes to the host: no need to wait for the GPU
        try:
            session.run_with_iobinding(binding, run_options)
        except Exception as exc:
            if self.device == "cuda" and _out_of_memory(exc):
                rows = next((len(v) for v in feeds.values() if isinstance(v, np.ndarray) and v.ndim >= 1), "?")
                raise DeviceOutOfMemoryError(
                    f"CUDA device {self.device_index} ran out of memory running a batch of {rows} rows "
                    f"({str(exc).splitlines()[0][:300]}); lower max_batch_size, or run fewer workers on this GPU"
                ) from exc
            raise
        values = binding.get_outputs()
        top = None
        if prefetch:
            top = tuple(v.numpy() for v in values[len(fetch):]) + (self.step_top_k,)
        outputs = {}
        for (name, where), value in zip(fetch.items(), values):
            if where == HOST:
                outputs[name] = self.to_host(value)
            elif where == LOGITS:
                outputs[name] = BoundLogits(value, self, top)
            else:
                outputs[name] = value
        return outputs

    def _step_top(self, session) -> bool:
        """Whether ``session``'s graph has the step's top-k outputs (``expose_step_top``)."""
        found = self._has_step_top.get(session)
        if found is None:
            found = self._has_step_top[session] = STEP_TOP_K in {i.name for i in session.get_inputs()}
        return found

    def take(self, tensors, rows):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        taken = {name: value[rows] for name, value in tensors.items() if isinstance(value, np.ndarray)}
        kept = [name for name in tensors if name not in taken]
        if kept:
            for name, value in zip(kept, self.gather([tensors[n] for n in kept], rows)):
                taken[name] = value
        return {name: taken[name] for name in tensors}

    # -- helper graphs on the device -------------------------------------------------------------

    def to_host(self, value) -> np.ndarray:
        """An OrtValue as a numpy array; bfloat16, which numpy lacks, as float32 (cast where it lies)."""
        if value.data_type() != "tensor(bfloat16)":
            return value.numpy()
        session = self._helper(("cast",), _cast_graph)
        binding = session.io_binding()
        binding.bind_ortvalue_input("x", value)
        binding.bind_output("y", "cpu")
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def gather(self, values: list, rows: np.ndarray) -> list:
        """``value[rows]`` for every OrtValue, in one run of a Gather graph on the device."""
        types = tuple(v.data_type() for v in values)
        session = self._helper(("gather", types), lambda: _gather_graph(types))
        binding = session.io_binding()
        for i, value in enumerate(values):
            binding.bind_ortvalue_input(f"x{i}", value)
        binding.bind_cpu_input("rows", rows)
        for i in range(len(values)):
            binding.bind_output(f"y{i}", self.device, self.device_id)
        session.run_with_iobinding(binding, self._run_async)  # its outputs stay on the device
        return list(binding.get_outputs())

    def top(self, logits, k: int, normalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The last position's top-k values and ids, and its log-normaliser (zeros without
        ``normalize``: the graph then skips the pass over the vocabulary), computed on the device."""
        # k = 1 (greedy) is an ArgMax (0.06 ms at 32 x 50,257 on an H200, TopK(8) 0.09 ms);
        # SHMENGINE_DEVICE_REDUCE=topk takes it by TopK instead, for comparison.
        argmax = k == 1 and not self.top1_by_topk
        key = ("top", logits.data_type(), argmax, normalize)
        session = self._helper(key, lambda: _top_graph(logits.data_type(), argmax, normalize))
        binding = session.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        if not argmax:
            binding.bind_cpu_input("k", np.array([k], dtype=np.int64))
        names = ("values", "ids", "normalizer") if normalize else ("values", "ids")
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = [v.numpy() for v in binding.get_outputs()]
        if not normalize:
            outputs.append(np.zeros((len(outputs[0]), 1), np.float32))
        values, ids, normalizer = outputs
        return values, ids, normalizer

    def _helper(self, key: tuple, build):
        session = self._helpers.get(key)
        if session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            session = ort.InferenceSession(
                build().SerializeToString(), options, providers=self.providers, provider_options=self.provider_options
            )
            self._helpers[key] = session
        return session


class BoundLogits:
    """:class:`decoding.Logits` over an OrtValue [rows, positions, vocabulary] on the device.

    ``top``: the last position's (values, ids, normaliser, k) that the model's run computed
    already (``graph_edits.expose_step_top``); a search asking for at most that ``k`` is
    answered from it without another run."""

    def __init__(self, value, runner: BoundRunner, top: tuple | None = None):
        self.value = value
        self.runner = runner
        self.prefetched = top

    @property
    def vocab_size(self) -> int:
        return self.value.shape()[-1]

    def array(self) -> np.ndarray:
        return self.runner.to_host(self.value)[:, -1, :].astype(np.float32, copy=False)

    def take(self, rows: np.ndarray) -> BoundLogits:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        top = None
        if self.prefetched is not None:
            values, ids, normalizer, k = self.prefetched
            top = (values[rows], ids[rows], normalizer[rows], k)
        return BoundLogits(self.runner.gather([self.value], rows)[0], self.runner, top)

    def top(self, k: int, normalize: bool = True):
        vocab = self.vocab_size
        if self.runner.reduce_on_host:
            return HostLogits(self.array()).top(k, normalize)
        if k >= vocab:  # every token: the full rows are as small as the answer
            return HostLogits(self.array()).top(k, normalize)
        prefetched_k = self.prefetched[3] if self.prefetched is not None else 0
        self.runner.step_top_k = k  # the model's next runs compute this k themselves
        if k <= prefetched_k:
            values, ids, normalizer, _ = self.prefetched
            # TopK's output is sorted, so its first k are the top-k (ties: lower index first)
            return values[:, :k], ids[:, :k], normalizer
        return self.runner.top(self.value, k, normalize)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether an ONNX Runtime error is the device's allocator giving up (CUDA's or ORT's arena)."""
    text = str(exc).lower()
    return any(sign in text for sign in ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation"))


def create_runner(target: WorkerTarget, providers: Sequence[tuple[str, dict]]) -> Runner:
    """The runner a worker's programs use, chosen from its target: bound on a GPU (the cache must
    stay there), host on CPU unless the target asks for the bound one."""
    if target.device == "cuda" or target.runner == "bound":
        return BoundRunner(target, providers)
    return HostRunner()


# -- helper graphs ------------------------------------------------------------------------------

_HELPER_OPSET = 13
_HELPER_IR_VERSION = 8  # ORT 1.31 reads IR <= 13; onnx 1.23 would write 14 by default


def _onnx_type(ort_type: str) -> int:
    """ORT's type string ("tensor(float16)") -> onnx.TensorProto's enum (FLOAT16)."""
    from onnx import TensorProto

    return getattr(TensorProto, ort_type[len("tensor(") : -1].upper())


def _model(nodes, inputs, outputs):
    from onnx import helper

    graph = helper.make_graph(nodes, "shmengine_helper", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _HELPER_OPSET)])
    model.ir_version = _HELPER_IR_VERSION
    return model


def _gather_graph(types: tuple[str, ...]):
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(f"x{i}", _onnx_type(t), None) for i, t in enumerate(types)]
    inputs.append(helper.make_tensor_value_info("rows", TensorProto.INT64, ["rows"]))
    outputs = [helper.make_tensor_value_info(f"y{i}", _onnx_type(t), None) for i, t in enumerate(types)]
    nodes = [helper.make_node("Gather", [f"x{i}", "rows"], [f"y{i}"], axis=0) for i in range(len(types))]
    return _model(nodes, inputs, outputs)


def _cast_graph():
    """bfloat16 -> float32, any shape."""
    from onnx import TensorProto, helper

    return _model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )


def _top_graph(logits_type: str, argmax: bool, normalize: bool = True, positions: bool = True):
    """logits [rows, positions, V] -> the last position's top-k (values float32, ids int64) and,
    with ``normalize``, its log-sum-exp [rows, 1] (``graph_edits.top_nodes``). With ``argmax``
    the graph takes no ``k``: the top-1 is ArgMax. ``positions=False``: logits [rows, V] float32
    (host logits, ``cpu_top.py``)."""
    from onnx import TensorProto, helper

    names = ("values", "ids", "normalizer") if normalize else ("values", "ids")
    nodes = top_nodes("logits", names, k=None if argmax else "k", prefix="", positions=positions)
    shape = ["rows", "positions", "vocab"] if positions else ["rows", "vocab"]
    inputs = [helper.make_tensor_value_info("logits", _onnx_type(logits_type), shape)]
    if not argmax:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    outputs = [
        helper.make_tensor_value_info("values", TensorProto.FLOAT, ["rows", "k"]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows", "k"]),
    ]
    if normalize:
        outputs.append(helper.make_tensor_value_info("normalizer", TensorProto.FLOAT, ["rows", 1]))
    return _model(nodes, inputs, outputs)
