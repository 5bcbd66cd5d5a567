"""The load-time edit that makes a decoder compute logits only at the positions asked for:
the edited graph must give exactly the unedited graph's logits at those positions, in plain and
in If-branched (merged-decoder) graphs, and leave graphs it does not recognise untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT
from onnx import TensorProto, helper, numpy_helper

from shmengine.model.graph_edits import LOGIT_POSITIONS, gather_logit_positions

HIDDEN, VOCAB = 8, 11


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _edited(model: onnx.ModelProto) -> onnx.ModelProto:
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    assert gather_logit_positions(edited)
    onnx.checker.check_model(edited)
    return edited


def _head_model(*, branched: bool) -> onnx.ModelProto:
    """logits = (tanh(h) @ W + b) * 0.5, with the head inside both branches of an If when branched."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "W")
    # a [1, vocab] bias, as Marian's final_logits_bias: broadcast, the same at every position
    bias = numpy_helper.from_array(rng.standard_normal((1, VOCAB)).astype(np.float32), "b")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    logits_info = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])

    def head(prefix: str, hidden: str, out: str) -> list:
        return [
            helper.make_node("MatMul", [hidden, "W"], [f"{prefix}mm"]),
            helper.make_node("Add", [f"{prefix}mm", "b"], [f"{prefix}biased"]),
            helper.make_node("Mul", [f"{prefix}biased", "scale"], [out]),
        ]

    nodes = [helper.make_node("Tanh", ["h"], ["t"])]
    inputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])]
    if branched:
        nodes.append(helper.make_node("Neg", ["t"], ["negated"]))
        then_graph = helper.make_graph(head("then/", "t", "then_logits"), "then", [], [
            helper.make_tensor_value_info("then_logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])])
        else_graph = helper.make_graph(head("else/", "negated", "else_logits"), "else", [], [
            helper.make_tensor_value_info("else_logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])])
        nodes.append(helper.make_node("If", ["flag"], ["logits"], then_branch=then_graph, else_branch=else_graph))
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, [1]))
    else:
        nodes += head("", "t", "logits")
    graph = helper.make_graph(nodes, "head", inputs, [logits_info], initializer=[weight, bias, scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("branched", [False, True])
def test_edited_head_gives_the_original_logits_at_the_asked_positions(branched):
    model = _head_model(branched=branched)
    original, edited = _session(model), _session(_edited(model))
    h = np.random.default_rng(1).standard_normal((3, 5, HIDDEN)).astype(np.float32)
    for flag in [True, False] if branched else [None]:
        feeds = {"h": h} if flag is None else {"h": h, "flag": np.array([flag])}
        full = original.run(["logits"], feeds)[0]
        for positions in ([4], [0, 2], list(range(5))):
            got = edited.run(["logits"], {**feeds, LOGIT_POSITIONS: np.array(positions, np.int64)})[0]
            np.testing.assert_array_equal(got, full[:, positions, :])


def test_bundled_gpt2_last_position_logits_equal_the_full_graph():
    path = ROOT / "models" / "numbers-gpt2" / "model.onnx"
    model = onnx.load(str(path))
    original, edited = _session(model), _session(_edited(model))
    names = [i.name for i in original.get_inputs()]
    batch, length = 2, 6
    feeds = {"input_ids": np.random.default_rng(2).integers(3, 40, (batch, length)).astype(np.int64)}
    for meta in original.get_inputs():
        if meta.name.startswith("past_key_values"):
            feeds[meta.name] = np.zeros((batch, meta.shape[1], 0, meta.shape[3]), np.float32)
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((batch, length), np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.tile(np.arange(length), (batch, 1))
    full = original.run(["logits"], feeds)[0]
    last = edited.run(["logits"], {**feeds, LOGIT_POSITIONS: np.array([length - 1])})[0]
    np.testing.assert_allclose(last, full[:, -1:, :], rtol=1e-5, atol=1e-5)


def _unrecognised_heads():
    """Graphs whose logits do not come from a MatMul with a 2-D constant weight by a
    position-wise chain: the edit must not touch them."""
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])
    w_in = helper.make_tensor_value_info("w", TensorProto.FLOAT, [HIDDEN, VOCAB])
    out3 = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])
    weight = numpy_helper.from_array(np.ones((HIDDEN, VOCAB), np.float32), "W")
    yield "weight fed at run time", helper.make_graph([helper.make_node("MatMul", ["h", "w"], ["logits"])], "g", [h, w_in], [out3])
    yield "a softmax after the head (not element-wise with a constant)", helper.make_graph(
        [helper.make_node("MatMul", ["h", "W"], ["mm"]), helper.make_node("Softmax", ["mm"], ["logits"], axis=-1)],
        "g", [h], [out3], initializer=[weight])
    per_position = numpy_helper.from_array(np.ones((5, VOCAB), np.float32), "per_position")
    yield "a bias that differs by position", helper.make_graph(
        [helper.make_node("MatMul", ["h", "W"], ["mm"]), helper.make_node("Add", ["mm", "per_position"], ["logits"])],
        "g", [h], [out3], initializer=[weight, per_position])
    out2 = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", VOCAB])
    h2 = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", HIDDEN])
    yield "logits of rank 2", helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["logits"])], "g", [h2], [out2], initializer=[weight])


@pytest.mark.parametrize("case", list(_unrecognised_heads()), ids=lambda case: case[0])
def test_unrecognised_heads_are_left_exactly_as_they_are(case):
    model = helper.make_model(case[1], opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    before = model.SerializeToString()
    assert not gather_logit_positions(model)
    assert model.SerializeToString() == before


def test_bundled_marian_merged_decoder_edited_in_both_branches():
    """A real Optimum merged decoder (If on use_cache_branch): the edit reaches the head in both
    branches, and the logits at the asked positions equal the unedited graph's."""
    model = onnx.load(str(ROOT / "models" / "numbers-marian" / "decoder_model_merged.onnx"))
    original, edited = _session(model), _session(_edited(model))
    rng = np.random.default_rng(3)
    batch, source, length = 2, 5, 4
    feeds = {
        "encoder_attention_mask": np.ones((batch, source), np.int64),
        "encoder_hidden_states": rng.standard_normal((batch, source, 128)).astype(np.float32),
        "input_ids": rng.integers(3, 20, (batch, length)).astype(np.int64),
        "use_cache_branch": np.array([False]),
    }
    for meta in original.get_inputs():
        if meta.name.startswith("past_key_values"):
            feeds[meta.name] = np.zeros((batch, meta.shape[1], 0, meta.shape[3]), np.float32)
    names = [o.name for o in original.get_outputs()]
    full = dict(zip(names, original.run(None, feeds)))
    for positions in ([length - 1], list(range(length))):
        got = edited.run(["logits"], {**feeds, LOGIT_POSITIONS: np.array(positions, np.int64)})[0]
        np.testing.assert_allclose(got, full["logits"][:, positions, :], rtol=1e-5, atol=1e-5)
    # the cache branch: one more token over the caches the first run made
    step = {**feeds, "use_cache_branch": np.array([True]), "input_ids": rng.integers(3, 20, (batch, 1)).astype(np.int64)}
    for name in list(step):
        if name.startswith("past_key_values"):
            step[name] = full["present" + name[len("past_key_values") :]]
    expected = original.run(["logits"], step)[0]
    got = edited.run(["logits"], {**step, LOGIT_POSITIONS: np.array([0], np.int64)})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
