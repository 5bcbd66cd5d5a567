"""Weight quantization of an ONNX graph, done once per model before its weights are packed.

Two ONNX Runtime CPU paths exist for int8 weights; both are written here in numpy so that they
reach every place a weight is multiplied, including the branches of Optimum's merged decoders
(``If`` subgraphs), which ``onnxruntime.quantization.quantize_dynamic`` does not walk by default:

* ``matmul_integer`` -- ``DynamicQuantizeLinear`` of the activations (uint8, per tensor, per call),
  ``MatMulInteger`` against int8 weights (per tensor or per output channel), then a rescale;
  ORT's optimizer fuses the chain into ``DynamicQuantizeMatMul``.
* ``matmul_nbits`` -- ``com.microsoft.MatMulNBits`` with 8-bit weights in blocks along K and
  ``accuracy_level=4`` (int8 activations inside the kernel).

``tools/bench_quantize.py`` measures them on the GPT-2-124M shape; ``INT8_CPU_METHOD`` is the
one kept (see its comment). ``MatMul`` and ``Gemm`` nodes whose weight is a 2-D float32
initializer change, and embedding ``Gather`` nodes over a 2-D float32 table (int8 rows, a scale
per row, dequantized after the lookup so only the rows read are widened); attention's
activation x activation products stay float32 (quantizing them per call costs accuracy and
buys little), and so does everything else.

Optimum exports GPT-2's projections as ``Gemm`` (HF's Conv1D). ORT 1.31's ``quantize_dynamic``
handles those (on the GPT-2 export it makes 49 MatMulInteger: 48 Gemm + the head), leaves the 24
attention MatMuls in float32 as here, and stores the embedding tables as int8 behind a
``DequantizeLinear`` of the whole table; on the random-init GPT-2-124M its greedy tokens agreed
with float32's 78% of the time against 99% for this module's per-tensor path (measured by
tools/bench_quantize.py). Here a ``Gemm(A, W, bias)`` with alpha = beta = 1 becomes the same
quantized product plus an ``Add`` of the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from shmengine.model.transforms import all_graphs

__all__ = ["QuantizeOptions", "NotQuantizableError", "quantize_weights", "INT8_CPU_METHOD"]

# Measured by tools/bench_quantize.py (see the commit that set it): the fastest that keeps the
# bundled models >= 99% exact on their held-out numbers.
INT8_CPU_METHOD = "matmul_integer_per_tensor"

# Weights smaller than this stay float32: their products are not where the time goes, and
# quantizing a tiny projection costs relatively more accuracy.
_MIN_WEIGHT_ELEMENTS = 4096


class NotQuantizableError(ValueError):
    """The graph has nothing this quantizer can quantize (no MatMul/Gemm with a 2-D float weight)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """How weights are quantized. ``method``: ``"matmul_integer_per_tensor"``,
    ``"matmul_integer_per_channel"`` or ``"matmul_nbits"`` (8-bit, ``block_size`` along K,
    ``accuracy_level`` as ORT's MatMulNBits attribute)."""

    method: str = INT8_CPU_METHOD
    block_size: int = 32
    accuracy_level: int = 4

    def __post_init__(self):
        if self.method not in ("matmul_integer_per_tensor", "matmul_integer_per_channel", "matmul_nbits"):
            raise ValueError(f"unknown quantization method {self.method!r}")


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _GraphView:
    """Producers and readers of one graph's values (a value made in a graph is read only there
    and in the graphs nested in it; the branches of a merged decoder reuse each other's names)."""

    def __init__(self, graph: GraphProto):
        self.producers = {o: n for n in graph.node for o in n.output}
        self.uses: dict[str, int] = {}
        for g in all_graphs(graph):
            for n in g.node:
                for i in n.input:
                    self.uses[i] = self.uses.get(i, 0) + 1
            for o in g.output:
                self.uses[o.name] = self.uses.get(o.name, 0) + 1
        self.readers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)

    def constant(self, name: str) -> np.ndarray | None:
        node = self.producers.get(name)
        if node is None or node.op_type != "Constant":
            return None
        value = _attr(node, "value", None)
        return None if value is None else numpy_helper.to_array(value)

    def _is(self, name: str, op_type: str):
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type else None

    def flattened_product(self, gemm, columns: int):
        """``(x, after)`` when ``gemm`` is ``Reshape(Reshape(x, [-1, K]) @ W, x.shape[:-1] + [N])``
        with nothing else reading the two intermediate values, else None.

        ``after``'s shape must be read off ``x``'s own shape, dimension by dimension, with the
        product's column count last; then ``x``'s last dimension is ``K`` (the element counts
        agree) and ``x @ W`` is the same tensor without either reshape."""
        before = self._is(gemm.input[0], "Reshape")
        if before is None or self.uses.get(gemm.input[0]) != 1 or self.uses.get(gemm.output[0]) != 1:
            return None
        readers = self.readers.get(gemm.output[0], [])
        after = readers[0] if len(readers) == 1 and readers[0].op_type == "Reshape" else None
        if after is None or after.input[0] != gemm.output[0] or _attr(after, "allowzero", 0):
            return None
        x = before.input[0]
        concat = self._is(after.input[1], "Concat")
        if concat is None or _attr(concat, "axis", 0) != 0 or len(concat.input) < 2:
            return None
        last = self.constant(concat.input[-1])
        if last is None or last.reshape(-1).tolist() != [columns]:
            return None
        for axis, part in enumerate(concat.input[:-1]):
            unsqueeze = self._is(part, "Unsqueeze")
            gather = unsqueeze is not None and self._is(unsqueeze.input[0], "Gather")
            shape = gather and self._is(gather.input[0], "Shape")
            if not shape or shape.input[0] != x or shape.attribute or _attr(gather, "axis", 0) != 0:
                return None
            index = self.constant(gather.input[1])
            axes = self.constant(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else None
            if index is None or index.shape != () or int(index) != axis or axes is None or axes.reshape(-1).tolist() != [0]:
                return None
        return x, after


def _remove_dead_nodes(graph: GraphProto) -> None:
    """Drop nodes of ``graph`` whose outputs nothing reads (ONNX nodes have no side effects)."""
    while True:
        read = {o.name for o in graph.output}
        for g in all_graphs(graph):
            for n in g.node:
                read.update(n.input)
        keep = [n for n in graph.node if any(o and o in read for o in n.output)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)


class _Quantizer:
    def __init__(self, model: ModelProto, options: QuantizeOptions):
        self.model = model
        self.options = options
        # Weights may sit in the main graph and be read from a subgraph (Optimum's merged
        # decoders share one set of weights between both branches): look them up everywhere.
        self.initializers: dict[str, TensorProto] = {}
        for g in all_graphs(model.graph):
            for t in g.initializer:
                self.initializers.setdefault(t.name, t)
        self.quantized: dict[str, list[str]] = {}  # float weight name -> names of its quantized tensors
        self.new_initializers: list[TensorProto] = []
        self.count = 0

    def weight(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            return None
        if t.dims[0] * t.dims[1] < _MIN_WEIGHT_ELEMENTS:
            return None
        return numpy_helper.to_array(t)

    def add(self, name: str, array: np.ndarray) -> str:
        self.new_initializers.append(numpy_helper.from_array(array, name))
        return name

    def run(self) -> int:
        for g in all_graphs(self.model.graph):
            self._graph(g)
        if not self.count:
            return 0
        self.model.graph.initializer.extend(self.new_initializers)
        # float weights no longer read by anything go, or the store would still pack them
        still_used = set()
        for g in all_graphs(self.model.graph):
            for n in g.node:
                still_used.update(n.input)
            still_used.update(o.name for o in g.output)
        for g in all_graphs(self.model.graph):
            keep = [t for t in g.initializer if t.name in still_used]
            del g.initializer[:]
            g.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return self.count

    def _graph(self, graph: GraphProto) -> None:
        nodes = list(graph.node)
        view = _GraphView(graph)
        out = []
        dropped: set[int] = set()  # ids of the reshapes a flattened Gemm no longer needs
        for node in nodes:
            if id(node) in dropped:
                continue
            replacement = None
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                w = self.weight(node.input[1])
                if w is not None:
                    replacement = self._matmul(node, node.input[0], node.input[1], w, None, node.output[0])
            elif node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
                replacement = self._gemm(node, view, dropped)
            elif node.op_type == "Gather" and node.domain in ("", "ai.onnx") and _attr(node, "axis", 0) == 0:
                w = self.weight(node.input[0])
                if w is not None:
                    replacement = self._embedding(node, w)
            if replacement is None:
                out.append(node)
            else:
                out.extend(replacement)
                self.count += 1
        del graph.node[:]
        graph.node.extend(out)
        if dropped:
            _remove_dead_nodes(graph)

    def _gemm(self, node, view: "_GraphView", dropped: set[int]):
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "transA", 0):
            return None
        w = self.weight(node.input[1])
        if w is None:
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and _attr(node, "beta", 1.0) != 1.0:
            return None
        if _attr(node, "transB", 0):
            w = np.ascontiguousarray(w.T)
        key = node.input[1] + ("/T" if _attr(node, "transB", 0) else "")
        a, output = node.input[0], node.output[0]
        unflatten = view.flattened_product(node, w.shape[1])
        if unflatten is not None:
            # MatMulInteger takes the N-D activations as they are: the flattening Reshape before
            # the Gemm and the one that undoes it after (HF's Conv1D, 12 small nodes a product
            # with their shape arithmetic) go, and so does their per-step cost in ORT.
            a, after = unflatten
            output = after.output[0]
            dropped.add(id(after))
        return self._matmul(node, a, key, w, bias, output)

    def _matmul(self, node, a: str, key: str, w: np.ndarray, bias: str | None, output: str):
        base = (node.name or output).replace("/", "_")
        method = self.options.method
        if method == "matmul_nbits":
            return self._nbits(node, base, a, key, w, bias, output)
        per_channel = method == "matmul_integer_per_channel"
        names = self.quantized.get(key)
        if names is None:
            if per_channel:
                scale = np.abs(w).max(axis=0) / 127.0
            else:
                scale = np.array(np.abs(w).max() / 127.0)
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            zero = np.zeros(scale.shape, np.int8)
            names = [self.add(f"{key}/int8", q), self.add(f"{key}/int8_scale", scale), self.add(f"{key}/int8_zero", zero)]
            self.quantized[key] = names
        q_name, scale_name, zero_name = names
        n = lambda suffix: f"{base}/q_{suffix}"  # noqa: E731
        nodes = [
            helper.make_node("DynamicQuantizeLinear", [a], [n("a"), n("a_scale"), n("a_zero")], name=n("dql")),
            helper.make_node("MatMulInteger", [n("a"), q_name, n("a_zero"), zero_name], [n("int32")], name=n("mmi")),
            helper.make_node("Cast", [n("int32")], [n("float")], to=TensorProto.FLOAT, name=n("cast")),
            helper.make_node("Mul", [n("a_scale"), scale_name], [n("scale")], name=n("scale_mul")),
        ]
        if bias is None:
            nodes.append(helper.make_node("Mul", [n("float"), n("scale")], [output], name=n("out")))
        else:
            nodes.append(helper.make_node("Mul", [n("float"), n("scale")], [n("scaled")], name=n("out")))
            nodes.append(helper.make_node("Add", [n("scaled"), bias], [output], name=n("bias")))
        return nodes

    def _embedding(self, node, table: np.ndarray):
        """An embedding lookup over int8 rows with one scale per row: the table costs a quarter,
        and each lookup dequantizes only the rows it reads."""
        key = node.input[0]
        names = self.quantized.get(key + "/rows")
        if names is None:
            scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
            names = [self.add(f"{key}/int8_rows", q), self.add(f"{key}/int8_row_scale", scale)]
            self.quantized[key + "/rows"] = names
        base = (node.name or node.output[0]).replace("/", "_")
        ids, output = node.input[1], node.output[0]
        return [
            helper.make_node("Gather", [names[0], ids], [f"{base}/q_rows"], name=f"{base}/q_gather", axis=0),
            helper.make_node("Gather", [names[1], ids], [f"{base}/q_row_scale"], name=f"{base}/q_gather_scale", axis=0),
            helper.make_node("Cast", [f"{base}/q_rows"], [f"{base}/q_rows_float"], to=TensorProto.FLOAT, name=f"{base}/q_cast"),
            helper.make_node("Mul", [f"{base}/q_rows_float", f"{base}/q_row_scale"], [output], name=f"{base}/q_scale"),
        ]

    def _nbits(self, node, base, a, key, w, bias, output):
        k, cols = w.shape
        bs = self.options.block_size
        blocks = -(-k // bs)
        names = self.quantized.get(key)
        if names is None:
            padded = np.zeros((blocks * bs, cols), np.float32)
            padded[:k] = w
            grouped = padded.T.reshape(cols, blocks, bs)  # [N, blocks, block]: MatMulNBits' layout
            scale = np.abs(grouped).max(axis=2) / 127.0
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            q = np.clip(np.rint(grouped / scale[:, :, None]), -127, 127).astype(np.int16) + 128
            names = [self.add(f"{key}/nbits8", q.astype(np.uint8)), self.add(f"{key}/nbits8_scale", scale.reshape(-1))]
            self.quantized[key] = names
        inputs = [a, names[0], names[1]]
        if bias is not None:
            inputs += ["", "", bias]  # zero_points and g_idx absent: symmetric, zero point 128
        return [
            helper.make_node(
                "MatMulNBits", inputs, [output], domain="com.microsoft", name=f"{base}/nbits8",
                K=k, N=cols, bits=8, block_size=bs, accuracy_level=self.options.accuracy_level,
            )
        ]


def quantize_weights(model: ModelProto, options: QuantizeOptions | None = None) -> int:
    """Quantize ``model``'s weight products to int8 in place; return how many were quantized.

    ``model`` must hold its weight bytes (loaded with its external data). Raises
    :class:`NotQuantizableError` when nothing in it can be quantized.
    """
    count = _Quantizer(model, options or QuantizeOptions()).run()
    if not count:
        raise NotQuantizableError("no MatMul or Gemm with a 2-D float32 weight of at least 4096 values")
    return count
