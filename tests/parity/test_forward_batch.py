"""``Generator.forward_batch`` against CTranslate2's on the same random-init GPT-2 weights."""

from __future__ import annotations

import ctranslate2
import numpy as np

import shmengine

from .conftest import PROMPTS, prompt_tokens


def test_forward_batch_equals_ctranslate2(gpt2_reference):
    tokens = [prompt_tokens(gpt2_reference, text) for text in PROMPTS]
    theirs = ctranslate2.Generator(str(gpt2_reference.ct2), intra_threads=1)
    with shmengine.Generator(gpt2_reference.onnx, intra_threads=1) as ours:
        for log_probs in (False, True):
            expected = np.array(theirs.forward_batch(tokens, return_log_probs=log_probs))
            got = ours.forward_batch(tokens, return_log_probs=log_probs)
            assert got.shape == expected.shape
            for i, seq in enumerate(tokens):  # CTranslate2 leaves what follows a shorter sequence unspecified
                np.testing.assert_allclose(got[i, : len(seq)], expected[i, : len(seq)], atol=1e-4)
                assert not got[i, len(seq) :].any()
