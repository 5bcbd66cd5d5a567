"""The device path's code (the bound runner: IOBinding, the cache kept as OrtValues, the
device-side Gather, ArgMax and TopK graphs) against CTranslate2 and transformers on the reference
models, run here over CPU OrtValues; tools/bench_gpu.py runs the same code on a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import PROMPTS, hf_greedy
from .test_references import BEAM_SIZE, MAX_NEW_TOKENS, SCORE_TOLERANCE, ct2_decode
from .test_shmengine_parity import shm_decode


@pytest.fixture(autouse=True)
def bound_runner(monkeypatch):
    monkeypatch.setenv("SHMENGINE_RUNNER", "bound")


def test_bound_runner_greedy_equals_transformers_and_ctranslate2(reference):
    ours = shm_decode(reference, {"inter_threads": 1}, beam_size=1)
    assert [hyps[0][0] for hyps in ours] == hf_greedy(reference, PROMPTS, MAX_NEW_TOKENS)
    theirs = ct2_decode(reference, beam_size=1, sampling_topk=1)
    np.testing.assert_allclose([h[0][1] for h in ours], [h[0][1] for h in theirs], atol=SCORE_TOLERANCE)


def test_bound_runner_beam4_equals_ctranslate2(reference):
    ours = shm_decode(reference, {"inter_threads": 1, "max_batch_size": 3}, beam_size=BEAM_SIZE, num_hypotheses=BEAM_SIZE)
    theirs = ct2_decode(reference, beam_size=BEAM_SIZE, num_hypotheses=BEAM_SIZE)
    for text, mine, ct2 in zip(PROMPTS, ours, theirs):
        assert [ids for ids, _ in mine] == [ids for ids, _ in ct2], text
        np.testing.assert_allclose([s for _, s in mine], [s for _, s in ct2], atol=SCORE_TOLERANCE, err_msg=text)
