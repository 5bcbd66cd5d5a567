"""The reference models agree with themselves: transformers, CTranslate2 and ONNX Runtime (over the
Optimum export) give the same tokens and scores. No shmengine here: these tests say what the
oracle is, and under which settings its three forms agree.

Settings that make transformers' ``generate`` and CTranslate2 agree (greedy and beam 4):

- transformers ``max_new_tokens=N`` == ``Generator.generate_batch(max_length=N,
  include_prompt_in_result=False)`` == ``Translator.translate_batch(max_decoding_length=N,
  min_decoding_length=0)``. The end token counts as one of the N. (With the prompt included,
  ``max_length`` counts the prompt less its first token.) ``translate_batch``'s default
  ``min_decoding_length=1`` forbids an empty translation, which transformers allows.
- beam search: ``num_beams=4, early_stopping=True`` with the same ``length_penalty`` as
  ``beam_size=4``; both stop once 4 hypotheses have ended (CTranslate2's ``patience=1``).
  ``early_stopping=False`` or ``"never"`` may go on and find a better long hypothesis.
- scores: transformers' beam ``sequences_scores`` and CTranslate2's ``scores`` are both
  ``sum(log p(token)) / len ** length_penalty`` over the generated tokens, end token included
  (in the sum and in len). CTranslate2 normalizes greedy scores the same way (default
  ``length_penalty=1``: the mean); transformers has no greedy sequence score, only per-step logits.
"""

from __future__ import annotations

import ctranslate2
import numpy as np
import onnx
import pytest
import torch

from models.reference import MAX_IR_VERSION, vocabulary

from .conftest import PROMPTS, Reference, hf_greedy, onnx_greedy, prompt_tokens, until_eos

MAX_NEW_TOKENS = 20
BEAM_SIZE = 4
SCORE_TOLERANCE = 1e-3


# -- the three runtimes, each returning generated ids per prompt, eos included where generated --


def _prompt_ids(reference: Reference, text: str) -> torch.Tensor:
    return torch.tensor([reference.tokenizer(text)["input_ids"]])


def hf_generate(reference: Reference, text: str, **kwargs):
    """transformers' ``generate`` on one prompt; returns the output with ``.generated``: the new
    ids of each returned sequence, cut after eos (beam pads shorter hypotheses)."""
    ids = _prompt_ids(reference, text)
    with torch.no_grad():
        out = reference.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    start = 1 if reference.seq2seq else ids.shape[1]  # seq2seq sequences start with decoder_start
    out.generated = [until_eos(row[start:].tolist(), reference.eos_id) for row in out.sequences]
    return out


def hf_token_log_probs(reference: Reference, text: str) -> tuple[list[int], list[float]]:
    """Greedy ids and the log-probability of each (the log-softmax of that step's logits)."""
    out = hf_generate(reference, text, do_sample=False, num_beams=1)
    ids = out.generated[0]
    log_probs = [torch.log_softmax(step[0].double(), -1)[token].item() for step, token in zip(out.scores, ids)]
    return ids, log_probs


def ct2_decode(reference: Reference, **options) -> list[list[tuple[list[int], float | None]]]:
    """CTranslate2 over PROMPTS: per prompt, its hypotheses as (ids, score or None)."""
    tokens = [prompt_tokens(reference, text) for text in PROMPTS]
    common = dict(return_end_token=True, return_scores=True, **options)
    if reference.seq2seq:
        translator = ctranslate2.Translator(str(reference.ct2), device="cpu", intra_threads=1)
        results = translator.translate_batch(
            tokens, max_decoding_length=MAX_NEW_TOKENS, min_decoding_length=0, **common
        )
        hypotheses = [[reference.tokenizer.convert_tokens_to_ids(h) for h in r.hypotheses] for r in results]
    else:
        generator = ctranslate2.Generator(str(reference.ct2), device="cpu", intra_threads=1)
        # max_batch_size=1: see test_ct2_batch_equals_one_by_one for what a batch that holds a
        # one-token prompt does.
        results = generator.generate_batch(
            tokens, max_length=MAX_NEW_TOKENS, include_prompt_in_result=False, max_batch_size=1, **common
        )
        hypotheses = [r.sequences_ids for r in results]
    return [list(zip(h, r.scores or [None] * len(h))) for h, r in zip(hypotheses, results)]


# -- the references themselves ---------------------------------------------------------------------


def test_exports_are_readable_and_complete(reference):
    files = sorted(p.name for p in reference.onnx.glob("*.onnx"))
    if reference.seq2seq:
        assert files == [
            "decoder_model.onnx",
            "decoder_model_merged.onnx",
            "decoder_with_past_model.onnx",
            "encoder_model.onnx",
        ]
    else:
        assert files == ["model.onnx"]
    for path in reference.onnx.glob("*.onnx"):
        assert onnx.load(str(path), load_external_data=False).ir_version <= MAX_IR_VERSION, path.name
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (reference.onnx / name).exists(), name
    assert (reference.ct2 / "model.bin").exists()


def test_graph_inputs_and_outputs(reference):
    """The names and shapes the engine reads from the sessions (see conftest.onnx_greedy)."""
    import onnxruntime as ort

    config = reference.model.config
    layers = config.num_hidden_layers
    if reference.seq2seq:
        graphs = {
            "encoder_model.onnx": (["input_ids", "attention_mask"], ["last_hidden_state"]),
            "decoder_model.onnx": (
                ["encoder_attention_mask", "input_ids", "encoder_hidden_states"],
                ["logits"] + _present(layers, ("decoder", "encoder")),
            ),
            "decoder_with_past_model.onnx": (
                ["encoder_attention_mask", "input_ids"] + _past(layers, ("decoder", "encoder")),
                ["logits"] + _present(layers, ("decoder",)),
            ),
            "decoder_model_merged.onnx": (
                ["encoder_attention_mask", "input_ids", "encoder_hidden_states"]
                + _past(layers, ("decoder", "encoder"))
                + ["use_cache_branch"],
                ["logits"] + _present(layers, ("decoder", "encoder")),
            ),
        }
        kv_heads = config.decoder_attention_heads
        head_dim = config.d_model // config.decoder_attention_heads
    else:
        graphs = {
            "model.onnx": (
                ["input_ids", "attention_mask", "position_ids"] + _past(layers, (None,)),
                ["logits"] + _present(layers, (None,)),
            )
        }
        kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        head_dim = config.hidden_size // config.num_attention_heads
    for file, (inputs, outputs) in graphs.items():
        session = ort.InferenceSession(str(reference.onnx / file), providers=["CPUExecutionProvider"])
        assert sorted(i.name for i in session.get_inputs()) == sorted(inputs), file
        assert sorted(o.name for o in session.get_outputs()) == sorted(outputs), file
        for meta in session.get_inputs() + session.get_outputs():
            if meta.name.startswith(("past_key_values.", "present.")):
                assert meta.shape[1] == kv_heads and meta.shape[3] == head_dim, (file, meta.name, meta.shape)
            if meta.name == "logits":
                assert meta.shape[2] == len(vocabulary(reference.kind)), (file, meta.shape)


def _past(layers: int, parts) -> list[str]:
    return [_kv("past_key_values", i, part, kv) for i in range(layers) for part in parts for kv in ("key", "value")]


def _present(layers: int, parts) -> list[str]:
    return [_kv("present", i, part, kv) for i in range(layers) for part in parts for kv in ("key", "value")]


def _kv(prefix: str, layer: int, part, kv: str) -> str:
    return f"{prefix}.{layer}.{part}.{kv}" if part else f"{prefix}.{layer}.{kv}"


def test_llama_reference_uses_grouped_query_attention(llama_reference):
    config = llama_reference.model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)


def test_special_tokens(reference):
    tokenizer, special = reference.tokenizer, reference.special
    assert tokenizer.eos_token_id == special["eos"]
    assert reference.model.generation_config.eos_token_id == special["eos"]
    vocab = vocabulary(reference.kind)
    assert tokenizer.convert_ids_to_tokens(list(range(len(vocab)))) == vocab
    if reference.kind == "marian":
        # <pad> is the last id and starts the decoder; CTranslate2 drops it from its vocabulary.
        assert special["pad"] == special["decoder_start"] == len(vocab) - 1
        assert reference.model.config.decoder_start_token_id == special["pad"]
        assert prompt_tokens(reference, "w1 w2")[-1] == "</s>"
        translator = ctranslate2.Translator(str(reference.ct2), device="cpu")
        assert translator.score_batch([["w1", "</s>"]], [["w2"]])[0].tokens == ["w2", "</s>"]
    elif reference.kind == "llama-gqa":
        assert prompt_tokens(reference, "w1 w2") == ["<s>", "w1", "w2"]
    else:
        assert prompt_tokens(reference, "w1 w2") == ["w1", "w2"]


def test_outputs_depend_on_the_prompt(reference):
    """Guards the scaled init: a model that ignores its input would make every parity test weak."""
    outputs = hf_greedy(reference, PROMPTS, MAX_NEW_TOKENS)
    assert len({tuple(out[:3]) for out in outputs}) >= 6
    assert any(out[-1] == reference.eos_id for out in outputs), "some output should end early"
    assert any(len(out) == MAX_NEW_TOKENS and reference.eos_id not in out for out in outputs)
    assert max(len(set(out)) for out in outputs) >= 5, "outputs should not be one repeated token"


# -- greedy ----------------------------------------------------------------------------------------


def test_greedy_ct2_equals_transformers(reference):
    expected = hf_greedy(reference, PROMPTS, MAX_NEW_TOKENS)
    got = [hyps[0][0] for hyps in ct2_decode(reference, beam_size=1, sampling_topk=1)]
    assert got == expected


def test_greedy_onnx_equals_transformers(reference):
    expected = hf_greedy(reference, PROMPTS, MAX_NEW_TOKENS)
    assert onnx_greedy(reference, PROMPTS, MAX_NEW_TOKENS) == expected


def test_greedy_onnx_unmerged_decoder_equals_transformers(marian_reference):
    expected = hf_greedy(marian_reference, PROMPTS, MAX_NEW_TOKENS)
    assert onnx_greedy(marian_reference, PROMPTS, MAX_NEW_TOKENS, decoder="unmerged") == expected


def test_ct2_batch_equals_one_by_one(gpt2_reference, llama_reference):
    """A batch gives what one-by-one gives, as long as no prompt is a single token.

    CTranslate2 4.8.5, ``include_prompt_in_result=False``: a batch forwards the prompts up to the
    shortest one's length at once and decodes the rest constrained. When the shortest prompt is
    one token (GPT-2's "w7"; Llama's prompts all start with <s>), the longer prompts' tokens after
    their first come back at the start of their results and count against ``max_length``.
    """
    for reference in (gpt2_reference, llama_reference):
        generator = ctranslate2.Generator(str(reference.ct2), device="cpu", intra_threads=1)
        tokens = [t for t in (prompt_tokens(reference, text) for text in PROMPTS) if len(t) > 1]
        options = dict(max_length=MAX_NEW_TOKENS, sampling_topk=1, include_prompt_in_result=False)
        batch = generator.generate_batch(tokens, **options)
        single = generator.generate_batch(tokens, max_batch_size=1, **options)
        assert [r.sequences_ids for r in batch] == [r.sequences_ids for r in single], reference.kind


# -- beam search -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_ct2_equals_transformers(reference, length_penalty):
    """All 4 hypotheses, in order, with their scores."""
    ct2 = ct2_decode(reference, beam_size=BEAM_SIZE, num_hypotheses=BEAM_SIZE, length_penalty=length_penalty)
    for text, hypotheses in zip(PROMPTS, ct2):
        out = hf_generate(
            reference,
            text,
            do_sample=False,
            num_beams=BEAM_SIZE,
            num_return_sequences=BEAM_SIZE,
            early_stopping=True,
            length_penalty=length_penalty,
        )
        assert [ids for ids, _ in hypotheses] == out.generated, text
        np.testing.assert_allclose(
            [score for _, score in hypotheses], out.sequences_scores.numpy(), atol=SCORE_TOLERANCE, err_msg=text
        )


def test_beam_score_is_normalized_sum_of_log_probs(reference):
    """transformers' beam score, recomputed from CTranslate2's per-token log-probs: the sum over
    the generated tokens (eos included) divided by their number (length_penalty=1)."""
    for text, hypotheses in zip(PROMPTS, ct2_decode(reference, beam_size=BEAM_SIZE, num_hypotheses=1)):
        ids, score = hypotheses[0]
        log_probs = _ct2_token_log_probs(reference, text, ids)
        assert score == pytest.approx(sum(log_probs) / len(ids), abs=SCORE_TOLERANCE), text


# -- scores ----------------------------------------------------------------------------------------


def _ct2_token_log_probs(reference: Reference, text: str, ids: list[int]) -> list[float]:
    """CTranslate2's score_batch for ``ids`` after ``text``: one log-prob per id."""
    prompt = prompt_tokens(reference, text)
    target = reference.tokenizer.convert_ids_to_tokens(ids)
    if reference.seq2seq:
        translator = ctranslate2.Translator(str(reference.ct2), device="cpu", intra_threads=1)
        # The target goes in without </s>: score_batch appends it and scores it (one extra
        # log-prob when the hypothesis stopped at max length without eos).
        ended = bool(ids) and ids[-1] == reference.eos_id
        result = translator.score_batch([prompt], [target[:-1] if ended else target])[0]
        return result.log_probs[: len(ids)]
    generator = ctranslate2.Generator(str(reference.ct2), device="cpu", intra_threads=1)
    # One log-prob per token after the first: the last len(ids) are the generated ones.
    result = generator.score_batch([prompt + target])[0]
    return result.log_probs[len(prompt) - 1 :]


def test_greedy_scores(reference):
    """CTranslate2's greedy score is the mean log-prob of the generated tokens, eos included
    (length_penalty=1, the default) or their sum (length_penalty=0); score_batch gives each
    token's log-prob. All within 1e-3 of transformers' log-softmax of its step logits."""
    mean = ct2_decode(reference, beam_size=1, sampling_topk=1, length_penalty=1.0)
    total = ct2_decode(reference, beam_size=1, sampling_topk=1, length_penalty=0.0)
    for text, [(ids, mean_score)], [(_, sum_score)] in zip(PROMPTS, mean, total):
        hf_ids, hf_log_probs = hf_token_log_probs(reference, text)
        assert ids == hf_ids, text
        assert mean_score == pytest.approx(np.mean(hf_log_probs), abs=SCORE_TOLERANCE), text
        assert sum_score == pytest.approx(np.sum(hf_log_probs), abs=SCORE_TOLERANCE), text
        np.testing.assert_allclose(
            _ct2_token_log_probs(reference, text, ids), hf_log_probs, atol=SCORE_TOLERANCE, err_msg=text
        )
