"""Float precision of a whole graph: float32 -> float16 / bfloat16 (for CUDA), and back to float32.

What the decoding loop sees stays the same: every float input and output of the graph keeps
float32 (logits, hidden states, masks given as floats) except the KV cache
(``past_key_values.*`` inputs, ``present.*`` outputs), which is carried in the graph's own type
so that no cast runs per step and the cache costs half the memory; the steppers size the empty
cache from the input's declared type.

float16 uses ONNX Runtime's own converter (``onnxruntime.transformers.float16``: it clamps
weights to float16's range and keeps ops without float16 kernels in float32). bfloat16 reuses
its graph (same ops kept in float32, same casts) and re-encodes every float16 tensor as
bfloat16 from the original float32 values, so nothing is clamped to float16's range first.
"""

from __future__ import annotations

import numpy as np
from onnx import AttributeProto, ModelProto, TensorProto, helper, numpy_helper

from shmengine.model.transforms import all_graphs

__all__ = ["cast_to_float16", "cast_to_bfloat16", "cast_to_float32", "is_cache_name", "float32_to_bfloat16_bits"]

_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def is_cache_name(name: str) -> bool:
    """Whether a graph input/output is the KV cache (Optimum's names)."""
    return name.startswith("past_key_values") or name.startswith("present")


# Comparisons have no bfloat16 kernel on ORT 1.31's CUDA or CPU providers (seen on the H200:
# "Provider type for Equal node ... is not set" on Optimum's Marian merged decoder): they compare
# float32 casts of their bfloat16 inputs. The casts are put here, in the comparison's own graph:
# the converter's op_block_list puts them where an If branch cannot see them (ORT: "not a graph
# input, initializer, or output of a previous node").
_NO_BFLOAT16 = ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")


def cast_to_float16(model: ModelProto, extra_blocked: tuple[str, ...] = ()) -> None:
    """Convert ``model`` (with its weights loaded) to float16 in place; float I/O other than the
    KV cache stays float32; ops in ``extra_blocked`` stay float32 too."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # Blocking Range (the converter's default) breaks Optimum's merged decoders: its casts around
    # a Range inside an If branch name a value of the other scope (ORT: "not a graph input,
    # initializer, or output"). Their Range runs on integers, so nothing needs blocking there.
    blocked = [op for op in DEFAULT_OP_BLOCK_LIST if op != "Range"] + list(extra_blocked)
    # The converter's own keep_io_types also renames same-named outputs inside If branches
    # (Optimum's merged decoders name them like the graph's outputs), which ORT then refuses as
    # outer-scope values returned by a subgraph: the float32 boundary is drawn here instead.
    converted = convert_float_to_float16(model, keep_io_types=False, op_block_list=blocked)
    if converted is not model:
        model.CopyFrom(converted)
    _float32_boundary(model, TensorProto.FLOAT16)


def _float32_boundary(model: ModelProto, half: int) -> None:
    """Give every half-precision graph input and output that is not the KV cache a float32 face:
    a Cast after each such input, a Cast before each such output."""
    graph = model.graph
    first, last = [], []
    for value in graph.input:
        t = value.type.tensor_type
        if t.elem_type != half or is_cache_name(value.name):
            continue
        inner = value.name + "/shmengine_half"
        for g in all_graphs(graph):
            for node in g.node:
                for i, name in enumerate(node.input):
                    if name == value.name:
                        node.input[i] = inner
        first.append(helper.make_node("Cast", [value.name], [inner], to=half, name=inner + "/cast"))
        t.elem_type = TensorProto.FLOAT
    for value in graph.output:
        t = value.type.tensor_type
        if t.elem_type != half or is_cache_name(value.name):
            continue
        inner = value.name + "/shmengine_half"
        for node in graph.node:  # the main graph only: If branches keep their own output names
            for i, name in enumerate(node.output):
                if name == value.name:
                    node.output[i] = inner
            for i, name in enumerate(node.input):
                if name == value.name:
                    node.input[i] = inner
        last.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT, name=inner + "/cast"))
        t.elem_type = TensorProto.FLOAT
    renamed = {n.input[0] for n in first} | {n.output[0] for n in last}
    keep = [v for v in graph.value_info if v.name not in renamed]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    nodes = first + list(graph.node) + last
    del graph.node[:]
    graph.node.extend(nodes)


def float32_to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float32 values, rounded to nearest even."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _bfloat16_tensor(name: str, values: np.ndarray) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=list(values.shape))
    t.raw_data = float32_to_bfloat16_bits(values).tobytes()
    return t


def _retype_values(model: ModelProto, source: int, dest: int) -> None:
    for g in all_graphs(model.graph):
        for v in [*g.input, *g.output, *g.value_info]:
            if v.type.tensor_type.elem_type == source:
                v.type.tensor_type.elem_type = dest


def cast_to_bfloat16(model: ModelProto) -> None:
    """Convert ``model`` (with its weights loaded) to bfloat16 in place (see the module docstring)."""
    originals = {}
    for g in all_graphs(model.graph):
        for t in g.initializer:
            if t.data_type == TensorProto.FLOAT:
                originals[t.name] = numpy_helper.to_array(t)
    cast_to_float16(model)

    def to_bf16(t: TensorProto) -> TensorProto:
        values = originals.get(t.name)
        if values is None or values.shape != tuple(t.dims):
            values = numpy_helper.to_array(t).astype(np.float32)
        return _bfloat16_tensor(t.name, values)

    for g in all_graphs(model.graph):
        for t in g.initializer:
            if t.data_type == TensorProto.FLOAT16:
                t.CopyFrom(to_bf16(t))
        for node in g.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                    attr.i = TensorProto.BFLOAT16
                elif attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                    attr.t.CopyFrom(to_bf16(attr.t))
    _retype_values(model, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    _compare_in_float32(model)


def _compare_in_float32(model: ModelProto) -> None:
    import onnx

    try:  # the converter's value_info misses values inside If branches: infer them all
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a model over protobuf's 2 GiB; the declared types below still apply
        inferred = model

    def declared(g) -> dict[str, int]:
        types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
        types.update({t.name: t.data_type for t in g.initializer})
        for node in g.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == AttributeProto.TENSOR:
                        types[node.output[0]] = attr.t.data_type
            elif node.op_type == "Cast":
                types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
        return types

    # Branches of one If reuse value names with other types (Optimum's merged decoders): each
    # graph is read with its own names first, then the main graph's (its outer scope).
    pairs = list(zip(all_graphs(inferred.graph), all_graphs(model.graph)))
    outer = {**declared(pairs[0][1]), **declared(pairs[0][0])}
    # innermost first: rebuilding a graph's node list copies its nodes, and with them the
    # branches already edited, whereas an edit made after that would land in a discarded copy
    for inferred_graph, g in reversed(pairs):
        types = {**outer, **declared(g), **declared(inferred_graph)}
        nodes = []
        for node in g.node:
            if node.op_type in _NO_BFLOAT16:
                for i, name in enumerate(node.input):
                    if types.get(name) == TensorProto.BFLOAT16:
                        wide = f"{name}/shmengine_float32_for_{node.name or node.output[0]}"
                        nodes.append(helper.make_node("Cast", [name], [wide], to=TensorProto.FLOAT, name=wide))
                        node.input[i] = wide
            nodes.append(node)
        del g.node[:]
        g.node.extend(nodes)


def cast_to_float32(model: ModelProto) -> None:
    """Convert every float16 / bfloat16 tensor, cast and declared type of ``model`` to float32 in
    place (widening loses nothing): how a float16 export runs on a CPU."""
    halves = (TensorProto.FLOAT16, TensorProto.BFLOAT16)

    def widened(t: TensorProto) -> TensorProto:
        if t.data_type == TensorProto.BFLOAT16:
            bits = np.frombuffer(t.raw_data, np.uint16) if t.raw_data else np.array(t.int32_data, np.uint16)
            values = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(tuple(t.dims))
        else:
            values = numpy_helper.to_array(t).astype(np.float32)
        return numpy_helper.from_array(values, t.name)

    for g in all_graphs(model.graph):
        for t in g.initializer:
            if t.data_type in halves:
                t.CopyFrom(widened(t))
        for node in g.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i in halves:
                    attr.i = TensorProto.FLOAT
                elif attr.type == AttributeProto.TENSOR and attr.t.data_type in halves:
                    attr.t.CopyFrom(widened(attr.t))
    for half in halves:
        _retype_values(model, half, TensorProto.FLOAT)
