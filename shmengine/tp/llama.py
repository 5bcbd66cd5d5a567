"""Llama (an Optimum ``text-generation-with-past`` export, GQA included) split over ranks.

As GPT-2 (``gpt2.py``), Megatron's split: ``q_proj`` / ``k_proj`` / ``v_proj`` by columns (a
block of whole query heads and the block of key/value heads they read), ``o_proj`` by rows;
``gate_proj`` / ``up_proj`` by columns, ``down_proj`` by rows. With GQA the key/value heads are
split too, so N must divide ``num_key_value_heads`` (query head h reads kv head h // group, and
a block of kv heads serves exactly the matching block of query heads); a clear error says so
otherwise. ``lm_head`` by vocabulary (a block of columns per rank, the logits gathered after
it; a tied head is the rank's block of the embedding), the token embedding by vocabulary too
(``sharding.EmbeddingBlock``). Replicated: the RMSNorms. The rotary cos/sin
depend only on the positions: computed once per step on the rank (as transformers does, in
float32) and fed to every layer's attention segment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import helper

from shmengine.errors import ModelLoadError

from .gpt2 import Segment, _float, _linear, _model, _tensor, held_nbytes, layer_segments, read_weights
from .sharding import EmbeddingBlock, Shard, head_block

__all__ = ["LlamaLayout", "LlamaShard", "load_llama_shard"]


@dataclass
class LlamaLayout:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inner: int
    epsilon: float
    theta: float


@dataclass
class LlamaShard:
    layout: LlamaLayout
    shard: Shard
    embedding: EmbeddingBlock
    attention: list[Segment]
    mlp: list[Segment]
    head: Segment
    model_nbytes: int

    @property
    def head_dim(self) -> int:
        return self.layout.head_dim

    @property
    def cache_heads(self) -> int:
        return len(self.shard.kv_heads)

    @property
    def nbytes(self) -> int:
        return held_nbytes([*self.attention, *self.mlp, self.head], self.embedding.rows)

    def embed(self, ids: np.ndarray, positions: np.ndarray, comm) -> np.ndarray:
        """The input of the first layer (collective: the token embedding is summed over the ranks)."""
        return comm.sum(self.embedding.lookup(ids))

    def attention_feeds(self, positions: np.ndarray) -> dict:
        dim = self.layout.head_dim
        inv_freq = (1.0 / (self.layout.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
        freqs = positions.astype(np.float32)[:, :, None] * inv_freq[None, None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        return {"cos": np.cos(emb)[:, None].astype(np.float32), "sin": np.sin(emb)[:, None].astype(np.float32)}


def _rms_norm(nodes: list, inits: list, x: str, weight: str, out: str, eps: float, tag: str) -> None:
    """weight * x / sqrt(mean(x^2) + eps), as transformers' LlamaRMSNorm (in float32)."""
    inits += [_tensor(f"{tag}_axes", np.array([-1], np.int64)), _tensor(f"{tag}_eps", np.array(eps, np.float32))]
    nodes += [
        helper.make_node("Mul", [x, x], [f"{tag}_sq"]),
        helper.make_node("ReduceMean", [f"{tag}_sq", f"{tag}_axes"], [f"{tag}_var"], keepdims=1),
        helper.make_node("Add", [f"{tag}_var", f"{tag}_eps"], [f"{tag}_ve"]),
        helper.make_node("Sqrt", [f"{tag}_ve"], [f"{tag}_std"]),
        helper.make_node("Reciprocal", [f"{tag}_std"], [f"{tag}_inv"]),
        helper.make_node("Mul", [x, f"{tag}_inv"], [f"{tag}_n"]),
        helper.make_node("Mul", [weight, f"{tag}_n"], [out]),
    ]


def _rope(nodes: list, x: str, out: str, half: str) -> None:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    nodes += [
        helper.make_node("Split", [x, half], [f"{x}_1", f"{x}_2"], axis=-1),
        helper.make_node("Neg", [f"{x}_2"], [f"{x}_n2"]),
        helper.make_node("Concat", [f"{x}_n2", f"{x}_1"], [f"{x}_rot"], axis=-1),
        helper.make_node("Mul", [x, "cos"], [f"{x}_c"]),
        helper.make_node("Mul", [f"{x}_rot", "sin"], [f"{x}_s"]),
        helper.make_node("Add", [f"{x}_c", f"{x}_s"], [out]),
    ]


def _attention_graph(layer: int, layout: LlamaLayout, shard: Shard, norm, wq, wk, wv, wo) -> Segment:
    dim = layout.head_dim
    heads, kv = len(shard.heads), len(shard.kv_heads)
    group = layout.heads // layout.kv_heads
    q_cols = np.r_[shard.heads.start * dim : shard.heads.stop * dim]
    kv_cols = np.r_[shard.kv_heads.start * dim : shard.kv_heads.stop * dim]
    weights = {"ln": norm, "wq": wq[:, q_cols], "wk": wk[:, kv_cols], "wv": wv[:, kv_cols], "wo": wo[q_cols, :]}
    inits = [
        _tensor("q_shape", np.array([0, 0, heads, dim], np.int64)), _tensor("kv_shape", np.array([0, 0, kv, dim], np.int64)),
        _tensor("q5_shape", np.array([0, kv, group, -1, dim], np.int64)), _tensor("o4_shape", np.array([0, heads, -1, dim], np.int64)),
        _tensor("merged", np.array([0, 0, heads * dim], np.int64)), _tensor("half", np.array([dim // 2, dim // 2], np.int64)),
        _tensor("axis1", np.array([1], np.int64)), _tensor("axis2", np.array([2], np.int64)),
        _tensor("scale", np.array(dim ** -0.5, np.float32)),
    ]
    nodes: list = []
    _rms_norm(nodes, inits, "h", "ln", "a", layout.epsilon, "n")
    for name, weight, shape in (("q", "wq", "q_shape"), ("k", "wk", "kv_shape"), ("v", "wv", "kv_shape")):
        nodes += [
            helper.make_node("MatMul", ["a", weight], [f"{name}2"]),
            helper.make_node("Reshape", [f"{name}2", shape], [f"{name}4"]),
            helper.make_node("Transpose", [f"{name}4"], [f"{name}h"], perm=[0, 2, 1, 3]),
        ]
    _rope(nodes, "qh", "qr", "half")
    _rope(nodes, "kh", "kr", "half")
    nodes += [
        helper.make_node("Concat", ["past_k", "kr"], ["present_k"], axis=2),
        helper.make_node("Concat", ["past_v", "vh"], ["present_v"], axis=2),
        # query heads of one kv head side by side: [b, kv, group, s, D] against [b, kv, 1, t, D]
        helper.make_node("Reshape", ["qr", "q5_shape"], ["q5"]),
        helper.make_node("Unsqueeze", ["present_k", "axis2"], ["k5"]),
        helper.make_node("Unsqueeze", ["present_v", "axis2"], ["v5"]),
        helper.make_node("Transpose", ["k5"], ["k5t"], perm=[0, 1, 2, 4, 3]),
        helper.make_node("MatMul", ["q5", "k5t"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Unsqueeze", ["bias", "axis1"], ["bias5"]),
        helper.make_node("Add", ["s1", "bias5"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v5"], ["o5"]),
        helper.make_node("Reshape", ["o5", "o4_shape"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o3", "merged"], ["o"]),
        helper.make_node("MatMul", ["o", "wo"], ["out"]),
    ]
    inputs = [_float("h", ["b", "s", layout.hidden]), _float("bias", ["b", 1, "s", "t"]),
              _float("past_k", ["b", kv, "p", dim]), _float("past_v", ["b", kv, "p", dim]),
              _float("cos", ["b", 1, "s", dim]), _float("sin", ["b", 1, "s", dim])]
    outputs = [_float("out", ["b", "s", layout.hidden]), _float("present_k", ["b", kv, "t", dim]),
               _float("present_v", ["b", kv, "t", dim])]
    return _model(nodes, inputs, outputs, inits, f"llama_attention_{layer}_rank_{shard.rank}", weights)


def _mlp_graph(layer: int, layout: LlamaLayout, shard: Shard, norm, gate, up, down) -> Segment:
    units = np.r_[shard.hidden.start : shard.hidden.stop]
    weights = {"ln": norm, "wg": gate[:, units], "wu": up[:, units], "wd": down[units, :]}
    inits: list = []
    nodes: list = []
    _rms_norm(nodes, inits, "h", "ln", "a", layout.epsilon, "n")
    nodes += [
        helper.make_node("MatMul", ["a", "wg"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["gs"]),
        helper.make_node("Mul", ["g", "gs"], ["silu"]),
        helper.make_node("MatMul", ["a", "wu"], ["u"]),
        helper.make_node("Mul", ["silu", "u"], ["m"]),
        helper.make_node("MatMul", ["m", "wd"], ["out"]),
    ]
    hidden = layout.hidden
    return _model(nodes, [_float("h", ["b", "s", hidden])], [_float("out", ["b", "s", hidden])], inits,
                  f"llama_mlp_{layer}_rank_{shard.rank}", weights)


def _head_graph(layout: LlamaLayout, shard: Shard, norm, lm_head: np.ndarray | EmbeddingBlock) -> Segment:
    """h [r, E] -> this rank's block of the logits [r, V / N] (``lm_head`` [E, V], by columns;
    a tied head, the embedding's block [V / N, E] itself, by a Gemm with transB)."""
    tied = isinstance(lm_head, EmbeddingBlock)
    if tied:
        block, sizes = lm_head.rows, lm_head.sizes
    else:
        block, sizes, _ = head_block(lm_head, shard.rank, shard.ranks)
    inits: list = []
    nodes: list = []
    _rms_norm(nodes, inits, "h", "ln", "n", layout.epsilon, "n")
    nodes.append(helper.make_node("Gemm", ["n", "w"], ["logits"], transB=1) if tied
                 else helper.make_node("MatMul", ["n", "w"], ["logits"]))
    segment = _model(nodes, [_float("h", ["r", layout.hidden])], [_float("logits", ["r", sizes[shard.rank]])], inits,
                     f"llama_head_rank_{shard.rank}", {"ln": norm, "w": block})
    segment.vocab_blocks = sizes
    return segment


def read_layout(model_dir: Path) -> LlamaLayout:
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("rope_scaling"):
        raise ModelLoadError(f"{model_dir}: rope_scaling {config['rope_scaling']!r} is not built for tensor parallelism yet")
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{model_dir}: biases or activation {config.get('hidden_act')!r}: only plain Llama is built")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return LlamaLayout(
        layers=int(config["num_hidden_layers"]), hidden=hidden, heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=int(config.get("head_dim") or hidden // heads),
        inner=int(config["intermediate_size"]), epsilon=float(config.get("rms_norm_eps", 1e-6)),
        theta=float(config.get("rope_theta", 10000.0)),
    )


def _weight_of(found, name: str) -> np.ndarray:
    if name not in found:
        raise ModelLoadError(f"the graph has no node {name!r}: not an Optimum Llama export this engine can split")
    return next(v for v in found[name][1] if v is not None)


def load_llama_shard(model_dir: Path, graph: Path, rank: int, ranks: int) -> LlamaShard:
    layout = read_layout(model_dir)
    shard = Shard.of(rank, ranks, heads=layout.heads, kv_heads=layout.kv_heads, hidden=layout.inner)
    found, model_nbytes = read_weights(graph)
    table = _weight_of(found, "/model/embed_tokens/Gather")
    embedding = EmbeddingBlock(table, rank, ranks)
    linear = lambda name: _linear(found, f"{name}/MatMul")[0]  # noqa: E731
    attention, mlp = layer_segments(
        layout.layers, "/model/layers.",
        lambda i, p: _attention_graph(i, layout, shard, _weight_of(found, f"{p}/input_layernorm/Mul_1"),
                                      *(linear(f"{p}/self_attn/{x}_proj") for x in "qkvo")),
        lambda i, p: _mlp_graph(i, layout, shard, _weight_of(found, f"{p}/post_attention_layernorm/Mul_1"),
                                *(linear(f"{p}/mlp/{x}_proj") for x in ("gate", "up", "down"))))
    lm_head = _linear(found, "/lm_head/MatMul")[0]
    tied = lm_head.shape == table.T.shape and np.array_equal(lm_head, table.T)
    head = _head_graph(layout, shard, _weight_of(found, "/model/norm/Mul_1"), embedding if tied else lm_head)
    return LlamaShard(layout, shard, embedding, attention, mlp, head, model_nbytes)
