"""A graph edit on exported attention: scale the queries, not the whole key cache, every step.

PyTorch's ``scaled_dot_product_attention``, as exported by Optimum (GPT-2, Marian, ...), computes
``(Q * s) @ (Transpose(K) * s)`` with ``s = sqrt(1 / sqrt(head_dim))`` on both sides. ``K`` is
the whole key cache (``present.*.key``), so each step and layer writes the cache twice more:
once transposed, once scaled; and the scaling between the two keeps ONNX Runtime from folding
the transpose into the product (``FusedMatMul`` with ``transB``). Since ``s`` is a single
number, ``(Q * s) @ (Transpose(K) * s) == ((Q * s) * s) @ Transpose(K)``: the second scale moves
onto the queries (one row per sequence during decoding), and ORT then reads the cache in place.

Measured on the GPT-2-124M shape, int8, one thread, CPU time of a plain ORT greedy loop
(tools/bench_int8_isolate.py's loop): 1.12x at batch 1, 1.14x at 8, 1.18x at 32. In float32 the
logits move by rounding only (2.5e-6 at most on that model).

Only the exact shape is edited: ``MatMul(A, Mul(Transpose(K), s))`` where ``s`` provably holds
one element (a one-element constant, or arithmetic over one element picked out of a ``Shape``)
and the ``Mul``'s result feeds nothing else. Anything else is left as it is.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from onnx import GraphProto, ModelProto, helper, numpy_helper

from shmengine.model.transforms import all_graphs

__all__ = ["fold_key_scale"]

_UNARY = {"Sqrt", "Cast", "Neg", "Reciprocal", "Identity", "Abs", "Exp", "Log"}
_BINARY = {"Div", "Mul", "Add", "Sub", "Pow"}


class _Graph:
    def __init__(self, graph: GraphProto, initializers: dict):
        self.graph = graph
        self.initializers = initializers
        self.producers = {o: n for n in graph.node for o in n.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def one_element(self, name: str, depth: int = 0) -> bool:
        """Whether ``name`` is known to hold exactly one value (of any rank)."""
        if depth > 12:
            return False
        if name in self.initializers:
            dims = self.initializers[name].dims
            return int(np.prod(dims)) == 1 if len(dims) else True
        node = self.producers.get(name)
        if node is None:
            return False
        if node.op_type == "Constant":
            value = self.const(name)
            return value is not None and value.size == 1
        if node.op_type in _UNARY:
            return self.one_element(node.input[0], depth + 1)
        if node.op_type in _BINARY:
            return all(self.one_element(i, depth + 1) for i in node.input)
        if node.op_type == "Gather":  # one entry of a shape vector
            shape = self.producers.get(node.input[0])
            index = self.const(node.input[1])
            return shape is not None and shape.op_type == "Shape" and index is not None and index.size == 1
        if node.op_type == "Slice":  # data[-1:] or data[i:i+1] of a shape vector, one axis
            shape = self.producers.get(node.input[0])
            if shape is None or shape.op_type != "Shape" or len(node.input) > 4 and node.input[4]:
                return False
            starts, ends = self.const(node.input[1]), self.const(node.input[2])
            if starts is None or ends is None or starts.size != 1 or ends.size != 1:
                return False
            start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
            return (start == -1 and end >= 2**31 - 1) or (start >= 0 and end == start + 1) or (start < 0 and end == start + 1)
        return False


def fold_key_scale(model: ModelProto) -> int:
    """Move the key side's scalar scale onto the queries (see the module docstring), in place;
    returns how many products were edited."""
    initializers = {t.name: t for g in all_graphs(model.graph) for t in g.initializer}
    edited = 0
    for g in list(all_graphs(model.graph)):
        # a value made in g is read only in g and the graphs nested in it (the two branches of
        # an Optimum merged decoder reuse each other's names: they must not be counted together)
        uses: Counter = Counter()
        for inner in all_graphs(g):
            for n in inner.node:
                uses.update(i for i in n.input if i)
            uses.update(o.name for o in inner.output)
        view = _Graph(g, initializers)
        for node in list(g.node):
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                continue
            scaled = view.producers.get(node.input[1])
            if scaled is None or scaled.op_type != "Mul" or uses[scaled.output[0]] != 1:
                continue
            scalars = [i for i in scaled.input if view.one_element(i)]
            if not scalars:
                continue
            scale = scalars[0]
            keys = scaled.input[1] if scaled.input[0] == scale else scaled.input[0]
            transpose = view.producers.get(keys)
            if transpose is None or transpose.op_type != "Transpose":
                continue
            queries = f"{node.input[0]}/shmengine_key_scale"
            moved = helper.make_node("Mul", [node.input[0], scale], [queries], name=f"{scaled.name or queries}/on_queries")
            g.node.insert(list(g.node).index(node), moved)
            node.input[0], node.input[1] = queries, keys
            g.node.remove(scaled)
            edited += 1
    return edited
