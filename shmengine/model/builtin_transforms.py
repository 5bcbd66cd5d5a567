"""The transforms shmengine registers, in the order they run on a graph (see ``transforms.py``).

1. ``logit_positions`` (every device and compute type, a Generator's graph): ``graph_edits.py``.
   It runs first, on the float graph, where the language-model head is still a ``MatMul``.
   ``alignment`` (a Translator's decoder): ``alignment.py`` adds the cross-attention output that
   ``return_attention`` and ``replace_unknowns`` read (computed only when fetched).
2. ``float32`` (a float16 / bfloat16 export asked to run in float32, or quantized on the CPU):
   widen the graph.
3. ``key_scale`` (CPU, every compute type): ``attention.py`` scales the queries instead of the
   key cache, so that ORT reads the cache in place (on the float graph, before quantizing).
4. ``int8_cpu`` (CPU, ``int8_float32``): ``quantize.py``'s ``INT8_CPU_METHOD``.
5. ``int8_weights_cuda`` (CUDA, ``int8_float16``): 8-bit ``MatMulNBits`` weights, before the
   float16 cast below so that their scales are cast with the rest.
6. ``float16`` (CUDA, ``float16`` and ``int8_float16``), ``bfloat16`` (CUDA, ``bfloat16``).
7. ``step_top`` (the bound runner: a GPU's, every compute type; decoders): ``graph_edits.py``
   adds the step's top-k and log-normaliser as outputs, last, so that it reads the logits in
   the type the graph finally computes them in.
"""

from __future__ import annotations

import logging

from onnx import ModelProto, TensorProto

from shmengine.model import alignment, attention, precision, quantize
from shmengine.model.graph_edits import expose_step_top, gather_logit_positions
from shmengine.model.transforms import NotApplicableError, Transform, TransformTarget, all_graphs, register

logger = logging.getLogger("shmengine")


def _logit_positions(model: ModelProto, target: TransformTarget) -> None:
    gather_logit_positions(model)  # a graph it does not recognise is left as it is


def _has_half_floats(model: ModelProto) -> bool:
    halves = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    for g in all_graphs(model.graph):
        if any(t.data_type in halves for t in g.initializer):
            return True
        if any(v.type.tensor_type.elem_type in halves for v in [*g.input, *g.output]):
            return True
    return False


def _quantizable(model: ModelProto, target: TransformTarget) -> None:
    """Raise NotApplicableError unless some MatMul/Gemm has a 2-D float32 weight worth quantizing."""
    weights = {}
    for g in all_graphs(model.graph):
        for t in g.initializer:
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16) and len(t.dims) == 2:
                weights[t.name] = t.dims[0] * t.dims[1]
    for g in all_graphs(model.graph):
        for n in g.node:
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and weights.get(n.input[1], 0) >= 4096:
                return
    raise NotApplicableError("it has no MatMul or Gemm with a 2-D float weight of at least 4096 values to quantize")


def _quantizer(options: quantize.QuantizeOptions):
    def apply(model: ModelProto, target: TransformTarget) -> None:
        try:
            quantize.quantize_weights(model, options)
        except quantize.NotQuantizableError as exc:
            raise NotApplicableError(str(exc)) from exc

    return apply


def _alignment(model: ModelProto, target: TransformTarget) -> None:
    # never refuses (a refusal would also stop the weight transforms of the chain): a decoder it
    # does not recognise runs without the output, and return_attention then says so
    try:
        alignment.expose_alignment(model)
    except alignment.NoAlignmentError as exc:
        logger.info("no alignment attention output added: %s", exc)


register(Transform("logit_positions", _logit_positions, roles=frozenset({"decoder"})))
register(Transform("alignment", _alignment, roles=frozenset({"seq2seq_decoder"})))
register(
    Transform(
        "float32",
        lambda model, target: precision.cast_to_float32(model),
        compute_types=frozenset({"float32", "int8_float32"}),
        needs_weights=True,
        wanted=_has_half_floats,
        provides=frozenset({"float32"}),
    )
)
register(Transform("key_scale", lambda model, target: attention.fold_key_scale(model), devices=frozenset({"cpu"})))
_CPU_INT8 = quantize.QuantizeOptions(quantize.INT8_CPU_METHOD)
register(
    Transform(
        "int8_cpu",
        _quantizer(_CPU_INT8),
        devices=frozenset({"cpu"}),
        compute_types=frozenset({"int8_float32"}),
        needs_weights=True,
        options={"method": _CPU_INT8.method},
        check=_quantizable,
    )
)
_CUDA_INT8 = quantize.QuantizeOptions("matmul_nbits", block_size=32, accuracy_level=0)
register(
    Transform(
        "int8_weights_cuda",
        _quantizer(_CUDA_INT8),
        devices=frozenset({"cuda"}),
        compute_types=frozenset({"int8_float16"}),
        needs_weights=True,
        options={"method": _CUDA_INT8.method, "block_size": _CUDA_INT8.block_size},
        check=_quantizable,
    )
)
register(
    Transform(
        "float16",
        lambda model, target: precision.cast_to_float16(model),
        devices=frozenset({"cuda"}),
        compute_types=frozenset({"float16", "int8_float16"}),
        needs_weights=True,
        provides=frozenset({"float16"}),
    )
)
register(
    Transform(
        "bfloat16",
        lambda model, target: precision.cast_to_bfloat16(model),
        devices=frozenset({"cuda"}),
        compute_types=frozenset({"bfloat16"}),
        needs_weights=True,
    )
)
register(
    Transform(
        "step_top",
        lambda model, target: expose_step_top(model),  # a graph without rank-3 logits is left as it is
        roles=frozenset({"decoder", "seq2seq_decoder"}),
        runners=frozenset({"bound"}),
    )
)
