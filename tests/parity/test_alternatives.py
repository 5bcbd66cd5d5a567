"""``return_alternatives`` against CTranslate2 on the same weights (GPT-2 and Marian).

CTranslate2's ``decode_alternatives`` (``src/decoding.cc``) takes the ``num_hypotheses`` most
likely tokens at the first position after the prompt or target prefix and continues each with
the search. Random option sets (seeded, as in ``test_random_options``) must give the same
hypotheses, in the same order, with the same scores.

One place where shmengine deliberately differs: with a target prefix of two tokens or more on a
model converted with ``start_from_zero_embedding`` (Marian), CTranslate2 feeds the start token and
the prefix as one block at step 0, and its ``zero_first_timestep`` then zeroes the embeddings of
the whole block, not of the start token alone (checked: transformers fed the same zeroed block
gives CTranslate2's tokens). So those cases are checked against CTranslate2's ordinary decoding
of the same prefix, which reads the prefix correctly, instead.
"""

from __future__ import annotations

import random

import ctranslate2
import numpy as np
import pytest

import shmengine

from .conftest import PROMPTS, prompt_tokens
from .test_references import SCORE_TOLERANCE

CASES = 20  # per model kind (60 per kind agreed when this was written)


def _draw(rng: random.Random, seq2seq: bool) -> dict:
    beam = rng.choice([1, 1, 2, 3])
    options = {
        "return_alternatives": True,
        "beam_size": beam,
        "patience": rng.choice([1, 1, 2]) if beam > 1 else 1,
        "num_hypotheses": rng.randint(1, 5),  # may exceed beam_size: alternatives allow it
        "length_penalty": rng.choice([1.0, 0.0, 0.6]),
        "repetition_penalty": rng.choice([1.0, 1.0, 1.3, 2.0]),
        "no_repeat_ngram_size": rng.choice([0, 0, 2, 3]),
        "return_end_token": rng.choice([False, True]),
        "return_scores": True,
    }
    if rng.random() < 0.3:
        options["min_alternative_expansion_prob"] = rng.choice([0.01, 0.05, 0.1])
    if seq2seq:
        options["max_decoding_length"] = rng.randint(1, 16)
        options["min_decoding_length"] = rng.randint(0, min(6, options["max_decoding_length"]))
    else:
        options["include_prompt_in_result"] = rng.choice([False, True])
        options["max_length"] = rng.randint(1, 24)
        options["min_length"] = rng.randint(0, min(6, options["max_length"]))
    return options


@pytest.fixture(scope="module")
def engines(gpt2_reference, marian_reference):
    with shmengine.Generator(gpt2_reference.onnx, intra_threads=1) as generator, \
            shmengine.Translator(marian_reference.onnx, intra_threads=1) as translator:
        yield {
            "gpt2": (gpt2_reference, ctranslate2.Generator(str(gpt2_reference.ct2), intra_threads=1), generator),
            "marian": (marian_reference, ctranslate2.Translator(str(marian_reference.ct2), intra_threads=1), translator),
        }


def _one(model, seq2seq, tokens, prefix, options):
    if seq2seq:
        result = model.translate_batch([tokens], [prefix] if prefix else None, **options)[0]
        return list(zip(result.hypotheses, result.scores))
    result = model.generate_batch([tokens], **options)[0]
    return list(zip(result.sequences, result.scores))


@pytest.mark.parametrize("kind", ["gpt2", "marian"])
@pytest.mark.parametrize("case", range(CASES))
def test_alternatives_equal_ctranslate2(engines, kind, case):
    reference, theirs, ours = engines[kind]
    seq2seq = reference.seq2seq
    rng = random.Random(f"alternatives-{kind}-{case}")
    options = _draw(rng, seq2seq)
    tokens = [prompt_tokens(reference, text) for text in rng.sample(PROMPTS, 3)]
    prefixes = [None] * len(tokens)
    if seq2seq and rng.random() < 0.5:  # one-token prefixes: see the module's docstring for longer ones
        prefixes = [[f"w{rng.randrange(50)}"] if rng.random() < 0.7 else None for _ in tokens]
    # shmengine decodes the batch together; CTranslate2 decodes each example alone in this mode
    if seq2seq:
        results = ours.translate_batch(tokens, prefixes if any(prefixes) else None, **options)
        got = [list(zip(r.hypotheses, r.scores)) for r in results]
    else:
        # one prompt at a time for GPT-2 too: CTranslate2 returns the tails of longer prompts in
        # a batch of unequal prompts as generated (test_random_options)
        got = [_one(ours, False, t, None, options) for t in tokens]
    context = f"options={options}, prefixes={prefixes}"
    compared = 0
    for example, (t, prefix) in enumerate(zip(tokens, prefixes)):
        if not got[example]:
            # no alternative above min_alternative_expansion_prob: CTranslate2 crashes
            # (floating point exception); shmengine returns no hypothesis
            assert options.get("min_alternative_expansion_prob", 0) > 0, context
            continue
        if not seq2seq and options["beam_size"] > 1 and not options["include_prompt_in_result"] and len(t) > options["max_length"]:
            # CTranslate2 runs a beam over max_length - len(prompt) < 0 steps and reads past its
            # results (undefined: a crash or garbage); shmengine returns the alternatives alone
            assert all(len(h) == 1 for h, _ in got[example]), context
            continue
        expected = _one(theirs, seq2seq, t, prefix, options)
        mine = got[example]
        assert [h for h, _ in mine] == [h for h, _ in expected], f"example {example}: {context}"
        np.testing.assert_allclose([s for _, s in mine], [s for _, s in expected], atol=SCORE_TOLERANCE,
                                   err_msg=f"example {example}: {context}")
        compared += 1
    assert compared or options.get("min_alternative_expansion_prob", 0) > 0


def test_alternatives_after_a_long_prefix_continue_it(engines, marian_reference):
    """A prefix of three tokens: the alternatives are the three most likely tokens after it
    (transformers' logits, end and pad tokens excluded: CTranslate2 bans the end token there and
    has no pad), and each continues as CTranslate2's ordinary greedy decoding of the prefix plus
    that alternative."""
    import torch

    reference, theirs, ours = engines["marian"]
    tokenizer, model = reference.tokenizer, reference.model
    prefix = ["w8", "w19", "w44"]
    for text in PROMPTS[2:6]:
        source = prompt_tokens(reference, text)
        result = ours.translate_batch([source], [prefix], beam_size=1, num_hypotheses=3, max_decoding_length=10,
                                      return_alternatives=True, return_scores=True)[0]
        encoded = tokenizer(text, return_tensors="pt", return_token_type_ids=False)
        decoder_ids = [[model.config.decoder_start_token_id, *tokenizer.convert_tokens_to_ids(prefix)]]
        with torch.no_grad():
            logits = model(**encoded, decoder_input_ids=torch.tensor(decoder_ids)).logits[0, -1]
        log_probs = torch.log_softmax(logits.masked_fill(torch.tensor(
            [i in (reference.special["eos"], reference.special["pad"]) for i in range(len(logits))]), -np.inf), -1)
        top = torch.topk(log_probs, 3)
        alternatives = tokenizer.convert_ids_to_tokens(top.indices.tolist())
        assert [h[len(prefix)] for h in result.hypotheses] == alternatives, text
        for hypothesis, alternative in zip(result.hypotheses, alternatives):
            greedy = theirs.translate_batch([source], [prefix + [alternative]], beam_size=1, max_decoding_length=10)[0]
            assert hypothesis == greedy.hypotheses[0], text
        # a greedy continuation's score is its mean log-probability (length_penalty 1): the
        # alternative's own log-probability is the rest
        assert result.scores[0] <= float(top.values[0]) + 1e-4


def test_alternatives_options_are_checked(engines):
    _, _, translator = engines["marian"]
    source = [["w1", "</s>"]]
    with pytest.raises(ValueError, match="min_alternative_expansion_prob"):
        translator.translate_batch(source, return_alternatives=True, min_alternative_expansion_prob=1.5)
    with pytest.raises(ValueError, match="prefix_bias_beta"):
        translator.translate_batch(source, return_alternatives=True, prefix_bias_beta=0.5)
    with pytest.raises(ValueError, match="callback"):
        translator.translate_batch(source, return_alternatives=True, beam_size=1, callback=lambda step: False)
