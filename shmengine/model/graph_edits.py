"""Edits made to a model's graph once, at load time, before any worker builds a session on it.

``gather_logit_positions``: an Optimum decoder export computes the language-model head for every
position it is given, so a 16-token prompt costs 16 rows of ``hidden x vocabulary`` (GPT-2:
16 x 768 x 50257 multiply-adds) although generation reads only the last one; on GPT-2-124M that
is about a tenth of all the arithmetic of a 16-token prompt + 32 new tokens. The edit puts a
``Gather`` on the head's input, driven by a new graph input ``shmengine_logit_positions``: the
generator feeds the last position when it generates and every position when it scores, so one
session (and one set of shared or prepacked weights) serves both.

The edit is made only where the head is recognised for certain: the ``logits`` output, of rank
3, computed by a ``MatMul`` with a 2-D initializer, possibly followed by element-wise ops with
constant operands that are the same at every position (a bias, a scale) and casts, possibly
inside the branches of an ``If`` (Optimum's merged decoders). Anything else is left exactly as
it is and decodes as before.

``expose_step_top`` (graphs run by the bound runner, a GPU's): adds the last position's top-k
values and ids and its log-normaliser as outputs of the model itself, with ``k`` a new input
(``STEP_TOP_K``). A greedy or beam step then brings its ``rows x k`` answer to the host from the
model's own run, where it would otherwise take a second, small ORT run on the device (the
runner's helper graph) and its synchronisation: at batch 1 on a GPU, where a GPT-2-124M step is
~4 ms of kernel launches, that second run is a measurable share. ``top_nodes`` builds the
reduction for both.
"""

from __future__ import annotations

from onnx import GraphProto, ModelProto, TensorProto, helper

__all__ = ["LOGIT_POSITIONS", "STEP_TOP", "STEP_TOP_K", "expose_step_top", "gather_logit_positions", "top_nodes"]

LOGIT_POSITIONS = "shmengine_logit_positions"
_POSITIONS_DIM = "shmengine_logit_positions"
STEP_TOP_K = "shmengine_top_k"
# the outputs expose_step_top adds: values [rows, k] float32, ids [rows, k] int64, normaliser [rows, 1]
STEP_TOP = ("shmengine_top_values", "shmengine_top_ids", "shmengine_top_normalizer")

# Element-wise ops that keep the sequence axis where it is when their other operand is a constant
# broadcast over it (a bias [V], a scalar scale).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}
_PASS_THROUGH = {"Cast", "Identity"}


def _constants(graph: GraphProto) -> dict[str, list[int]]:
    """Names of the graph's initializers and Constant outputs, with their dims."""
    found = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == attr.TENSOR:
                    found[node.output[0]] = list(attr.t.dims)
                elif attr.name in ("value_float", "value_int"):
                    found[node.output[0]] = []
    return found


def _head_inputs(graph: GraphProto, name: str, outer: dict[str, list[int]]):
    """Where the head's input is, if ``name`` comes from it by a position-wise chain, or None.

    Returns ``(heads, branch_outputs)``: the head MatMul of each path with the graph it is in,
    and the ``If`` branch outputs on the way (their declared sequence dim changes too).
    """
    constants = {**outer, **_constants(graph)}
    producers = {output: node for node in graph.node for output in node.output}
    while True:
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "MatMul":
            weight = constants.get(node.input[1])
            return ([(graph, node)], []) if weight is not None and len(weight) == 2 else None
        if node.op_type in _PASS_THROUGH:
            name = node.input[0]
        elif node.op_type in _ELEMENTWISE and len(node.input) == 2:
            dynamic = [i for i in node.input if i not in constants]
            static = [i for i in node.input if i in constants]
            if len(dynamic) != 1 or len(static) != 1 or not _same_for_every_position(constants[static[0]]):
                return None
            name = dynamic[0]
        elif node.op_type == "If":
            index = list(node.output).index(name)
            heads, branch_outputs = [], []
            for attr in node.attribute:
                if attr.type != attr.GRAPH:
                    return None
                branch = attr.g
                inside = _head_inputs(branch, branch.output[index].name, constants)
                if inside is None:
                    return None
                heads.extend(inside[0])
                branch_outputs.extend(inside[1] + [branch.output[index]])
            return heads, branch_outputs
        else:
            return None


def _same_for_every_position(dims: list[int]) -> bool:
    """Whether a constant broadcast against [batch, positions, vocab] is the same at every position:
    a scalar or a vector, or a tensor whose axis facing the positions has size 1 (Marian's
    ``final_logits_bias`` is [1, vocab])."""
    return len(dims) < 2 or dims[-2] == 1


def _set_sequence_dim(value) -> None:
    shape = value.type.tensor_type.shape
    if value.type.tensor_type.HasField("shape") and len(shape.dim) == 3:
        shape.dim[1].Clear()
        shape.dim[1].dim_param = _POSITIONS_DIM


def gather_logit_positions(model: ModelProto) -> bool:
    """Make ``logits`` cover only the positions given in ``LOGIT_POSITIONS``; True if edited."""
    graph = model.graph
    outputs = {o.name: o for o in graph.output}
    logits = outputs.get("logits")
    if logits is None or len(logits.type.tensor_type.shape.dim) != 3:
        return False
    if LOGIT_POSITIONS in {i.name for i in graph.input}:
        return True  # edited already
    found = _head_inputs(graph, "logits", {})
    if found is None:
        return False
    heads, branch_outputs = found
    for target_graph, head in heads:
        hidden = head.input[0]
        gathered = f"{hidden}/shmengine_logit_positions"
        gather = helper.make_node(
            "Gather", [hidden, LOGIT_POSITIONS], [gathered], axis=1, name=f"{head.name or 'head'}/shmengine_gather"
        )
        # right before the head: its input is computed by then, and the order stays topological
        target_graph.node.insert(list(target_graph.node).index(head), gather)
        head.input[0] = gathered
    for value in branch_outputs + [logits]:
        _set_sequence_dim(value)
    graph.input.append(helper.make_tensor_value_info(LOGIT_POSITIONS, TensorProto.INT64, [_POSITIONS_DIM]))
    return True


def top_nodes(logits: str, outputs: tuple[str, str, str] | tuple[str, str], *, k: str | None, prefix: str,
              positions: bool = True) -> list:
    """Nodes taking ``logits`` [rows, positions, V] (any float type; with ``positions=False``
    float32 [rows, V]) to the last position's top-k values (float32) and ids (int64), and its
    log-sum-exp [rows, 1] if ``outputs`` names a third output, as max + log(sum(exp(x - max)))
    so that no row overflows. ``k``: the name of an int64 [1] tensor, or None for the top-1 by
    ArgMax (the first index among equals; TopK too puts the lower index first among equals, by
    the ONNX spec). Intermediate names start with ``prefix``.

    The row maximum is read off the top-1 (GatherElements at the ArgMax, or TopK's first
    value), never taken by ReduceMax: measured on an H200 at 32 x 50,257, ORT's CUDA ReduceMax
    costs 2.9 ms a run (ReduceLogSumExp 5.5 ms), ArgMax 0.06, TopK(8) 0.09, ReduceSum 0.06."""

    def name(part: str) -> str:
        return f"{prefix}{part}"

    def const(part, values):
        return helper.make_node(
            "Constant", [], [name(part)], value=helper.make_tensor(name(part), TensorProto.INT64, [len(values)], values)
        )

    values, ids = outputs[0], outputs[1]
    nodes = [const("minus_one", [-1]), const("zero", [0]), const("one", [1])]
    x = logits  # [rows, V] float32, what the reduction reads
    if positions:
        x = name("x")
        nodes += [
            const("end", [2**62]),
            helper.make_node("Slice", [logits, name("minus_one"), name("end"), name("one")], [name("last3")]),
            helper.make_node("Squeeze", [name("last3"), name("one")], [name("last")]),
            helper.make_node("Cast", [name("last")], [x], to=TensorProto.FLOAT),
        ]
    if k is None:
        nodes += [
            helper.make_node("ArgMax", [x], [ids], axis=-1, keepdims=1, select_last_index=0),
            helper.make_node("GatherElements", [x, ids], [name("peak")], axis=1),
            helper.make_node("Identity", [name("peak")], [values]),
        ]
    else:
        nodes += [
            helper.make_node("TopK", [x, k], [values, ids], axis=-1, largest=1, sorted=1),
            helper.make_node("Slice", [values, name("zero"), name("one"), name("one")], [name("peak")]),
        ]
    if len(outputs) > 2:
        nodes += [
            helper.make_node("Sub", [x, name("peak")], [name("shifted")]),
            helper.make_node("Exp", [name("shifted")], [name("exps")]),
            helper.make_node("ReduceSum", [name("exps"), name("minus_one")], [name("total")], keepdims=1),
            helper.make_node("Log", [name("total")], [name("log_total")]),
            helper.make_node("Add", [name("peak"), name("log_total")], [outputs[2]]),
        ]
    return nodes


def expose_step_top(model: ModelProto) -> bool:
    """Add ``STEP_TOP`` outputs (the last position's top-``STEP_TOP_K`` of ``logits``) to a graph
    with a rank-3 ``logits`` output; True if edited. The ReduceSum here takes its axes as an
    input, which needs opset 13 or later: an older graph is left as it is."""
    graph = model.graph
    logits = next((o for o in graph.output if o.name == "logits"), None)
    if logits is None or len(logits.type.tensor_type.shape.dim) != 3:
        return False
    if STEP_TOP_K in {i.name for i in graph.input}:
        return True  # edited already
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return False
    graph.node.extend(top_nodes("logits", STEP_TOP, k=STEP_TOP_K, prefix="shmengine_top/"))
    graph.input.append(helper.make_tensor_value_info(STEP_TOP_K, TensorProto.INT64, [1]))
    graph.output.extend([
        helper.make_tensor_value_info(STEP_TOP[0], TensorProto.FLOAT, ["shmengine_rows", "shmengine_k"]),
        helper.make_tensor_value_info(STEP_TOP[1], TensorProto.INT64, ["shmengine_rows", "shmengine_k"]),
        helper.make_tensor_value_info(STEP_TOP[2], TensorProto.FLOAT, ["shmengine_rows", 1]),
    ])
    return True
