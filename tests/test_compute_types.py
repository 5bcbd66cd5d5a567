"""compute_type: CTranslate2's values and fallbacks, CPU int8 made once and cached, and the
float16 / bfloat16 graph conversions for CUDA (checked here by structure, and float16 by running
it on ORT's CPU kernels).

Expected words come from models/numbers_heldout.tsv (the reference ``number_to_words``); float
references from numpy (the MLP's ``reference``) or from the float32 graph run by ORT directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, make_mlp
from onnx import TensorProto, helper, numpy_helper

import shmengine
from shmengine.decode.steppers import DecoderOnlyStepper
from shmengine.model import precision, transforms

MARIAN = ROOT / "models" / "numbers-marian"
GPT2 = ROOT / "models" / "numbers-gpt2"
LOG = "shmengine"


def heldout() -> list[tuple[str, str]]:
    with open(ROOT / "models" / "numbers_heldout.tsv", encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Every test quantizes into a cache of its own, so a first start is really a first start."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("SHMENGINE_CACHE_DIR", str(directory))
    return directory


# -- values, resolution, supported types -----------------------------------------------------------


def test_supported_compute_types_per_device():
    assert shmengine.get_supported_compute_types("cpu") == {"float32", "int8", "int8_float32"}
    cuda = shmengine.get_supported_compute_types("cuda")
    assert {"float32", "float16", "bfloat16", "int8_float16", "int8"} <= cuda
    assert "int16" not in cuda | shmengine.get_supported_compute_types("cpu")
    assert "int8_float32" not in cuda  # nothing registered makes int8 weights with float32 compute on CUDA
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        shmengine.get_supported_compute_types("tpu")


@pytest.mark.parametrize(
    "requested, model_type, device, expected",
    [
        ("default", "float32", "cpu", "float32"),
        ("default", "float16", "cpu", "float32"),  # CTranslate2 converts a float16 model on CPU
        ("default", "float16", "cuda", "float16"),
        ("auto", "float32", "cpu", "int8_float32"),  # what CTranslate2 picks on this CPU too
        ("auto", "float32", "cuda", "int8_float16"),
        ("int8", "float32", "cpu", "int8_float32"),
        ("int8", "float16", "cpu", "int8_float32"),
        ("int8", "float16", "cuda", "int8_float16"),
        ("float32", "float16", "cuda", "float32"),
        ("float16", "float32", "cuda", "float16"),
        ("int8", "float32", "cuda", "int8_float16"),  # int8_float32 falls back (CTranslate2's order)
    ],
)
def test_resolution_follows_ctranslate2(requested, model_type, device, expected):
    assert transforms.resolve_compute_type(requested, model_type, device) == expected


@pytest.mark.parametrize("requested", ["float16", "bfloat16", "int8_float16", "int8_bfloat16", "int16"])
def test_a_type_the_cpu_cannot_run_is_refused_naming_what_it_can(requested):
    # CTranslate2 4.8.5 on this CPU raises ValueError for float16, bfloat16, int8_float16 and
    # int8_bfloat16 too; int16 it runs with MKL, ONNX Runtime has no int16 kernels
    with pytest.raises(ValueError, match=f"compute_type='{requested}' is not supported on cpu.*float32, int8, int8_float32"):
        shmengine.Generator(GPT2, compute_type=requested)


@pytest.mark.parametrize("bad", ["int4", "FLOAT16", "", None, 8])
def test_unknown_compute_type_lists_the_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        shmengine.Translator(MARIAN, compute_type=bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in transforms.COMPUTE_TYPES:
        assert name in message


def test_default_keeps_the_graph_and_records_the_logit_edit(cache_dir):
    with shmengine.Generator(GPT2) as g:
        assert g.compute_type == "float32"
        assert not g.prepack_weights
        assert g.transforms == {"model": ["logit_positions", "key_scale"]}
    with shmengine.Translator(MARIAN) as t:
        assert t.compute_type == "float32"
        # the decoder also gets the alignment output (return_attention), a graph edit too
        assert t.transforms == {"encoder": ["key_scale"], "decoder": ["alignment", "key_scale"]}
    assert not cache_dir.exists()  # nothing to cache: the graph edit runs in memory


# -- CPU int8 ----------------------------------------------------------------------------------------


def _digits(number: str) -> list[str]:
    return list(number) + ["</s>"]


def test_int8_translator_and_generator_stay_exact_on_held_out_numbers(cache_dir):
    pairs = heldout()
    with shmengine.Translator(MARIAN, compute_type="int8", inter_threads=2, intra_threads=1) as t:
        assert t.compute_type == "int8_float32"
        assert t.transforms["decoder"] == ["alignment", "key_scale", "int8_cpu"]
        assert t.prepack_weights  # the default for int8: ORT's int8 kernels want prepacked weights
        results = t.translate_batch([_digits(n) for n, _ in pairs], beam_size=1, max_batch_size=64)
        correct = sum(" ".join(r.hypotheses[0]) == words for r, (_, words) in zip(results, pairs))
        assert correct / len(pairs) >= 0.99, f"int8 translator: exact match {correct}/{len(pairs)}"
    # int8 with ORT's prepacked weights (made once by the helper worker, shared through /dev/shm)
    with shmengine.Generator(GPT2, compute_type="int8_float32", prepack_weights=True, inter_threads=2, intra_threads=1) as g:
        assert g.transforms["model"] == ["logit_positions", "key_scale", "int8_cpu"]
        bos = g.vocabulary.id_to_token[g.model.bos_id]
        results = g.generate_batch([[bos, *n, "="] for n, _ in pairs], max_batch_size=64, max_length=24,
                                   include_prompt_in_result=False)
        correct = sum(" ".join(r.sequences[0]) == words for r, (_, words) in zip(results, pairs))
        assert correct / len(pairs) >= 0.99, f"int8 generator: exact match {correct}/{len(pairs)}"


@pytest.mark.parametrize("external_data", [False, True])
def test_int8_weights_are_a_quarter_and_the_engine_stays_close_to_numpy(tmp_path, cache_dir, external_data):
    small_mlp = make_mlp(tmp_path / "mlp", [64, 128, 32], seed=1, external_data=external_data)
    x = small_mlp.inputs(16)
    reference = small_mlp.reference(x)
    with shmengine.Engine(small_mlp.path, inter_threads=1, intra_threads=1) as f32:
        float_bytes = f32.weights_nbytes
    with shmengine.Engine(small_mlp.path, compute_type="int8", inter_threads=2, intra_threads=1) as engine:
        assert engine.compute_type == "int8_float32"
        assert engine.weights_nbytes < 0.3 * float_bytes
        out = engine.run_batch({engine.inputs[0].name: x})[engine.outputs[0].name]
    error = np.abs(out - reference).max() / np.abs(reference).max()
    assert error < 0.03, f"int8 MLP deviates {error:.3f} (relative to the largest output) from numpy"


def test_second_start_reads_the_cache_and_a_changed_model_is_quantized_again(tmp_path, cache_dir, caplog):
    model = tmp_path / "gpt2"
    shutil.copytree(GPT2, model)
    caplog.set_level(logging.INFO, logger=LOG)
    with shmengine.Generator(model, compute_type="int8"):
        pass
    entries = [p for p in cache_dir.iterdir() if p.is_dir()]
    assert len(entries) == 1
    data = entries[0] / "model.onnx.data"
    made = data.stat().st_mtime_ns
    assert any("cached in" in r.getMessage() for r in caplog.records)
    caplog.clear()

    with shmengine.Generator(model, compute_type="int8") as g:
        bos = g.vocabulary.id_to_token[g.model.bos_id]
        assert g.generate_batch([[bos, "4", "2", "="]], max_length=8, include_prompt_in_result=False)[0].sequences[0] == [
            "forty", "two"]
    assert data.stat().st_mtime_ns == made, "the second start rewrote the quantized weights"
    assert [p for p in cache_dir.iterdir() if p.is_dir()] == entries
    assert not any("cached in" in r.getMessage() for r in caplog.records)
    assert any("using the cached" in r.getMessage() for r in caplog.records)

    # a cache hit reads neither the source model nor its weights: with the source's bytes
    # garbled (size and mtime kept, which is what the key looks at) the start still works
    source = model / "model.onnx"
    st = source.stat()
    original = source.read_bytes()
    source.write_bytes(b"\0" * len(original))
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    with shmengine.Generator(model, compute_type="int8") as g:
        assert g.compute_type == "int8_float32"
    source.write_bytes(original)

    os.utime(model / "model.onnx", ns=(made + 10**9, made + 10**9))  # the model file changed
    with shmengine.Generator(model, compute_type="int8"):
        pass
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2


def test_cache_lies_beside_a_writable_model(tmp_path, monkeypatch):
    monkeypatch.delenv("SHMENGINE_CACHE_DIR", raising=False)
    model = tmp_path / "marian"
    shutil.copytree(MARIAN, model)
    with shmengine.Translator(model):
        pass
    assert not (model / ".shmengine-cache").exists()  # nothing to cache, nothing left beside the model
    with shmengine.Translator(model, compute_type="int8") as t:
        assert t.compute_type == "int8_float32"
    cached = list((model / ".shmengine-cache").glob("*/DONE"))
    assert len(cached) == 2  # encoder and decoder


def _no_weight_products(directory):
    """y = x + b: nothing an int8 path could quantize."""
    b = np.linspace(-1, 1, 8192, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8192])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8192])],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(directory / "model.onnx"))
    return b


def test_a_model_that_cannot_be_quantized_falls_back_with_a_logged_reason(tmp_path, cache_dir, caplog):
    b = _no_weight_products(tmp_path)
    caplog.set_level(logging.INFO, logger=LOG)
    with shmengine.Engine(tmp_path, compute_type="int8") as engine:
        assert engine.compute_type == "float32"
        x = np.ones((2, 8192), np.float32)
        np.testing.assert_array_equal(engine.run_batch({"x": x})["y"], x + b)
    reasons = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no MatMul or Gemm" in m and "running it as float32" in m for m in reasons), reasons
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


# -- float16 / bfloat16 / int8_float16 graphs (for CUDA) ------------------------------------------------


def _io_types(model):
    return {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}


def _greedy(session, prompts, steps):
    stepper = DecoderOnlyStepper(session, pad_id=0)
    tokens = [np.asarray(stepper.prefill(prompts).array()).argmax(-1)]
    for _ in range(steps - 1):
        tokens.append(np.asarray(stepper.step(tokens[-1]).array()).argmax(-1))
    return np.stack(tokens, axis=1)


def test_float16_graph_keeps_logits_float32_and_runs_its_cache_in_float16():
    model = onnx.load(str(GPT2 / "model.onnx"))
    half = onnx.ModelProto()
    half.CopyFrom(model)
    precision.cast_to_float16(half)
    types = _io_types(half)
    assert types["input_ids"] == TensorProto.INT64
    assert types["logits"] == TensorProto.FLOAT
    caches = [n for n in types if precision.is_cache_name(n)]
    assert caches and all(types[n] == TensorProto.FLOAT16 for n in caches)
    big = [t for t in half.graph.initializer if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 4096]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big)

    # ORT's CPU kernels cover this graph in float16: greedy tokens equal float32's (the
    # steppers make the empty cache in the input's declared float16)
    with open(GPT2 / "tokenizer.json", encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    prompts = [[vocab["<|endoftext|>"], *(vocab[c] for c in n), vocab["="]] for n, _ in heldout()[:64:4]]
    f32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    f16 = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    assert f16.get_inputs()[1].type == "tensor(float16)"
    same = (_greedy(f16, prompts, 6) == _greedy(f32, prompts, 6)).mean()
    assert same >= 0.99, f"float16 greedy tokens agree with float32 on {same:.0%}"


def test_float16_merged_seq2seq_decoder_translates_on_the_cpu():
    """Optimum's merged decoder (an If with both branches) converts to a valid float16 graph; ORT's
    CPU float16 kernels then translate held-out numbers into the reference words."""
    from shmengine.decode.steppers import Seq2SeqStepper

    sessions = {}
    for key in ("encoder_model", "decoder_model_merged"):
        proto = onnx.load(str(MARIAN / f"{key}.onnx"))
        precision.cast_to_float16(proto)
        assert _io_types(proto).get("logits", TensorProto.FLOAT) == TensorProto.FLOAT
        sessions[key] = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with open(MARIAN / "tokenizer.json", encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    words = {i: w for w, i in vocab.items()}
    with open(MARIAN / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    pairs = heldout()[:200:5]
    stepper = Seq2SeqStepper(sessions["encoder_model"], sessions["decoder_model_merged"],
                             pad_id=config["pad_token_id"], decoder_start_id=config["decoder_start_token_id"])
    stepper.encode([[vocab[c] for c in n] + [vocab["</s>"]] for n, _ in pairs])
    tokens = [np.asarray(stepper.prefill([[config["decoder_start_token_id"]]] * len(pairs)).array()).argmax(-1)]
    for _ in range(12):
        tokens.append(np.asarray(stepper.step(tokens[-1]).array()).argmax(-1))
    correct = 0
    for row, (_, expected) in zip(np.stack(tokens, axis=1), pairs):
        out = []
        for t in row:
            if words[int(t)] == "</s>":
                break
            out.append(words[int(t)])
        correct += " ".join(out) == expected
    assert correct / len(pairs) >= 0.95, f"float16 Marian on ORT's CPU kernels: {correct}/{len(pairs)}"


def test_bfloat16_graph_types_and_values():
    model = onnx.load(str(GPT2 / "model.onnx"))
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    precision.cast_to_bfloat16(model)
    types = _io_types(model)
    assert types["logits"] == TensorProto.FLOAT
    assert all(types[n] == TensorProto.BFLOAT16 for n in types if precision.is_cache_name(n))
    assert not any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    decoder = onnx.load(str(MARIAN / "decoder_model_merged.onnx"))
    precision.cast_to_bfloat16(decoder)
    typed = {v.name: v.type.tensor_type.elem_type for g in transforms.all_graphs(decoder.graph)
             for v in [*g.value_info, *g.input, *g.output]}
    casts = {n.output[0]: n for g in transforms.all_graphs(decoder.graph) for n in g.node if n.op_type == "Cast"}
    for g in transforms.all_graphs(decoder.graph):  # comparisons have no bfloat16 kernel: float32 inputs
        for node in g.node:
            if node.op_type == "Equal":
                for i in node.input:
                    assert typed.get(i) != TensorProto.BFLOAT16 or i in casts, (node.name, i)
    # a valid graph: ORT's CPU provider refuses it only for want of bfloat16 kernels
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(decoder.SerializeToString(), providers=["CPUExecutionProvider"])
    for t in model.graph.initializer:
        if t.data_type == TensorProto.BFLOAT16 and t.name in originals:
            bits = np.frombuffer(t.raw_data, np.uint16).astype(np.uint32) << np.uint32(16)
            widened = bits.view(np.float32).reshape(originals[t.name].shape)
            np.testing.assert_allclose(widened, originals[t.name], rtol=2**-8, atol=1e-30)


def test_int8_float16_graph_has_8bit_weights_with_float16_scales():
    model = onnx.load(str(GPT2 / "model.onnx"))
    target = transforms.TransformTarget("cuda", "int8_float16")
    chain = [t for t in transforms.registered() if t.selected("decoder", target)]
    assert [t.name for t in chain] == ["logit_positions", "int8_weights_cuda", "float16"]
    for t in chain:
        t.apply(model, target)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(helper.get_attribute_value(a) == 8 for n in nbits for a in n.attribute if a.name == "bits")
    inits = {t.name: t for t in model.graph.initializer}
    assert all(inits[n.input[2]].data_type == TensorProto.FLOAT16 for n in nbits)
    assert _io_types(model)["logits"] == TensorProto.FLOAT


def test_a_float16_export_runs_as_float32_on_the_cpu(tmp_path, cache_dir, caplog):
    model = tmp_path / "gpt2-fp16"
    shutil.copytree(GPT2, model)
    proto = onnx.load(str(model / "model.onnx"))
    precision.cast_to_float16(proto)
    onnx.save(proto, str(model / "model.onnx"))
    caplog.set_level(logging.INFO, logger=LOG)
    with shmengine.Generator(model) as g:
        assert g.compute_type == "float32"
        assert g.transforms["model"] == ["logit_positions", "float32", "key_scale"]
        bos = g.vocabulary.id_to_token[g.model.bos_id]
        out = g.generate_batch([[bos, "1", "9", "8", "4", "="]], max_length=12, include_prompt_in_result=False)
        assert " ".join(out[0].sequences[0]) == "one thousand nine hundred eighty four"
    assert any("the graph is float16" in r.getMessage() for r in caplog.records)


# -- the launcher ----------------------------------------------------------------------------------


def _shmengine_run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shmengine.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def test_cli_translates_held_out_numbers_in_int8(tmp_path, cache_dir):
    pairs = heldout()
    source = tmp_path / "numbers.txt"
    source.write_text("".join(f"{n}\n" for n, _ in pairs))
    out = tmp_path / "words.txt"
    done = _shmengine_run("translate", str(MARIAN), "--compute-type", "int8", "--input", str(source),
                          "--output", str(out), "--max-batch-size", "64", "--beam-size", "1")
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    correct = sum(line == words for line, (_, words) in zip(lines, pairs))
    assert len(lines) == len(pairs) and correct / len(pairs) >= 0.99, f"exact match {correct}/{len(pairs)}"
    assert any(cache_dir.glob("*/DONE"))  # the launcher quantized through the same cache


def test_cli_refuses_an_unknown_compute_type_without_a_traceback():
    done = _shmengine_run("translate", str(MARIAN), "--compute-type", "int4", "--input", os.devnull)
    assert done.returncode != 0
    assert "invalid compute_type 'int4'" in done.stderr and "int8_float16" in done.stderr
    assert "Traceback" not in done.stderr


def test_int8_of_a_model_with_missing_data_says_what_is_missing(tmp_path, cache_dir):
    mlp = make_mlp(tmp_path / "mlp", [64, 128, 32], seed=1, external_data=True)
    (mlp.path / "model.onnx.data").unlink()
    with pytest.raises(shmengine.ModelLoadError, match="needs external data file .*model.onnx.data.*missing"):
        shmengine.Engine(mlp.path, compute_type="int8")


# -- the key-scale edit (attention.py) ---------------------------------------------------------------


def _decoder_feeds(session, ids: np.ndarray) -> dict:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for meta in session.get_inputs():
        if meta.name == "position_ids":
            feeds[meta.name] = np.tile(np.arange(ids.shape[1]), (len(ids), 1))
        elif meta.name.startswith("past_key_values"):
            shape = [len(ids) if a == 0 else (0 if a == 2 else d) for a, d in enumerate(meta.shape)]
            feeds[meta.name] = np.zeros(shape, np.float32)
    return feeds


def test_key_scale_edit_keeps_the_outputs_and_lets_ort_read_the_key_cache_in_place(tmp_path):
    from shmengine.model.attention import fold_key_scale

    model = onnx.load(str(GPT2 / "model.onnx"))
    edited = onnx.load(str(GPT2 / "model.onnx"))
    layers = sum(1 for i in model.graph.input if i.name.endswith(".key"))
    assert fold_key_scale(edited) == layers
    onnx.save(edited, str(tmp_path / "edited.onnx"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    after = ort.InferenceSession(str(tmp_path / "edited.onnx"), options, providers=["CPUExecutionProvider"])
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(1, 20, size=(3, 7)).astype(np.int64)
    names = [o.name for o in before.get_outputs()]
    for want, got in zip(before.run(names, _decoder_feeds(before, ids)), after.run(names, _decoder_feeds(after, ids))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # what the edit is for: ORT folds the key transpose into the product (no copy of the cache)
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    fused = [n for n in optimized.graph.node if n.op_type == "FusedMatMul"
             and any(a.name == "transB" and a.i == 1 for a in n.attribute)]
    assert len(fused) == layers


def test_key_scale_edit_leaves_a_product_scaled_by_a_vector_alone():
    from shmengine.model.attention import fold_key_scale

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 5, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])
    scale = numpy_helper.from_array(np.arange(1, 6, dtype=np.float32), "scale")  # per key position
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
         helper.make_node("Mul", ["kt", "scale"], ["kts"]),
         helper.make_node("MatMul", ["x", "kts"], ["y"])],
        "g", [x, k], [y], [scale])
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert fold_key_scale(model) == 0
    assert model.SerializeToString() == before


def test_int8_gemm_takes_the_activations_unflattened(monkeypatch):
    """HF's Conv1D exports as Reshape(x, [-1, K]) -> Gemm -> Reshape(back): the int8 product
    takes x as it is, the two reshapes and their shape arithmetic go, the outputs stay."""
    from shmengine.model import quantize

    rewritten = onnx.load(str(GPT2 / "model.onnx"))
    gemms = sum(n.op_type == "Gemm" for n in rewritten.graph.node)
    assert gemms
    quantize.quantize_weights(rewritten)
    monkeypatch.setattr(quantize._GraphView, "flattened_product", lambda self, gemm, columns: None)
    plain = onnx.load(str(GPT2 / "model.onnx"))
    quantize.quantize_weights(plain)
    def reshapes(model):
        return sum(n.op_type == "Reshape" for n in model.graph.node)

    assert reshapes(plain) - reshapes(rewritten) == 2 * gemms  # the one before and the one after each
    assert len(rewritten.graph.node) <= len(plain.graph.node) - 6 * gemms  # and their shape arithmetic
    before = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    after = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(1, 20, size=(4, 9)).astype(np.int64)
    names = [o.name for o in before.get_outputs()]
    for want, got in zip(before.run(names, _decoder_feeds(before, ids)), after.run(names, _decoder_feeds(after, ids))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
