"""Public API that no other test covers: the Translator's file and streaming methods with their
options, contains_model, device_index on the CPU, a payload that cannot be pickled, a Generator
on a graph without logits.

References: the words come from ``number_to_words`` (models/train_numbers.py), scores from the
same Translator's ``score_batch`` / ``translate_batch`` (which the parity suite checks against
CTranslate2): what is tested here is that the file and stream methods give each line its own
example's result, in order, in CTranslate2's formats.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from conftest import ROOT

import shmengine
from models.train_numbers import number_to_words
from shmengine import InvalidInputError

MARIAN = ROOT / "models" / "numbers-marian"
GPT2 = ROOT / "models" / "numbers-gpt2"
NUMBERS = ["1984", "42", "7", "300", "86021", "15"]


def digits(number: str) -> list[str]:
    return list(number) + ["</s>"]


@pytest.fixture(scope="module")
def translator():
    with shmengine.Translator(MARIAN, inter_threads=2, intra_threads=1) as t:
        yield t


def test_translate_file_with_target_prefixes_and_scores(translator, tmp_path):
    """``target_path`` gives each line its own prefix (an empty line: none); ``with_scores``
    writes ``score ||| hypothesis`` as CTranslate2 does."""
    source, target, output = tmp_path / "src.txt", tmp_path / "prefix.txt", tmp_path / "out.txt"
    source.write_text("".join(" ".join(digits(n)) + "\n" for n in NUMBERS))
    prefixes = [["two"], [], ["seven"], ["nine"], [], ["fifteen"]]
    target.write_text("".join(" ".join(p) + "\n" for p in prefixes))
    stats = translator.translate_file(source, output, target, max_batch_size=2, beam_size=2, with_scores=True)
    lines = output.read_text().splitlines()
    assert len(lines) == len(NUMBERS) == stats.num_examples
    expected = translator.translate_batch([digits(n) for n in NUMBERS], [p or None for p in prefixes], beam_size=2, return_scores=True)
    for line, number, prefix, result in zip(lines, NUMBERS, prefixes, expected):
        score, words = line.split(" ||| ")
        truth = number_to_words(int(number)).split()
        # the prefix replaces the first word(s); the rest of the number follows
        assert words.split() == (prefix + truth[len(prefix):] if prefix else truth), line
        assert words.split() == result.hypotheses[0]
        assert float(score) == pytest.approx(result.scores[0], abs=1e-5)
    assert stats.num_tokens == sum(len(line.split(" ||| ")[1].split()) for line in lines)


def test_score_file_with_tokens_score_and_score_iterable_pair_lines(translator, tmp_path):
    """Each output line scores its own (source, target) pair: mean, target and, with
    ``with_tokens_score``, each token with its log-prob."""
    targets = [number_to_words(int(n)) for n in NUMBERS]
    targets[3] = "three hundred one"  # a wrong one scores low, on its own line
    source, target, output = tmp_path / "src.txt", tmp_path / "tgt.txt", tmp_path / "scores.txt"
    source.write_text("".join(" ".join(digits(n)) + "\n" for n in NUMBERS))
    target.write_text("".join(t + "\n" for t in targets))
    stats = translator.score_file(source, target, output, max_batch_size=4, with_tokens_score=True)
    expected = translator.score_batch([digits(n) for n in NUMBERS], [t.split() for t in targets])
    lines = output.read_text().splitlines()
    assert len(lines) == stats.num_examples == len(NUMBERS)
    for line, text, result in zip(lines, targets, expected):
        mean, words, per_token = line.split(" ||| ")
        assert words == text
        assert float(mean) == pytest.approx(np.mean(result.log_probs), abs=1e-5)
        pairs = [entry.rsplit(":", 1) for entry in per_token.split()]
        assert [t for t, _ in pairs] == text.split() + ["</s>"]
        np.testing.assert_allclose([float(lp) for _, lp in pairs], result.log_probs, atol=1e-5)
    assert float(lines[3].split(" ||| ")[0]) < min(float(lines[i].split(" ||| ")[0]) for i in (0, 1, 2, 4, 5))
    streamed = list(translator.score_iterable(iter([digits(n) for n in NUMBERS]), iter([t.split() for t in targets]), max_batch_size=4))
    for got, want in zip(streamed, expected):
        assert got.tokens == want.tokens
        np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-5)


def test_translator_generate_tokens_streams_the_translation(translator):
    source = digits("86021")
    whole = translator.translate_batch([source], beam_size=1)[0].hypotheses[0]
    assert whole == number_to_words(86021).split()
    steps = list(translator.generate_tokens(source))
    assert [s.token for s in steps if not (s.is_last and s.token == "</s>")] == whole
    assert steps[-1].is_last and not any(s.is_last for s in steps[:-1])
    assert [s.step for s in steps] == list(range(len(steps)))
    assert all(s.log_prob <= 0 for s in steps)
    first = []
    for step in translator.generate_tokens(source):
        first.append(step.token)
        if len(first) == 2:
            break  # closing the stream early stops the decoding; the translator stays usable
    assert first == whole[:2]
    assert translator.translate_batch([source], beam_size=1)[0].hypotheses[0] == whole


def test_contains_model_knows_each_kind(tmp_path):
    assert shmengine.contains_model(MARIAN) and shmengine.contains_model(GPT2)
    assert not shmengine.contains_model(tmp_path)
    assert not shmengine.contains_model(ROOT / "models" / "default")  # a bare ONNX file: an Engine's, not a model directory
    broken = tmp_path / "gpt2"
    shutil.copytree(GPT2, broken)
    (broken / "config.json").unlink()
    assert not shmengine.contains_model(broken)


def test_device_index_list_only_means_something_on_cuda(small_mlp):
    with pytest.raises(ValueError, match="only has a meaning with device='cuda'"):
        shmengine.Engine(small_mlp.path, device_index=[0, 1])
    with shmengine.Engine(small_mlp.path, device_index=[0], inter_threads=1, intra_threads=1) as engine:
        x = small_mlp.inputs(3)
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], small_mlp.reference(x), rtol=1e-4, atol=1e-5)


def test_unpicklable_payload_fails_its_future_and_the_engine_goes_on(small_mlp):
    """The caller's mistake: its future fails with a TypeError saying so; no worker is lost and
    the next batch runs."""
    import threading

    with shmengine.Engine(small_mlp.path, inter_threads=1, intra_threads=1) as engine:
        pids = engine.worker_pids
        for payload in (lambda: 1, threading.Lock()):
            with pytest.raises(TypeError, match="cannot be sent to a worker"):
                engine.ping(payload).result(timeout=10)
        assert engine.ping({"a": 1}).result(timeout=10) == {"a": 1}
        assert engine.worker_pids == pids  # no worker died of it


def test_generator_on_a_graph_without_logits_says_so(tmp_path):
    """A decoder directory whose graph has no 'logits' output: a clear error naming it, and
    nothing left running (the conftest checks)."""
    directory = tmp_path / "no-logits"
    shutil.copytree(GPT2, directory)
    model = onnx.load(str(directory / "model.onnx"))
    for node in model.graph.node:
        node.output[:] = ["scores" if o == "logits" else o for o in node.output]
    for output in model.graph.output:
        if output.name == "logits":
            output.name = "scores"
    onnx.save(model, str(directory / "model.onnx"))
    with pytest.raises(InvalidInputError, match="has no 'logits' output: it is not a generation model"):
        shmengine.Generator(directory, inter_threads=1, intra_threads=1)


def test_device_auto_takes_cuda_only_where_cuda_runs(small_mlp):
    """device="auto" is "cuda" exactly where a CUDA device and ONNX Runtime's CUDA provider are
    both there (nvidia-smi's count, independent of ORT), else "cpu"; the numbers are right."""
    import subprocess

    import onnxruntime as ort

    try:
        gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.count("GPU ")
    except (OSError, subprocess.TimeoutExpired):
        gpus = 0
    expected = "cuda" if gpus and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    with shmengine.Engine(small_mlp.path, device="auto", inter_threads=1, intra_threads=1) as engine:
        assert engine.device == expected
        x = small_mlp.inputs(3)
        tolerance = 1e-2 if expected == "cuda" else 1e-4  # ORT's default TF32 matmuls on CUDA
        np.testing.assert_allclose(engine.run_batch({"x": x})["y"], small_mlp.reference(x), rtol=tolerance, atol=tolerance)
