"""Tensor parallelism on the random-init reference exports (GPT-2, Llama with GQA: 4 query
heads over 2 key/value heads, so each of 2 ranks holds 1 kv head, and Marian) under a real ``mpirun -np 2``:
tokens equal one plain process running the export's own graph, scores within 1e-4."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_mpi import mpirun_command

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "tp_script.py"


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tensor_parallel_equals_one_process(kind, request, tmp_path):
    reference = request.getfixturevalue(f"{kind}_reference")
    bos = reference.special["bos"]
    vocab = reference.tokenizer.get_vocab()
    words = [vocab[f"w{i}"] for i in range(50)]
    prompts = [[bos] + [words[(3 * i + j) % 50] for j in range(1 + i % 5)] for i in range(6)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = dict(os.environ, TP_SCRIPT_PROMPTS=str(tmp_path / "prompts.json"))
    out = tmp_path / "r"
    for command in ([sys.executable, str(SCRIPT), str(reference.onnx), "plain", "equal", f"{out}-plain"],
                    [*mpirun_command(), sys.executable, str(SCRIPT), str(reference.onnx), "tp", "equal", str(out)]):
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
    plain = json.loads(open(f"{out}-plain.0").read())
    for rank in (0, 1):
        tp = json.loads(open(f"{out}.{rank}").read())
        for key in ("greedy", "beam", "sample"):
            assert tp[key] == plain[key], (kind, rank, key)
        for mine, ref in zip(tp["score"], plain["score"]):
            np.testing.assert_allclose(mine, ref, atol=1e-4)
        np.testing.assert_allclose(tp["greedy_scores"], plain["greedy_scores"], atol=1e-4)
        assert tp["weights_nbytes"] <= 0.6 * plain["weights_nbytes"]


@pytest.mark.mpi
def test_tensor_parallel_translation_equals_one_process(marian_reference, tmp_path):
    vocab = marian_reference.tokenizer.get_vocab()
    sources = [[f"w{(5 * i + j) % 50}" for j in range(1 + i % 7)] + ["</s>"] for i in range(6)]
    assert all(t in vocab for s in sources for t in s)
    (tmp_path / "sources.json").write_text(json.dumps(sources))
    env = dict(os.environ, TP_SCRIPT_PROMPTS=str(tmp_path / "sources.json"))
    script = ROOT / "tests" / "tp_translate_script.py"
    out = tmp_path / "r"
    for command in ([sys.executable, str(script), str(marian_reference.onnx), "plain", f"{out}-plain"],
                    [*mpirun_command(), sys.executable, str(script), str(marian_reference.onnx), "tp", str(out)]):
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
    plain = json.loads(open(f"{out}-plain.0").read())
    for rank in (0, 1):
        tp = json.loads(open(f"{out}.{rank}").read())
        for key in ("greedy", "beam", "sample"):
            assert tp[key] == plain[key], (rank, key)
        for mine, ref in zip(tp["score"] + tp["beam_scores"], plain["score"] + plain["beam_scores"]):
            np.testing.assert_allclose(mine, ref, atol=1e-4)
        assert tp["weights_nbytes"] <= 0.6 * plain["weights_nbytes"]
