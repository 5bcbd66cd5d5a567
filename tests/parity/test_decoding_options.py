"""The decoding and scoring options that test_random_options does not draw, one at a time, with
CTranslate2 as the oracle (and transformers' next-token distribution for top-p sampling, whose
draws no two implementations share): ``static_prompt``, ``end_token``, ``suppress_sequences``,
``disable_unk``, ``min_length`` / ``min_decoding_length`` with ``patience`` under beam search;
``score_batch``'s ``offset``, ``max_input_length`` and ``asynchronous``; top-p sampling and
sampling in the Translator."""

from __future__ import annotations

import ctranslate2
import numpy as np
import pytest

import shmengine

from .conftest import PROMPTS, prompt_tokens
from .test_references import SCORE_TOLERANCE

DEAD = -1e8


@pytest.fixture(scope="module")
def gpt2(gpt2_reference):
    with shmengine.Generator(gpt2_reference.onnx, intra_threads=1) as ours:
        yield gpt2_reference, ctranslate2.Generator(str(gpt2_reference.ct2), intra_threads=1), ours


@pytest.fixture(scope="module")
def marian(marian_reference):
    with shmengine.Translator(marian_reference.onnx, intra_threads=1) as ours:
        yield marian_reference, ctranslate2.Translator(str(marian_reference.ct2), intra_threads=1), ours


def _same(ours, theirs, context):
    """Same hypotheses in the same order, scores within tolerance (dead beams dead in both)."""
    for example, (mine, ct2) in enumerate(zip(ours, theirs)):
        assert [h for h, _ in mine] == [h for h, _ in ct2], f"example {example}: {context}"
        dead = [s <= DEAD for _, s in ct2]
        assert [s <= DEAD for _, s in mine] == dead, f"example {example}: {context}"
        np.testing.assert_allclose([s for (_, s), d in zip(mine, dead) if not d], [s for (_, s), d in zip(ct2, dead) if not d],
                                   atol=SCORE_TOLERANCE, err_msg=f"example {example}: {context}")


GENERATOR_OPTIONS = {
    "static_prompt": {"static_prompt": ["<|endoftext|>", "w3", "w14"]},
    "end_token": {"end_token": "w25"},
    "end_token_list": {"end_token": ["w25", "w30"], "beam_size": 2},
    "suppress_sequences": {"suppress_sequences": [["w25"], ["w31"], ["w7"]]},
    # no <unk> wins, but beams through it are pruned differently at beam 4 on these prompts
    "disable_unk": {"disable_unk": True, "beam_size": 4, "num_hypotheses": 4},
    "min_length_beam_patience": {"min_length": 8, "beam_size": 3, "patience": 2.0, "num_hypotheses": 4},
}


@pytest.mark.parametrize("name", GENERATOR_OPTIONS)
def test_generator_option_equals_ctranslate2(gpt2, name):
    reference, theirs, ours = gpt2
    options = dict(GENERATOR_OPTIONS[name], max_length=16, include_prompt_in_result=False, return_scores=True)
    prompts = [prompt_tokens(reference, text) for text in PROMPTS]

    def run(model):  # one prompt at a time, as in test_random_options
        return [[(h, s) for h, s in zip(r.sequences, r.scores)] for r in (model.generate_batch([p], **options)[0] for p in prompts)]

    expected, got = run(theirs), run(ours)
    _same(got, expected, options)
    # the option changes something on these prompts, so the equality above is not a default's
    plain = dict(options)
    for key in GENERATOR_OPTIONS[name]:
        if key not in ("beam_size", "num_hypotheses", "patience"):
            plain.pop(key)
    baseline = [[h for h, _ in r] for r in ([(h, s) for h, s in zip(x.sequences, x.scores)] for x in
                                            (theirs.generate_batch([p], **plain)[0] for p in prompts))]
    assert baseline != [[h for h, _ in r] for r in expected], f"{name} changes nothing on these prompts"


TRANSLATOR_OPTIONS = {
    "end_token": {"end_token": "w12"},
    "suppress_sequences": {"suppress_sequences": [["w12"], ["w40"]]},
    "disable_unk": {"disable_unk": True, "beam_size": 8, "num_hypotheses": 8},
    "min_decoding_length_beam_patience": {"min_decoding_length": 6, "beam_size": 3, "patience": 2.0, "num_hypotheses": 3},
}


@pytest.mark.parametrize("name", TRANSLATOR_OPTIONS)
def test_translator_option_equals_ctranslate2(marian, name):
    reference, theirs, ours = marian
    options = dict(TRANSLATOR_OPTIONS[name], max_decoding_length=12, return_scores=True)
    sources = [prompt_tokens(reference, text) for text in PROMPTS]

    def run(model, **opts):
        return [list(zip(r.hypotheses, r.scores)) for r in model.translate_batch(sources, **opts)]

    expected = run(theirs, **options)
    _same(run(ours, **options), expected, options)
    plain = {k: v for k, v in options.items() if k not in TRANSLATOR_OPTIONS[name] or k in ("beam_size", "num_hypotheses", "patience")}
    assert [[h for h, _ in r] for r in run(theirs, **plain)] != [[h for h, _ in r] for r in expected], f"{name} changes nothing"


def test_generator_score_batch_offset_max_input_length_and_asynchronous(gpt2):
    reference, theirs, ours = gpt2
    # GPT-2's tokenizer adds no bos: the one-word prompt is a single token, nothing to score
    # (an empty result, as CTranslate2's)
    tokens = [prompt_tokens(reference, text) for text in PROMPTS]
    full = theirs.score_batch(tokens)
    for offset in (0, 2):
        got = ours.score_batch(tokens, offset=offset)
        for mine, ct2 in zip(got, full):
            # offset skips that many more scored tokens at the start (CTranslate2 4.x has no
            # offset: its full score is the reference)
            assert mine.tokens == ct2.tokens[offset:]
            np.testing.assert_allclose(mine.log_probs, ct2.log_probs[offset:], atol=SCORE_TOLERANCE)
    for limit in (3, 7):
        for mine, ct2 in zip(ours.score_batch(tokens, max_input_length=limit), theirs.score_batch(tokens, max_input_length=limit)):
            assert mine.tokens == ct2.tokens
            np.testing.assert_allclose(mine.log_probs, ct2.log_probs, atol=SCORE_TOLERANCE)
    futures = ours.score_batch(tokens, asynchronous=True, max_batch_size=3)
    assert all(hasattr(f, "result") for f in futures)
    for future, ct2 in zip(futures, full):
        result = future.result(timeout=60)
        assert result.tokens == ct2.tokens
        np.testing.assert_allclose(result.log_probs, ct2.log_probs, atol=SCORE_TOLERANCE)


def test_translator_score_batch_max_input_length_and_asynchronous(marian):
    reference, theirs, ours = marian
    sources = [prompt_tokens(reference, text) for text in PROMPTS]
    targets = [prompt_tokens(reference, text)[:-1][::-1] for text in PROMPTS]  # some target per source
    for limit in (1024, 4):
        for mine, ct2 in zip(ours.score_batch(sources, targets, max_input_length=limit),
                             theirs.score_batch(sources, targets, max_input_length=limit)):
            assert mine.tokens == ct2.tokens
            np.testing.assert_allclose(mine.log_probs, ct2.log_probs, atol=SCORE_TOLERANCE)
    futures = ours.score_batch(sources, targets, asynchronous=True)
    for future, ct2 in zip(futures, theirs.score_batch(sources, targets)):
        np.testing.assert_allclose(future.result(timeout=60).log_probs, ct2.log_probs, atol=SCORE_TOLERANCE)


def _next_token_probs(reference, text: str) -> np.ndarray:
    """transformers' distribution of the first generated token after ``text`` (float64)."""
    import torch

    ids = torch.tensor([reference.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        if reference.seq2seq:
            start = torch.tensor([[reference.special["decoder_start"]]])
            logits = reference.model(input_ids=ids, decoder_input_ids=start).logits[0, -1]
        else:
            logits = reference.model(input_ids=ids).logits[0, -1]
    return torch.softmax(logits.double(), -1).numpy()


def _nucleus(probs: np.ndarray, top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches ``top_p``."""
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    return set(order[: int(np.searchsorted(mass, top_p)) + 1].tolist())


@pytest.mark.parametrize("kind", ["gpt2", "marian"])
def test_top_p_samples_only_from_transformers_nucleus(gpt2, marian, kind):
    """Draws of the first token with sampling_topp=p: every one is in the nucleus computed from
    transformers' distribution, and they are not all the same token (it does sample)."""
    reference, _, ours = gpt2 if kind == "gpt2" else marian
    text, top_p = PROMPTS[3], 0.6
    probs = _next_token_probs(reference, text)
    nucleus = _nucleus(probs, top_p)
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    # the cut is not within float noise of p, so both implementations must agree on the set
    assert np.min(np.abs(mass - top_p)) > 1e-3 and len(nucleus) > 1
    tokens = [prompt_tokens(reference, text)] * 200
    shmengine.set_random_seed(5)
    options = dict(sampling_topk=0, sampling_topp=top_p, return_end_token=True)
    if reference.seq2seq:
        results = ours.translate_batch(tokens, max_decoding_length=1, beam_size=1, **options)
        first = [reference.tokenizer.convert_tokens_to_ids(r.hypotheses[0][0]) for r in results]
    else:
        results = ours.generate_batch(tokens, max_length=1, include_prompt_in_result=False, **options)
        first = [r.sequences_ids[0][0] for r in results]
    assert set(first) <= nucleus, f"sampled outside the nucleus: {set(first) - nucleus}"
    assert len(set(first)) > 1
    # and the most likely tokens come up most often: the top token at least as often as the last
    counts = {t: first.count(t) for t in nucleus}
    assert counts[int(order[0])] >= min(counts.values())


def test_translator_sampling_is_seeded_and_topk_1_is_greedy(marian):
    reference, theirs, ours = marian
    sources = [prompt_tokens(reference, text) for text in PROMPTS] * 3

    def sample(seed):
        shmengine.set_random_seed(seed)
        return [r.hypotheses[0] for r in ours.translate_batch(sources, beam_size=1, sampling_topk=0, sampling_temperature=2.0,
                                                               max_decoding_length=8, max_batch_size=4)]

    first = sample(11)
    assert sample(11) == first and sample(12) != first
    assert len({tuple(h) for h in first}) > len(PROMPTS)  # repeated sources get other samples
    greedy = [r.hypotheses[0] for r in theirs.translate_batch(sources, beam_size=1, max_decoding_length=8)]
    assert [r.hypotheses[0] for r in ours.translate_batch(sources, beam_size=1, sampling_topk=1, max_decoding_length=8)] == greedy
