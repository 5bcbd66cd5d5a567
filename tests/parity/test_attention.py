"""``return_attention`` and ``replace_unknowns`` against CTranslate2 on the same Marian weights.

CTranslate2's converter picks the last decoder layer's first cross-attention head for alignment
(``alignment_layer=-1``, ``alignment_heads=1``); shmengine adds that head's probabilities to the
Optimum decoder as an output (``shmengine/model/alignment.py``). Per hypothesis token, the vector
over the source must equal CTranslate2's, for greedy and beam search, target prefixes, returned
end tokens, truncated sources and alternatives.

CTranslate2 runs one example at a time here: in a batch, its beam search gives each example's
first token the attention row of another example (checked: example 0 of a batch of three
got example 1's first vector alone, a vector that does not even sum to 1 over its own source;
greedy search is right). shmengine gives every example the same vectors in a batch as alone,
which the test checks too. For the same reason, alternatives are compared under greedy search:
CTranslate2 continues them as a batch of alternatives, and under beam search their first
continued token gets that wrong row.
"""

from __future__ import annotations

import random

import ctranslate2
import numpy as np
import pytest

import shmengine

from .conftest import PROMPTS, prompt_tokens

CASES = 24


@pytest.fixture(scope="module")
def engines(marian_reference):
    with shmengine.Translator(marian_reference.onnx, intra_threads=1) as translator:
        yield marian_reference, ctranslate2.Translator(str(marian_reference.ct2), intra_threads=1), translator


def _draw(rng: random.Random) -> tuple[dict, bool]:
    options = {
        "beam_size": rng.choice([1, 2, 3]),
        "max_decoding_length": rng.randint(1, 14),
        "return_end_token": rng.choice([False, True]),
        "return_attention": True,
        "return_scores": True,
    }
    if rng.random() < 0.3:
        options["max_input_length"] = rng.randint(2, 6)
    if rng.random() < 0.3:
        options.update(return_alternatives=True, num_hypotheses=3, beam_size=1)
    return options, rng.random() < 0.4


@pytest.mark.parametrize("case", range(CASES))
def test_attention_equals_ctranslate2(engines, case):
    reference, theirs, ours = engines
    rng = random.Random(f"attention-{case}")
    options, with_prefix = _draw(rng)
    tokens = [prompt_tokens(reference, text) for text in rng.sample(PROMPTS, 3)]
    prefixes = None
    if with_prefix:
        # alternatives: one-token prefixes (see test_alternatives for longer ones)
        longest = 1 if options.get("return_alternatives") else 3
        prefixes = [[f"w{rng.randrange(50)}" for _ in range(rng.randint(1, longest))] for _ in tokens]
    got = ours.translate_batch(tokens, prefixes, **options)
    for example, source in enumerate(tokens):
        prefix = [prefixes[example]] if prefixes else None
        expected = theirs.translate_batch([source], prefix, **options)[0]
        alone = ours.translate_batch([source], prefix, **options)[0]
        context = f"example {example}: options={options}, prefixes={prefixes}"
        assert got[example].hypotheses == expected.hypotheses, context
        assert len(got[example].attention) == len(expected.attention), context
        for mine, own, ct2, hypothesis in zip(got[example].attention, alone.attention, expected.attention, expected.hypotheses):
            assert np.array(mine).shape == (len(hypothesis), len(source)), context
            np.testing.assert_allclose(mine, ct2, atol=1e-4, err_msg=context)
            np.testing.assert_allclose(mine, own, atol=1e-5, err_msg=context)


def test_replace_unknowns_equals_ctranslate2(engines):
    """An unknown target token (here forced by the target prefix) becomes the source token it
    attends to most, and return_attention is not needed for it."""
    reference, theirs, ours = engines
    unk = reference.tokenizer.unk_token
    tokens = [prompt_tokens(reference, text) for text in PROMPTS[1:7]]
    prefixes = [["w3", unk], [unk], [unk, "w4", unk], ["w9"], [unk], [unk, unk]]
    for beam in (1, 2):
        options = {"beam_size": beam, "max_decoding_length": 8, "replace_unknowns": True}
        got = ours.translate_batch(tokens, prefixes, **options)
        replaced = 0
        for example, (source, prefix) in enumerate(zip(tokens, prefixes)):
            expected = theirs.translate_batch([source], [prefix], **options)[0]
            assert got[example].hypotheses == expected.hypotheses, (beam, example)
            assert got[example].attention == []  # not asked for
            replaced += sum(unk not in h for h in expected.hypotheses if prefix.count(unk))
            assert all(unk not in h for h in got[example].hypotheses)
        assert replaced  # the case the setting is for happened
