""":class:`TensorParallelRunner`: a decoding runner over one rank's shard of the model.

It plugs in where :class:`runners.HostRunner` does: a stepper hands it the feeds of the whole
export (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.*``) and asks for
``logits`` and ``present.*``; it runs the rank's segments instead, all-reducing the partial
sums between them, and returns the same names. The cache tensors it returns hold this rank's
heads only (so ``empty()`` sizes them so), and the stepper never looks inside them.

:class:`GraphSignature` stands in for the export's session where a stepper reads names, types
and shapes (``get_inputs`` / ``get_outputs``): no session of the full model is ever made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from shmengine.decode.decoding import HostLogits
from shmengine.decode.runners import HOST, KEEP, LOGITS, HostRunner

from .comm import Communicator
from .gpt2 import Segment

__all__ = ["GraphSignature", "TensorParallelRunner", "Seq2SeqTensorParallelRunner", "create_session"]

_CACHE = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_ELEMENT_TYPES = {1: "tensor(float)", 10: "tensor(float16)", 7: "tensor(int64)", 6: "tensor(int32)", 9: "tensor(bool)"}


@dataclass
class _Meta:
    name: str
    type: str
    shape: list


class GraphSignature:
    """The inputs and outputs an ONNX file declares, as ``InferenceSession`` reports them."""

    def __init__(self, path: str | Path, role: str = "model"):
        self.role = role  # which segments a runner runs for it (encoder / decoder / model)
        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        self._inputs = [self._meta(v) for v in graph.input if v.name not in initializers]
        self._outputs = [self._meta(v) for v in graph.output]

    @staticmethod
    def _meta(value) -> _Meta:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
        return _Meta(value.name, _ELEMENT_TYPES.get(tensor.elem_type, "tensor(float)"), shape)

    def get_inputs(self) -> list[_Meta]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Meta]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]


_CPU = (("CPUExecutionProvider", {}),)


def create_session(segment: Segment, intra_threads: int, allow_spinning: bool = False, providers=_CPU):
    """An ORT session over ``segment`` whose weights are the segment's arrays (used in place on
    the CPU; a CUDA session copies them to its GPU once). ``allow_spinning``: ORT's pool threads
    spin for work between ops (``threads.plan_threads`` allows it only where a rank's threads fit
    its cores: spinning threads would otherwise take the CPU from the rank's other replicas, or
    from the rank they wait for)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3
    # prepacking would give the session a private copy of every MatMul weight
    options.add_session_config_entry("session.disable_prepacking", "1")
    names = [name for name, _ in providers]
    if "CUDAExecutionProvider" in names:
        # The weights go into the graph itself: a CUDA session keeps its own device copy anyway,
        # and given by add_initializer over the placeholder graph they were not used (seen on
        # the H200 with onnxruntime-gpu 1.31.1: every rank's logits came out
        # uniform, as from the zero placeholders).
        graph = segment.placeholder_graph(weights=True)
        return ort.InferenceSession(graph.SerializeToString(), options, providers=names,
                                    provider_options=[dict(o) for _, o in providers])
    values = []
    for name, array in segment.weights.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(name, value)
        values.append(value)
    session = ort.InferenceSession(segment.placeholder_graph().SerializeToString(), options, providers=names,
                                   provider_options=[dict(o) for _, o in providers])
    session._shmengine_weights = values  # ORT does not keep them alive: the session must
    return session


def _length(cache) -> int:
    """The positions a cache tensor [batch, heads, positions, dim] holds (numpy or OrtValue)."""
    return cache.shape[2] if isinstance(cache, np.ndarray) else cache.shape()[2]


class _ShardRunner(HostRunner):
    """What the decoder-only and the seq2seq shard runners share: how the rank's segments run,
    the cache shape of this rank's heads, and the LM head over this rank's block of the
    vocabulary.

    Segments run on the CPU with numpy arrays, or through ``bound`` (a
    :class:`runners.BoundRunner`: IOBinding on its device, a GPU's for ``device="cuda"``): the
    KV caches then stay on the device between steps and are reordered there, and only the
    partial sums the ranks add up, the hidden states [batch, positions, E], travel through host
    memory to MPI's all-reduce (no NCCL: a GPU's all-reduce through host memory, see the
    README)."""

    def _start(self, shard, comm: Communicator, intra_threads: int, allow_spinning: bool, bound=None):
        self.shard, self.comm, self.bound = shard, comm, bound
        providers = _CPU if bound is None else tuple(zip(bound.providers, bound.provider_options))
        self._names: dict = {}
        self.min = np.finfo(np.float32).min
        return lambda segment: create_session(segment, intra_threads, allow_spinning, providers)

    def _call(self, session, feeds: dict, kept: tuple[str, ...] = ()) -> list:
        """``session``'s outputs in its order: host arrays, except ``kept`` (caches), which the
        bound runner leaves on its device."""
        if self.bound is None:
            return session.run(None, feeds)
        names = self._names.get(session)
        if names is None:
            names = self._names[session] = [o.name for o in session.get_outputs()]
        out = self.bound.run(session, feeds, {n: KEEP if n in kept else HOST for n in names})
        return [out[n] for n in names]

    def take(self, tensors, rows):
        return super().take(tensors, rows) if self.bound is None else self.bound.take(tensors, rows)

    def empty(self, meta, batch: int):
        return np.zeros((batch, self.shard.cache_heads, 0, self.shard.head_dim), dtype=np.float32)

    def _head(self, rows: np.ndarray) -> np.ndarray:
        """The LM head over ``rows`` [r, E]: this rank's block of the vocabulary, gathered with the
        other ranks' into the whole logits [r, V] (every rank gets them, as every rank decodes)."""
        (block,) = self._call(self.head, {"h": np.ascontiguousarray(rows)})
        sizes = self.shard.head.vocab_blocks
        return block if sizes is None else self.comm.gather_columns(block, sizes)


class TensorParallelRunner(_ShardRunner):
    """Runs one rank's shard (GPT-2 or Llama) for a :class:`steppers.DecoderOnlyStepper`."""

    def __init__(self, shard, comm: Communicator, intra_threads: int = 1, allow_spinning: bool = False, bound=None):
        session = self._start(shard, comm, intra_threads, allow_spinning, bound)
        self.attention = [session(s) for s in shard.attention]
        self.mlp = [session(s) for s in shard.mlp]
        self.head = session(shard.head)


    def run(self, session, feeds, fetch):
        ids = np.asarray(feeds["input_ids"])
        batch, length = ids.shape
        layers = self.shard.layout.layers
        past = [(feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"]) for i in range(layers)]
        before = _length(past[0][0])
        total = before + length
        mask = np.asarray(feeds["attention_mask"]) if "attention_mask" in feeds else np.ones((batch, total), np.int64)
        if "position_ids" in feeds:
            positions = np.asarray(feeds["position_ids"])
        else:
            positions = np.broadcast_to(np.arange(before, total), (batch, length))
        h = self.shard.embed(ids, positions, self.comm)
        extra = self.shard.attention_feeds(positions)
        causal = np.arange(total)[None, :] <= (before + np.arange(length))[:, None]  # [s, t]
        allowed = causal[None, :, :] & (mask[:, None, :] != 0)
        bias = np.where(allowed, np.float32(0), self.min).astype(np.float32)[:, None, :, :]
        outputs = {}
        for i in range(layers):
            out, present_k, present_v = self._call(
                self.attention[i], {"h": h, "bias": bias, "past_k": past[i][0], "past_v": past[i][1], **extra},
                kept=("present_k", "present_v"),
            )
            h = h + self.comm.sum(out)
            (out,) = self._call(self.mlp[i], {"h": h})
            h = h + self.comm.sum(out)
            outputs[f"present.{i}.key"], outputs[f"present.{i}.value"] = present_k, present_v
        where = fetch.get("logits", LOGITS)
        rows = h[:, -1, :] if where == LOGITS else h.reshape(batch * length, -1)
        logits = self._head(rows)
        if where == HOST:
            outputs["logits"] = logits.reshape(batch, length, -1)
        else:
            outputs["logits"] = HostLogits(logits)
        return {name: outputs[name] for name in fetch}


class Seq2SeqTensorParallelRunner(_ShardRunner):
    """Runs one rank's Marian shard for a :class:`steppers.Seq2SeqStepper`: the encoder
    signature's runs go to the encoder segments, the decoder's to the decoder segments."""

    def __init__(self, shard, comm: Communicator, intra_threads: int = 1, allow_spinning: bool = False, bound=None):
        from .marian import layer_norm

        self.norm = layer_norm
        session = self._start(shard, comm, intra_threads, allow_spinning, bound)
        self.encoder = [(session(x.attention), x.attention_norm, session(x.ffn), x.ffn_norm) for x in shard.encoder]
        self.decoder = [(session(x.attention), x.attention_norm, session(x.cross_kv), session(x.cross), x.cross_norm,
                         session(x.ffn), x.ffn_norm) for x in shard.decoder]
        self.head = session(shard.head)

    def _key_bias(self, mask: np.ndarray) -> np.ndarray:
        return np.where(mask != 0, np.float32(0), self.min).astype(np.float32)[:, None, None, :]

    def run(self, session, feeds, fetch):
        if getattr(session, "role", None) == "encoder":
            return {"last_hidden_state": self._encode(feeds)}
        return self._decode(feeds, fetch)

    def _encode(self, feeds) -> np.ndarray:
        ids = np.asarray(feeds["input_ids"])
        mask = np.asarray(feeds["attention_mask"]) if "attention_mask" in feeds else np.ones_like(ids)
        shard = self.shard
        tokens = self.comm.sum(shard.embedding.lookup(ids))
        h = tokens * np.float32(shard.layout.scale) + shard.encoder_positions[np.arange(ids.shape[1])]
        h = h.astype(np.float32)
        bias = self._key_bias(mask)
        for attention, attention_norm, ffn, ffn_norm in self.encoder:
            (out,) = self._call(attention, {"h": h, "bias": bias})
            h = self.norm(h + self.comm.sum(out), attention_norm)
            (out,) = self._call(ffn, {"h": h})
            h = self.norm(h + self.comm.sum(out), ffn_norm)
        return h

    def _decode(self, feeds, fetch):
        ids = np.asarray(feeds["input_ids"])
        batch, length = ids.shape
        shard = self.shard
        states = feeds["encoder_hidden_states"]
        cross_bias = self._key_bias(np.asarray(feeds["encoder_attention_mask"]))
        # a decoder_model.onnx (the first step of an unmerged pair) declares no cache inputs
        before = _length(feeds.get("past_key_values.0.decoder.key", self.empty(None, batch)))
        total = before + length
        positions = np.arange(before, total)
        tokens = self.comm.sum(shard.embedding.lookup(ids))
        h = (tokens * np.float32(shard.layout.scale) + shard.decoder_positions[positions]).astype(np.float32)
        causal = np.arange(total)[None, :] <= (before + np.arange(length))[:, None]
        self_bias = np.where(causal, np.float32(0), self.min).astype(np.float32)[None, None]
        outputs = {}
        for i, (attention, attention_norm, cross_kv, cross, cross_norm, ffn, ffn_norm) in enumerate(self.decoder):
            key, value = (feeds.get(f"past_key_values.{i}.encoder.{x}", self.empty(None, batch)) for x in ("key", "value"))
            if _length(key) == 0:  # the first step: this rank's cross-attention cache from the encoder states
                key, value = self._call(cross_kv, {"h": states}, kept=("key", "value"))
            out, present_k, present_v = self._call(attention, {
                "h": h, "bias": self_bias, "past_k": feeds.get(f"past_key_values.{i}.decoder.key", self.empty(None, batch)),
                "past_v": feeds.get(f"past_key_values.{i}.decoder.value", self.empty(None, batch))},
                kept=("present_k", "present_v"))
            h = self.norm(h + self.comm.sum(out), attention_norm)
            (out,) = self._call(cross, {"h": h, "bias": cross_bias, "key": key, "value": value})
            h = self.norm(h + self.comm.sum(out), cross_norm)
            (out,) = self._call(ffn, {"h": h})
            h = self.norm(h + self.comm.sum(out), ffn_norm)
            outputs[f"present.{i}.decoder.key"], outputs[f"present.{i}.decoder.value"] = present_k, present_v
            outputs[f"present.{i}.encoder.key"], outputs[f"present.{i}.encoder.value"] = key, value
        where = fetch.get("logits", LOGITS)
        rows = h[:, -1, :] if where == LOGITS else h.reshape(batch * length, -1)
        logits = self._head(rows)
        outputs["logits"] = logits.reshape(batch, length, -1) if where == HOST else HostLogits(logits)
        return {name: outputs[name] for name in fetch}
