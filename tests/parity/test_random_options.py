"""Random combinations of CTranslate2's deterministic decoding options, CTranslate2 as the oracle.

Each case draws an option set (seeded: a failure names its case and reruns the same), runs it
through CTranslate2 and through shmengine on the same random-init weights (GPT-2 and Marian),
and asks for the same hypotheses, in the same order, with the same scores. The fixed parity
tests cover the common settings one at a time; this is where their combinations meet: a prompt
counted by ``max_length``, penalties on the first generated token, a target prefix with a
repetition penalty, truncation, minimum lengths under beam search.
"""

from __future__ import annotations

import random

import ctranslate2
import numpy as np
import pytest

import shmengine

from .conftest import PROMPTS, Reference, prompt_tokens
from .test_references import SCORE_TOLERANCE

CASES = 40  # per model kind (600 per kind, on two seed sets, all agreed when this was written)
DEAD = -1e8


def _draw(rng: random.Random, seq2seq: bool) -> dict:
    beam = rng.choice([1, 1, 2, 3, 4])
    options = {
        "beam_size": beam,
        "patience": rng.choice([1, 1, 2]) if beam > 1 else 1,
        "length_penalty": rng.choice([1.0, 0.0, 0.6]),
        "repetition_penalty": rng.choice([1.0, 1.0, 1.3, 2.0]),
        "no_repeat_ngram_size": rng.choice([0, 0, 2, 3]),
        "return_end_token": rng.choice([False, True]),
        "return_scores": True,
    }
    options["num_hypotheses"] = rng.randint(1, max(1, round(beam * options["patience"]))) if beam > 1 else 1
    if seq2seq:
        options["max_decoding_length"] = rng.randint(1, 16)
        options["min_decoding_length"] = rng.randint(0, min(6, options["max_decoding_length"]))
        if rng.random() < 0.3:
            # from 2: at 1, CTranslate2 reads the source as if it were "</s> </s>" (not an input
            # anyone sends; left out rather than copied)
            options["max_input_length"] = rng.randint(2, 8)
    else:
        options["include_prompt_in_result"] = rng.choice([False, True])
        options["max_length"] = rng.randint(1, 24)
        options["min_length"] = rng.randint(0, min(6, options["max_length"]))
    return options


def _prompts(rng: random.Random, reference: Reference) -> tuple[list[list[str]], list[list[str]] | None]:
    texts = rng.sample(PROMPTS, 3)
    tokens = [prompt_tokens(reference, t) for t in texts]
    prefixes = None
    if reference.seq2seq and rng.random() < 0.4:
        prefixes = [[f"w{rng.randrange(50)}" for _ in range(rng.randint(1, 3))] if rng.random() < 0.7 else None
                    for _ in tokens]
        if not any(prefixes):
            prefixes = None
    return tokens, prefixes


@pytest.fixture(scope="module")
def engines(gpt2_reference, marian_reference):
    with shmengine.Generator(gpt2_reference.onnx, intra_threads=1) as generator, \
            shmengine.Translator(marian_reference.onnx, intra_threads=1) as translator:
        yield {
            "gpt2": (gpt2_reference, ctranslate2.Generator(str(gpt2_reference.ct2), intra_threads=1), generator),
            "marian": (marian_reference, ctranslate2.Translator(str(marian_reference.ct2), intra_threads=1), translator),
        }


def _run(model, seq2seq: bool, tokens, prefixes, options) -> list[list[tuple[list[str], float]]]:
    if seq2seq:
        results = model.translate_batch(tokens, prefixes, **options)
        return [list(zip(r.hypotheses, r.scores)) for r in results]
    # one prompt at a time for CTranslate2: a batch of prompts of different lengths returns the
    # tails of the longer ones as if generated (see test_references); shmengine does the same
    results = [model.generate_batch([t], **options)[0] for t in tokens]
    return [list(zip(r.sequences, r.scores)) for r in results]


@pytest.mark.parametrize("kind", ["gpt2", "marian"])
@pytest.mark.parametrize("case", range(CASES))
def test_random_options_equal_ctranslate2(engines, kind, case):
    reference, theirs, ours = engines[kind]
    rng = random.Random(f"{kind}-{case}")
    options = _draw(rng, reference.seq2seq)
    tokens, prefixes = _prompts(rng, reference)
    expected = _run(theirs, reference.seq2seq, tokens, prefixes, options)
    got = _run(ours, reference.seq2seq, tokens, prefixes, options)
    context = f"options={options}, prefixes={prefixes}"
    for example, (mine, ct2) in enumerate(zip(got, expected)):
        assert [h for h, _ in mine] == [h for h, _ in ct2], f"example {example}: {context}"
        # a hypothesis that never lived (CTranslate2 scores it -1e10, then length-normalised in
        # float32) only has to be dead in both
        dead = [s <= DEAD for _, s in ct2]
        assert [s <= DEAD for _, s in mine] == dead, f"example {example}: {context}"
        np.testing.assert_allclose([s for (_, s), d in zip(mine, dead) if not d], [s for (_, s), d in zip(ct2, dead) if not d],
                                   atol=SCORE_TOLERANCE, err_msg=f"example {example}: {context}")


@pytest.mark.parametrize("kind", ["gpt2", "marian"])
def test_exact_stop_rule_equals_transformers_early_stopping_never(engines, kind):
    """``early_stopping="never"`` is transformers' exact beam search: the same best hypothesis and
    score on every prompt, at beam 2 and 3, where CTranslate2's rule (the default) differs from it
    on some of these prompts."""
    from .test_references import MAX_NEW_TOKENS, hf_generate

    reference, _, ours = engines[kind]
    rng = random.Random(f"never-{kind}")
    texts = [" ".join(f"w{rng.randrange(50)}" for _ in range(rng.randint(1, 8))) for _ in range(24)]
    tokens = [prompt_tokens(reference, text) for text in texts]

    def best(beam, **options):
        options.update(beam_size=beam, return_scores=True, return_end_token=True)
        if reference.seq2seq:
            results = ours.translate_batch(tokens, max_decoding_length=MAX_NEW_TOKENS, min_decoding_length=0, **options)
            return [(reference.tokenizer.convert_tokens_to_ids(r.hypotheses[0]), r.scores[0]) for r in results]
        results = ours.generate_batch(tokens, max_length=MAX_NEW_TOKENS, include_prompt_in_result=False, **options)
        return [(r.sequences_ids[0], r.scores[0]) for r in results]

    differs = 0
    for beam in (2, 3):
        exact, default = best(beam, early_stopping="never"), best(beam)
        for text, (ids, score), (default_ids, _) in zip(texts, exact, default):
            out = hf_generate(reference, text, do_sample=False, num_beams=beam, early_stopping="never")
            assert ids == out.generated[0], (beam, text)
            assert score == pytest.approx(float(out.sequences_scores[0]), abs=SCORE_TOLERANCE), (beam, text)
            differs += default_ids != ids
    assert differs > 0  # the prompts exercise the case the rule is for
