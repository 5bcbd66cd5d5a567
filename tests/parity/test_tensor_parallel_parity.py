"""Tensor parallelism on the random-init reference exports (GPT-2, Llama with GQA: 4 query
heads over 2 key/value heads, so each of 2 ranks holds 1 kv head, and Marian) under a real ``mpirun -np 2``:
tokens equal one plain process running the export's own graph, scores within 1e-4."""

from __future__ import annotations

import json

import pytest
from tp_common import ROOT, assert_ranks_equal_plain, run_plain_and_tp


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tensor_parallel_equals_one_process(kind, request, tmp_path):
    reference = request.getfixturevalue(f"{kind}_reference")
    bos = reference.special["bos"]
    vocab = reference.tokenizer.get_vocab()
    words = [vocab[f"w{i}"] for i in range(50)]
    prompts = [[bos] + [words[(3 * i + j) % 50] for j in range(1 + i % 5)] for i in range(6)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    plain, ranks = run_plain_and_tp(ROOT / "tests" / "tp_script.py", reference.onnx, tmp_path / "r", "equal",
                                    env={"TP_SCRIPT_PROMPTS": str(tmp_path / "prompts.json")})
    assert_ranks_equal_plain(plain, ranks, scores=("score", "greedy_scores"))


@pytest.mark.mpi
def test_tensor_parallel_translation_equals_one_process(marian_reference, tmp_path):
    vocab = marian_reference.tokenizer.get_vocab()
    sources = [[f"w{(5 * i + j) % 50}" for j in range(1 + i % 7)] + ["</s>"] for i in range(6)]
    assert all(t in vocab for s in sources for t in s)
    (tmp_path / "sources.json").write_text(json.dumps(sources))
    plain, ranks = run_plain_and_tp(ROOT / "tests" / "tp_translate_script.py", marian_reference.onnx, tmp_path / "r",
                                    env={"TP_SCRIPT_PROMPTS": str(tmp_path / "sources.json")})
    assert_ranks_equal_plain(plain, ranks, scores=("score", "beam_scores"))
