"""GPT-2 (an Optimum ``text-generation-with-past`` export) split over tensor-parallel ranks.

The weights are found by the exporter's node names (``/transformer/h.3/attn/c_attn/Gemm``...),
not by initializer names: the exporter merges initializers that hold equal values (every
LayerNorm of a fresh model), so one name may serve many nodes. Megatron's split:

* attention: ``c_attn`` (the fused q|k|v projection) by columns, a block of whole heads per
  rank from each of q, k and v; ``c_proj`` by rows, the same heads. Each rank's output is a
  partial sum; the bias is added on rank 0 only, so the sum over ranks adds it once.
* MLP: ``c_fc`` by columns (a block of hidden units), ``c_proj`` by rows (the same units).
* LM head: by vocabulary, a block of rows per rank (``sharding.head_block``); the ranks gather
  their blocks of logits after it. When the export's head equals the token embedding
  transposed (it stores the tied head twice), the block is the rank's block of the embedding:
  one copy. Split rather than replicated because at batch 1 the head is a third of
  GPT-2-124M's multiply-adds: replicated, N = 2 gave 0.73x one process's latency on the
  16-core machine (split: 0.58x).
* token embedding: by vocabulary too (``sharding.EmbeddingBlock``), summed over the ranks.
* replicated: the position embedding and the LayerNorms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from shmengine.errors import ModelLoadError

from .sharding import EmbeddingBlock, Shard, head_block

__all__ = ["Gpt2Layout", "Gpt2Shard", "load_gpt2_shard"]

OPSET = 18
IR_VERSION = 8


@dataclass
class Gpt2Layout:
    layers: int
    hidden: int
    heads: int
    inner: int
    epsilon: float
    activation: str


@dataclass
class Segment:
    """One graph between two all-reduces. ``weights`` are fed to the session in place
    (``add_initializer``, no copy: the rank holds each array once); the graph carries only
    small constants."""

    graph: onnx.ModelProto
    weights: dict[str, np.ndarray]
    # an LM head split by vocabulary: every rank's block size, in rank order (the runner gathers
    # the rank's logits with the others' after it); None for segments whose outputs are summed
    vocab_blocks: tuple[int, ...] | None = None

    def placeholder_graph(self, weights: bool = False) -> onnx.ModelProto:
        """The graph with zero initializers the weights' shapes, which ``add_initializer``
        replaces (ORT's shape inference needs the shapes; the zeros exist only while the
        session is created); with ``weights``, the weights themselves as initializers."""
        graph = onnx.ModelProto()
        graph.CopyFrom(self.graph)
        graph.graph.initializer.extend(_tensor(n, a if weights else np.zeros(a.shape, a.dtype))
                                       for n, a in self.weights.items())
        return graph


class EvenHeads:
    """For shards whose key/value heads are their query heads (no GQA): the cache's shape."""

    @property
    def head_dim(self) -> int:
        return self.layout.hidden // self.layout.heads

    @property
    def cache_heads(self) -> int:
        return len(self.shard.heads)


@dataclass
class Gpt2Shard(EvenHeads):
    """One rank's GPT-2: replicated arrays, and per layer the segment graphs of its shard."""

    layout: Gpt2Layout
    shard: Shard
    wte: EmbeddingBlock
    wpe: np.ndarray
    attention: list[Segment]
    mlp: list[Segment]
    head: Segment
    model_nbytes: int  # weight bytes of the whole model

    @property
    def nbytes(self) -> int:
        """Weight bytes this rank holds (each array once; the tied head is the embedding)."""
        return held_nbytes([*self.attention, *self.mlp, self.head], self.wte.rows, self.wpe)

    def embed(self, ids: np.ndarray, positions: np.ndarray, comm) -> np.ndarray:
        """The input of the first layer (collective: the token embedding is summed over the ranks)."""
        return comm.sum(self.wte.lookup(ids)) + self.wpe[positions]

    def attention_feeds(self, positions: np.ndarray) -> dict:
        return {}


def held_nbytes(segments: list[Segment], *arrays: np.ndarray) -> int:
    """Bytes of the segments' weights and of ``arrays``, each array counted once (segments share
    arrays: a tied head is the embedding itself)."""
    held = {id(a): a for segment in segments for a in segment.weights.values()}
    held.update((id(a), a) for a in arrays)
    # a view of a held array (a tied head's vocabulary block of the embedding) costs nothing more
    return sum(a.nbytes for a in held.values() if not (isinstance(a.base, np.ndarray) and id(a.base) in held))


def read_weights(graph: Path) -> tuple[dict[str, tuple], int]:
    """The export's weights by node name (:func:`_node_weights`) and the weight bytes of the
    whole graph (what one plain process holds)."""
    model = onnx.load(str(graph))
    model_nbytes = sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
    return _node_weights(model), model_nbytes


def layer_segments(layers: int, prefix: str, attention, mlp) -> tuple[list[Segment], list[Segment]]:
    """Each layer's attention and MLP segments: ``attention(i, p)`` and ``mlp(i, p)``, ``p``
    being layer i's node-name prefix (``prefix`` + i)."""
    pairs = [(attention(i, f"{prefix}{i}"), mlp(i, f"{prefix}{i}")) for i in range(layers)]
    return [a for a, _ in pairs], [m for _, m in pairs]


def _node_weights(model: onnx.ModelProto) -> dict[str, tuple]:
    """Node name -> (node, the value of each input that is a weight, else None). The exporter
    also shares equal weights through ``Identity`` nodes: those names resolve to the source."""
    arrays = {i.name: i for i in model.graph.initializer}
    nodes = list(_walk(model.graph))  # merged decoders keep their nodes inside If branches
    alias = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Identity"}

    def source(name: str) -> str:
        seen = 0
        while name not in arrays and name in alias and seen < 64:
            name, seen = alias[name], seen + 1
        return name

    values: dict[str, np.ndarray] = {}
    found = {}
    for node in nodes:
        if node.name in found:
            continue  # the same node in the other branch of a merged decoder
        names = [source(n) for n in node.input]
        if node.op_type != "Identity" and any(n in arrays for n in names):
            for n in names:
                if n in arrays and n not in values:
                    values[n] = numpy_helper.to_array(arrays[n])
            found[node.name] = (node, [values.get(n) for n in names])
    return found


def _walk(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _walk(attribute.g)


def _linear(found, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[in, out] weight and bias of a Gemm or MatMul node."""
    if name not in found:
        raise ModelLoadError(f"the graph has no node {name!r}: not an Optimum GPT-2 export this engine can split")
    node, values = found[name]
    weight = values[1]
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB", 0):
            weight = weight.T
        bias = values[2] if len(values) > 2 else None
        return np.ascontiguousarray(weight, dtype=np.float32), bias
    return np.ascontiguousarray(weight, dtype=np.float32), None


def _norm(found, name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in found:
        raise ModelLoadError(f"the graph has no node {name!r}: not an Optimum GPT-2 export this engine can split")
    _, values = found[name]
    return values[1], values[2]


def _tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _model(nodes, inputs, outputs, constants, name: str, weights: dict[str, np.ndarray]) -> Segment:
    graph = helper.make_graph(nodes, name, inputs, outputs, constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return Segment(model, {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in weights.items()})


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _attention_graph(layer: int, layout: Gpt2Layout, shard: Shard, norm, qkv, proj) -> Segment:
    """h [b, s, E], bias [b, 1, s, t], past k/v [b, h, p, D] -> partial [b, s, E], present k/v."""
    hidden, dim = layout.hidden, layout.hidden // layout.heads
    local = len(shard.heads) * dim
    cols = np.r_[shard.heads.start * dim : shard.heads.stop * dim]
    weight, bias = qkv
    w = np.concatenate([weight[:, part * hidden + cols] for part in range(3)], axis=1)
    b = np.concatenate([bias[part * hidden + cols] for part in range(3)])
    wo, bo = proj
    wo = wo[cols, :]
    heads = len(shard.heads)
    weights = {"ln_g": norm[0], "ln_b": norm[1], "w_qkv": w, "b_qkv": b, "w_o": wo}
    inits = [
        _tensor("split", np.array([local] * 3, np.int64)), _tensor("heads_shape", np.array([0, 0, heads, dim], np.int64)),
        _tensor("merged_shape", np.array([0, 0, local], np.int64)), _tensor("scale", np.array(np.sqrt(dim), np.float32)),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["h", "ln_g", "ln_b"], ["a"], axis=-1, epsilon=layout.epsilon),
        helper.make_node("MatMul", ["a", "w_qkv"], ["qkv0"]),
        helper.make_node("Add", ["qkv0", "b_qkv"], ["qkv"]),
        helper.make_node("Split", ["qkv", "split"], ["q2", "k2", "v2"], axis=-1),
    ]
    for x in ("q", "k", "v"):
        nodes += [
            helper.make_node("Reshape", [f"{x}2", "heads_shape"], [f"{x}4"]),
            helper.make_node("Transpose", [f"{x}4"], [f"{x}h"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Concat", ["past_k", "kh"], ["present_k"], axis=2),
        helper.make_node("Concat", ["past_v", "vh"], ["present_v"], axis=2),
        helper.make_node("Transpose", ["present_k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qh", "kt"], ["s0"]),
        helper.make_node("Div", ["s0", "scale"], ["s1"]),
        helper.make_node("Add", ["s1", "bias"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "present_v"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o3", "merged_shape"], ["o"]),
        helper.make_node("MatMul", ["o", "w_o"], ["out0"] if shard.rank == 0 else ["out"]),
    ]
    if shard.rank == 0:  # the bias once, on one rank: the sum over ranks adds it once
        weights["b_o"] = bo
        nodes.append(helper.make_node("Add", ["out0", "b_o"], ["out"]))
    inputs = [_float("h", ["b", "s", hidden]), _float("bias", ["b", 1, "s", "t"]),
              _float("past_k", ["b", heads, "p", dim]), _float("past_v", ["b", heads, "p", dim])]
    outputs = [_float("out", ["b", "s", hidden]), _float("present_k", ["b", heads, "t", dim]),
               _float("present_v", ["b", heads, "t", dim])]
    return _model(nodes, inputs, outputs, inits, f"attention_{layer}_rank_{shard.rank}", weights)


def _gelu(nodes: list, inits: list, x: str, out: str, activation: str) -> None:
    if activation in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as transformers' NewGELUActivation
        inits += [_tensor("c_half", np.array(0.5, np.float32)), _tensor("c_one", np.array(1.0, np.float32)),
                  _tensor("c_cube", np.array(0.044715, np.float32)), _tensor("c_three", np.array(3.0, np.float32)),
                  _tensor("c_root", np.array(np.sqrt(2.0 / np.pi), np.float32))]
        nodes += [
            helper.make_node("Pow", [x, "c_three"], ["g_x3"]), helper.make_node("Mul", ["g_x3", "c_cube"], ["g_cx3"]),
            helper.make_node("Add", [x, "g_cx3"], ["g_in"]), helper.make_node("Mul", ["g_in", "c_root"], ["g_arg"]),
            helper.make_node("Tanh", ["g_arg"], ["g_t"]), helper.make_node("Add", ["g_t", "c_one"], ["g_1t"]),
            helper.make_node("Mul", [x, "c_half"], ["g_hx"]), helper.make_node("Mul", ["g_hx", "g_1t"], [out]),
        ]
    else:
        raise ModelLoadError(f"activation {activation!r} is not supported by the tensor-parallel GPT-2")


def _mlp_graph(layer: int, layout: Gpt2Layout, shard: Shard, norm, fc, proj) -> Segment:
    """h [b, s, E] -> partial [b, s, E] of this rank's hidden units."""
    units = np.r_[shard.hidden.start : shard.hidden.stop]
    wf, bf = fc
    wp, bp = proj
    weights = {"ln_g": norm[0], "ln_b": norm[1], "w_fc": wf[:, units], "b_fc": bf[units], "w_p": wp[units, :]}
    inits: list = []
    nodes = [
        helper.make_node("LayerNormalization", ["h", "ln_g", "ln_b"], ["m"], axis=-1, epsilon=layout.epsilon),
        helper.make_node("MatMul", ["m", "w_fc"], ["f0"]),
        helper.make_node("Add", ["f0", "b_fc"], ["f"]),
    ]
    _gelu(nodes, inits, "f", "g", layout.activation)
    nodes.append(helper.make_node("MatMul", ["g", "w_p"], ["out0"] if shard.rank == 0 else ["out"]))
    if shard.rank == 0:
        weights["b_p"] = bp
        nodes.append(helper.make_node("Add", ["out0", "b_p"], ["out"]))
    hidden = layout.hidden
    return _model(nodes, [_float("h", ["b", "s", hidden])], [_float("out", ["b", "s", hidden])], inits,
                  f"mlp_{layer}_rank_{shard.rank}", weights)


def _head_graph(layout: Gpt2Layout, shard: Shard, norm, lm_head: np.ndarray | EmbeddingBlock) -> Segment:
    """h [b, E] -> this rank's block of the logits [b, V / N]; a tied head (``lm_head`` the
    token embedding's block) is the embedding's rows themselves (a Gemm with transB: a
    Transpose node would be constant-folded into a second copy)."""
    tied = isinstance(lm_head, EmbeddingBlock)
    if tied:
        block, sizes = lm_head.rows, lm_head.sizes
    else:
        block, sizes, _ = head_block(lm_head, shard.rank, shard.ranks)
    weights = {"ln_g": norm[0], "ln_b": norm[1], "w": block}
    nodes = [
        helper.make_node("LayerNormalization", ["h", "ln_g", "ln_b"], ["n"], axis=-1, epsilon=layout.epsilon),
        helper.make_node("Gemm", ["n", "w"], ["logits"], transB=1 if tied else 0),
    ]
    segment = _model(nodes, [_float("h", ["r", layout.hidden])], [_float("logits", ["r", sizes[shard.rank]])], [],
                     f"head_rank_{shard.rank}", weights)
    segment.weights["w"] = block  # for a tied head, the embedding's block itself: held once
    segment.vocab_blocks = sizes
    return segment


def read_layout(model_dir: Path) -> Gpt2Layout:
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "gpt2":
        raise ModelLoadError(
            f"{model_dir}: model_type {config.get('model_type')!r}; tensor parallelism is built for GPT-2 exports so far"
        )
    hidden = int(config["n_embd"])
    return Gpt2Layout(
        layers=int(config["n_layer"]), hidden=hidden, heads=int(config["n_head"]),
        inner=int(config.get("n_inner") or 4 * hidden), epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        activation=config.get("activation_function", "gelu_new"),
    )


def load_gpt2_shard(model_dir: Path, graph: Path, rank: int, ranks: int) -> Gpt2Shard:
    """Rank ``rank``'s share of the GPT-2 export ``graph`` (in ``model_dir``)."""
    layout = read_layout(model_dir)
    shard = Shard.of(rank, ranks, heads=layout.heads, kv_heads=layout.heads, hidden=layout.inner)
    found, model_nbytes = read_weights(graph)
    table = found["/transformer/wte/Gather"][1][0]
    wte = EmbeddingBlock(table, rank, ranks)
    wpe = found["/transformer/wpe/Gather"][1][0]
    attention, mlp = layer_segments(
        layout.layers, "/transformer/h.",
        lambda i, p: _attention_graph(i, layout, shard, _norm(found, f"{p}/ln_1/LayerNormalization"),
                                      _linear(found, f"{p}/attn/c_attn/Gemm"), _linear(found, f"{p}/attn/c_proj/Gemm")),
        lambda i, p: _mlp_graph(i, layout, shard, _norm(found, f"{p}/ln_2/LayerNormalization"),
                                _linear(found, f"{p}/mlp/c_fc/Gemm"), _linear(found, f"{p}/mlp/c_proj/Gemm")))
    lm_head, _ = _linear(found, "/lm_head/MatMul")
    tied = lm_head.shape == table.T.shape and np.array_equal(lm_head, table.T)
    head = _head_graph(layout, shard, _norm(found, "/transformer/ln_f/LayerNormalization"), wte if tied else lm_head)
    return Gpt2Shard(layout, shard, wte, np.ascontiguousarray(wpe, dtype=np.float32), attention, mlp, head, model_nbytes)
