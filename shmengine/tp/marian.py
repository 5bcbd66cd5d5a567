"""Marian (an Optimum ``text2text-generation-with-past`` export: encoder + merged decoder)
split over tensor-parallel ranks.

Megatron's split in every attention (encoder self-attention, decoder self- and cross-attention:
``q/k/v_proj`` by columns, a block of whole heads, ``out_proj`` by rows) and every FFN
(``fc1`` by columns, ``fc2`` by rows); each partial sum gets its bias on rank 0 only. Marian is
post-norm (``h = LayerNorm(h + block(h))``), so the residual add and the LayerNorm run on the
rank after each all-reduce, in numpy, replicated. The cross-attention keys and values are made
once per batch from the encoder states by a segment of their own (this rank's heads) and kept
as the ``past_key_values.N.encoder.*`` cache, as the merged decoder's first step does.
The LM head (and ``final_logits_bias``) by vocabulary, a block per rank, gathered after it; a
block of rows of the shared embedding when the export's head equals it (one copy). The shared
embedding by vocabulary too (``sharding.EmbeddingBlock``, summed over the ranks, for the
encoder and the decoder). Replicated: the sinusoidal positions and the LayerNorms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import helper

from shmengine.errors import ModelLoadError

from .gpt2 import EvenHeads, Segment, _float, _model, _tensor, held_nbytes, read_weights
from .sharding import EmbeddingBlock, Shard, head_block

__all__ = ["MarianShard", "load_marian_shard"]


@dataclass
class MarianLayout:
    encoder_layers: int
    decoder_layers: int
    hidden: int
    heads: int
    inner: int
    scale: float
    activation: str


def _weight(found, name: str, index: int | None = None) -> np.ndarray:
    if name not in found:
        raise ModelLoadError(f"the graph has no node {name!r}: not an Optimum Marian export this engine can split")
    values = [v for v in found[name][1] if v is not None]
    return np.ascontiguousarray(values[0], dtype=np.float32)


def _linear(found, base: str) -> tuple[np.ndarray, np.ndarray]:
    """[in, out] weight (the MatMul) and bias (the Add after it) of a projection."""
    return _weight(found, f"{base}/MatMul"), _weight(found, f"{base}/Add")


def _norm(found, name: str) -> tuple[np.ndarray, np.ndarray]:
    if name not in found:
        raise ModelLoadError(f"the graph has no node {name!r}: not an Optimum Marian export this engine can split")
    _, values = found[name]
    return values[1], values[2]


def layer_norm(x: np.ndarray, norm: tuple[np.ndarray, np.ndarray], eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return (centered / np.sqrt(var + np.float32(eps)) * norm[0] + norm[1]).astype(np.float32)


def _heads(x: str, weight: str, bias: str, shape: str, nodes: list) -> str:
    nodes += [
        helper.make_node("MatMul", [x, weight], [f"{weight}_y"]),
        helper.make_node("Add", [f"{weight}_y", bias], [f"{weight}_yb"]),
        helper.make_node("Reshape", [f"{weight}_yb", shape], [f"{weight}_4"]),
        helper.make_node("Transpose", [f"{weight}_4"], [f"{weight}_h"], perm=[0, 2, 1, 3]),
    ]
    return f"{weight}_h"


def _cols(shard: Shard, dim: int) -> np.ndarray:
    return np.r_[shard.heads.start * dim : shard.heads.stop * dim]


def _attention(name: str, layout: MarianLayout, shard: Shard, q, k, v, o, *, cache: str) -> Segment:
    """cache "self": h, bias, past_k, past_v -> out, present_k, present_v (the decoder's);
    "none": h, bias -> out (the encoder's); "given": h, bias, key, value -> out (cross)."""
    dim = layout.hidden // layout.heads
    heads = len(shard.heads)
    cols = _cols(shard, dim)
    weights = {"wq": q[0][:, cols], "bq": q[1][cols], "wo": o[0][cols, :]}
    if cache != "given":
        weights.update({"wk": k[0][:, cols], "bk": k[1][cols], "wv": v[0][:, cols], "bv": v[1][cols]})
    inits = [_tensor("heads_shape", np.array([0, 0, heads, dim], np.int64)),
             _tensor("merged", np.array([0, 0, heads * dim], np.int64)), _tensor("scale", np.array(dim ** -0.5, np.float32))]
    nodes: list = []
    qh = _heads("h", "wq", "bq", "heads_shape", nodes)
    if cache == "given":
        keys, values = "key", "value"
    else:
        kh = _heads("h", "wk", "bk", "heads_shape", nodes)
        vh = _heads("h", "wv", "bv", "heads_shape", nodes)
        if cache == "self":
            nodes += [helper.make_node("Concat", ["past_k", kh], ["present_k"], axis=2),
                      helper.make_node("Concat", ["past_v", vh], ["present_v"], axis=2)]
            keys, values = "present_k", "present_v"
        else:
            keys, values = kh, vh
    nodes += [
        helper.make_node("Transpose", [keys], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [qh, "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s1"]),
        helper.make_node("Add", ["s1", "bias"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", values], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o3", "merged"], ["oo"]),
        helper.make_node("MatMul", ["oo", "wo"], ["out0"] if shard.rank == 0 else ["out"]),
    ]
    if shard.rank == 0:
        weights["bo"] = o[1]
        nodes.append(helper.make_node("Add", ["out0", "bo"], ["out"]))
    inputs = [_float("h", ["b", "s", layout.hidden]), _float("bias", ["bb", 1, "sb", "t"])]
    outputs = [_float("out", ["b", "s", layout.hidden])]
    if cache == "self":
        inputs += [_float("past_k", ["b", heads, "p", dim]), _float("past_v", ["b", heads, "p", dim])]
        outputs += [_float("present_k", ["b", heads, "t", dim]), _float("present_v", ["b", heads, "t", dim])]
    elif cache == "given":
        inputs += [_float("key", ["b", heads, "t", dim]), _float("value", ["b", heads, "t", dim])]
    return _model(nodes, inputs, outputs, inits, f"{name}_rank_{shard.rank}", weights)


def _cross_kv(name: str, layout: MarianLayout, shard: Shard, k, v) -> Segment:
    """encoder states [b, S, E] -> this rank's cross-attention keys and values [b, h, S, D]."""
    dim = layout.hidden // layout.heads
    cols = _cols(shard, dim)
    weights = {"wk": k[0][:, cols], "bk": k[1][cols], "wv": v[0][:, cols], "bv": v[1][cols]}
    inits = [_tensor("heads_shape", np.array([0, 0, len(shard.heads), dim], np.int64))]
    nodes: list = []
    kh = _heads("h", "wk", "bk", "heads_shape", nodes)
    vh = _heads("h", "wv", "bv", "heads_shape", nodes)
    nodes += [helper.make_node("Identity", [kh], ["key"]), helper.make_node("Identity", [vh], ["value"])]
    heads = len(shard.heads)
    return _model(nodes, [_float("h", ["b", "s", layout.hidden])],
                  [_float("key", ["b", heads, "s", dim]), _float("value", ["b", heads, "s", dim])], inits,
                  f"{name}_rank_{shard.rank}", weights)


def _ffn(name: str, layout: MarianLayout, shard: Shard, fc1, fc2) -> Segment:
    units = np.r_[shard.hidden.start : shard.hidden.stop]
    weights = {"w1": fc1[0][:, units], "b1": fc1[1][units], "w2": fc2[0][units, :]}
    nodes = [helper.make_node("MatMul", ["h", "w1"], ["f0"]), helper.make_node("Add", ["f0", "b1"], ["f"])]
    if layout.activation in ("swish", "silu"):
        nodes += [helper.make_node("Sigmoid", ["f"], ["fs"]), helper.make_node("Mul", ["f", "fs"], ["g"])]
    elif layout.activation == "relu":
        nodes.append(helper.make_node("Relu", ["f"], ["g"]))
    else:
        raise ModelLoadError(f"activation {layout.activation!r} is not built for the tensor-parallel Marian")
    nodes.append(helper.make_node("MatMul", ["g", "w2"], ["out0"] if shard.rank == 0 else ["out"]))
    if shard.rank == 0:
        weights["b2"] = fc2[1]
        nodes.append(helper.make_node("Add", ["out0", "b2"], ["out"]))
    hidden = layout.hidden
    return _model(nodes, [_float("h", ["b", "s", hidden])], [_float("out", ["b", "s", hidden])], [],
                  f"{name}_rank_{shard.rank}", weights)


def _head(layout: MarianLayout, shard: Shard, weight: np.ndarray | EmbeddingBlock, bias: np.ndarray) -> Segment:
    """h [r, E] -> this rank's block of the logits [r, V / N] + its part of final_logits_bias;
    a tied head's block is the embedding's block [V / N, E] itself."""
    tied = isinstance(weight, EmbeddingBlock)
    if tied:
        block, sizes = weight.rows, weight.sizes
        columns = range(weight.start, weight.start + len(weight.rows))
    else:
        block, sizes, columns = head_block(weight, shard.rank, shard.ranks)
    nodes = [helper.make_node("Gemm", ["h", "w", "c"], ["logits"], transB=1 if tied else 0)]
    segment = _model(nodes, [_float("h", ["r", layout.hidden])], [_float("logits", ["r", sizes[shard.rank]])], [],
                     f"marian_head_rank_{shard.rank}", {"w": block, "c": bias.reshape(-1)[columns.start : columns.stop]})
    segment.weights["w"] = block  # for a tied head, the embedding's block itself: held once
    segment.vocab_blocks = sizes
    return segment


@dataclass
class _EncoderLayer:
    attention: Segment
    attention_norm: tuple
    ffn: Segment
    ffn_norm: tuple


@dataclass
class _DecoderLayer:
    attention: Segment
    attention_norm: tuple
    cross_kv: Segment
    cross: Segment
    cross_norm: tuple
    ffn: Segment
    ffn_norm: tuple


@dataclass
class MarianShard(EvenHeads):
    layout: MarianLayout
    shard: Shard
    embedding: EmbeddingBlock
    encoder_positions: np.ndarray
    decoder_positions: np.ndarray
    encoder: list[_EncoderLayer]
    decoder: list[_DecoderLayer]
    head: Segment
    model_nbytes: int

    def segments(self) -> list[Segment]:
        found = [self.head]
        for layer in self.encoder:
            found += [layer.attention, layer.ffn]
        for layer in self.decoder:
            found += [layer.attention, layer.cross_kv, layer.cross, layer.ffn]
        return found

    @property
    def nbytes(self) -> int:
        norms = [n for layer in self.encoder for n in (layer.attention_norm, layer.ffn_norm)]
        norms += [n for layer in self.decoder for n in (layer.attention_norm, layer.cross_norm, layer.ffn_norm)]
        return held_nbytes(self.segments(), self.embedding.rows, self.encoder_positions, self.decoder_positions,
                           *(array for norm in norms for array in norm))


def read_layout(model_dir: Path) -> MarianLayout:
    config = json.loads((model_dir / "config.json").read_text())
    heads = int(config["encoder_attention_heads"])
    if int(config["decoder_attention_heads"]) != heads or config.get("encoder_ffn_dim") != config.get("decoder_ffn_dim"):
        raise ModelLoadError(f"{model_dir}: encoder and decoder of different shapes are not built for tensor parallelism")
    if config.get("normalize_before") or config.get("add_final_layer_norm"):
        raise ModelLoadError(f"{model_dir}: a pre-norm Marian/BART variant is not built for tensor parallelism yet")
    hidden = int(config["d_model"])
    return MarianLayout(
        encoder_layers=int(config["encoder_layers"]), decoder_layers=int(config["decoder_layers"]), hidden=hidden,
        heads=heads, inner=int(config["encoder_ffn_dim"]),
        scale=float(np.sqrt(hidden)) if config.get("scale_embedding") else 1.0,
        activation=config.get("activation_function", "swish"),
    )


def load_marian_shard(model_dir: Path, encoder_graph: Path, decoder_graph: Path, rank: int, ranks: int) -> MarianShard:
    layout = read_layout(model_dir)
    shard = Shard.of(rank, ranks, heads=layout.heads, kv_heads=layout.heads, hidden=layout.inner)
    (enc, encoder_nbytes), (dec, decoder_nbytes) = read_weights(encoder_graph), read_weights(decoder_graph)
    model_nbytes = encoder_nbytes + decoder_nbytes
    table = _weight(dec, "/model/decoder/shared/Gather")
    embedding = EmbeddingBlock(table, rank, ranks)
    encoder = []
    for i in range(layout.encoder_layers):
        p = f"/layers.{i}"
        encoder.append(_EncoderLayer(
            _attention(f"enc_attn_{i}", layout, shard, *(_linear(enc, f"{p}/self_attn/{x}_proj") for x in "qkv"),
                       _linear(enc, f"{p}/self_attn/out_proj"), cache="none"),
            _norm(enc, f"{p}/self_attn_layer_norm/LayerNormalization"),
            _ffn(f"enc_ffn_{i}", layout, shard, _linear(enc, f"{p}/fc1"), _linear(enc, f"{p}/fc2")),
            _norm(enc, f"{p}/final_layer_norm/LayerNormalization"),
        ))
    decoder = []
    for i in range(layout.decoder_layers):
        p = f"/model/decoder/layers.{i}"
        cross = [_linear(dec, f"{p}/encoder_attn/{x}_proj") for x in "qkv"]
        decoder.append(_DecoderLayer(
            _attention(f"dec_attn_{i}", layout, shard, *(_linear(dec, f"{p}/self_attn/{x}_proj") for x in "qkv"),
                       _linear(dec, f"{p}/self_attn/out_proj"), cache="self"),
            _norm(dec, f"{p}/self_attn_layer_norm/LayerNormalization"),
            _cross_kv(f"dec_cross_kv_{i}", layout, shard, cross[1], cross[2]),
            _attention(f"dec_cross_{i}", layout, shard, cross[0], None, None, _linear(dec, f"{p}/encoder_attn/out_proj"),
                       cache="given"),
            _norm(dec, f"{p}/encoder_attn_layer_norm/LayerNormalization"),
            _ffn(f"dec_ffn_{i}", layout, shard, _linear(dec, f"{p}/fc1"), _linear(dec, f"{p}/fc2")),
            _norm(dec, f"{p}/final_layer_norm/LayerNormalization"),
        ))
    lm_head = _weight(dec, "/lm_head/MatMul")
    tied = lm_head.shape == table.T.shape and np.array_equal(lm_head, table.T)
    head = _head(layout, shard, embedding if tied else lm_head, _weight(dec, "/Add"))
    return MarianShard(layout, shard, embedding, _weight(enc, "/embed_positions/Gather"),
                       _weight(dec, "/model/decoder/embed_positions/Gather"), encoder, decoder, head, model_nbytes)
