"""shmengine against the oracles: tokens equal transformers' generate() and CTranslate2's, scores
within 1e-3, for greedy and beam 4, at inter_threads 1 and 2 and with max_batch_size splitting;
and a script written against the ctranslate2 API runs unchanged with ``import shmengine as
ctranslate2``. The references and the settings under which the oracles agree are in
test_references.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shmengine

from .conftest import PROMPTS, ROOT, Reference, hf_greedy, prompt_tokens
from .test_references import BEAM_SIZE, MAX_NEW_TOKENS, SCORE_TOLERANCE, ct2_decode, hf_generate

SPLITS = [
    pytest.param({"inter_threads": 1}, id="inter1"),
    pytest.param({"inter_threads": 2}, id="inter2"),
    pytest.param({"inter_threads": 2, "max_batch_size": 3}, id="inter2-split3"),
]


def shm_decode(reference: Reference, engine_options: dict, **options) -> list[list[tuple[list[int], float]]]:
    """shmengine over PROMPTS: per prompt, its hypotheses as (ids, score), end token included."""
    tokens = [prompt_tokens(reference, text) for text in PROMPTS]
    max_batch_size = engine_options.get("max_batch_size", 0)
    common = dict(return_end_token=True, return_scores=True, max_batch_size=max_batch_size, **options)
    kwargs = {"inter_threads": engine_options["inter_threads"], "intra_threads": 1}
    if reference.seq2seq:
        with shmengine.Translator(reference.onnx, **kwargs) as translator:
            results = translator.translate_batch(tokens, max_decoding_length=MAX_NEW_TOKENS, min_decoding_length=0, **common)
        hypotheses = [[reference.tokenizer.convert_tokens_to_ids(h) for h in r.hypotheses] for r in results]
    else:
        with shmengine.Generator(reference.onnx, **kwargs) as generator:
            results = generator.generate_batch(tokens, max_length=MAX_NEW_TOKENS, include_prompt_in_result=False, **common)
        hypotheses = [r.sequences_ids for r in results]
    return [list(zip(h, r.scores)) for h, r in zip(hypotheses, results)]


@pytest.mark.parametrize("engine_options", SPLITS)
def test_greedy_equals_transformers_and_ctranslate2(reference, engine_options):
    expected = hf_greedy(reference, PROMPTS, MAX_NEW_TOKENS)
    ours = shm_decode(reference, engine_options, beam_size=1)
    assert [hyps[0][0] for hyps in ours] == expected
    theirs = ct2_decode(reference, beam_size=1, sampling_topk=1)
    np.testing.assert_allclose([h[0][1] for h in ours], [h[0][1] for h in theirs], atol=SCORE_TOLERANCE)


@pytest.mark.parametrize("engine_options", SPLITS)
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam4_equals_transformers_and_ctranslate2(reference, engine_options, length_penalty):
    ours = shm_decode(reference, engine_options, beam_size=BEAM_SIZE, num_hypotheses=BEAM_SIZE, length_penalty=length_penalty)
    theirs = ct2_decode(reference, beam_size=BEAM_SIZE, num_hypotheses=BEAM_SIZE, length_penalty=length_penalty)
    for text, mine, ct2 in zip(PROMPTS, ours, theirs):
        assert [ids for ids, _ in mine] == [ids for ids, _ in ct2], text
        np.testing.assert_allclose([s for _, s in mine], [s for _, s in ct2], atol=SCORE_TOLERANCE, err_msg=text)
    if length_penalty == 1.0 and engine_options["inter_threads"] == 1:
        for text, mine in zip(PROMPTS, ours):
            out = hf_generate(reference, text, do_sample=False, num_beams=BEAM_SIZE, num_return_sequences=BEAM_SIZE,
                              early_stopping=True, length_penalty=length_penalty)
            assert [ids for ids, _ in mine] == out.generated, text
            np.testing.assert_allclose([s for _, s in mine], out.sequences_scores.numpy(), atol=SCORE_TOLERANCE, err_msg=text)


def test_score_batch_equals_ctranslate2(reference):
    import ctranslate2

    tokens = [prompt_tokens(reference, text) for text in PROMPTS]
    if reference.seq2seq:
        targets = [reference.tokenizer.convert_ids_to_tokens(ids[:-1] if ids and ids[-1] == reference.eos_id else ids)
                   for ids in hf_greedy(reference, PROMPTS, MAX_NEW_TOKENS)]
        theirs = ctranslate2.Translator(str(reference.ct2), intra_threads=1).score_batch(tokens, targets)
        with shmengine.Translator(reference.onnx, inter_threads=2, intra_threads=1) as translator:
            ours = translator.score_batch(tokens, targets, max_batch_size=3)
    else:
        sequences = [t + ["w3", "w9"] for t in tokens]
        theirs = ctranslate2.Generator(str(reference.ct2), intra_threads=1).score_batch(sequences)
        with shmengine.Generator(reference.onnx, inter_threads=2, intra_threads=1) as generator:
            ours = generator.score_batch(sequences, max_batch_size=3)
    for mine, ct2 in zip(ours, theirs):
        assert mine.tokens == ct2.tokens
        np.testing.assert_allclose(mine.log_probs, ct2.log_probs, atol=SCORE_TOLERANCE)


CT2_SCRIPT = textwrap.dedent(
    '''
    import json, sys
    {import_line}

    generator_path, translator_path, gen_prompt, tr_source = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    out = {{"rank": ctranslate2.MpiInfo.getCurRank(), "ranks": ctranslate2.MpiInfo.getNRanks()}}

    generator = ctranslate2.Generator(generator_path, device="cpu", inter_threads=2, intra_threads=1)
    results = generator.generate_batch(gen_prompt, max_length=12, beam_size=2, return_scores=True, max_batch_size=2)
    out["generate"] = [(r.sequences[0], round(r.scores[0], 3)) for r in results]
    out["with_prompt"] = [r.sequences_ids[0] for r in generator.generate_batch(gen_prompt, max_length=12)]
    futures = generator.generate_batch(gen_prompt, max_length=8, asynchronous=True, include_prompt_in_result=False)
    out["async"] = [f.result().sequences[0] for f in futures]
    out["stream"] = [step.token for step in generator.generate_tokens(gen_prompt[0], max_length=8)]
    out["score"] = [[round(x, 3) for x in r.log_probs] for r in generator.score_batch(gen_prompt)]
    del generator

    translator = ctranslate2.Translator(translator_path, device="cpu", inter_threads=2, intra_threads=1)
    results = translator.translate_batch(tr_source, beam_size=2, max_decoding_length=10, return_scores=True, max_batch_size=2)
    out["translate"] = [(r.hypotheses[0], round(r.scores[0], 3)) for r in results]
    out["iterable"] = [r.hypotheses[0] for r in translator.translate_iterable(iter(tr_source), max_batch_size=2, max_decoding_length=10)]
    out["tscore"] = [[round(x, 3) for x in r.log_probs] for r in translator.score_batch(tr_source, [["w1", "w2"]] * len(tr_source))]
    print(json.dumps(out))
    '''
)


def test_a_ctranslate2_script_runs_unchanged(gpt2_reference, llama_reference, marian_reference):
    """The same script, once against ctranslate2 on its converted models, once with
    ``import shmengine as ctranslate2`` on the Optimum exports: the same output."""
    outputs = []
    for import_line, form in (("import ctranslate2", "ct2"), ("import shmengine as ctranslate2", "onnx")):
        for decoder in (gpt2_reference, llama_reference):
            gen_prompt = [prompt_tokens(decoder, t) for t in PROMPTS[:4] if len(prompt_tokens(decoder, t)) > 1]
            tr_source = [prompt_tokens(marian_reference, t) for t in PROMPTS[:4]]
            script = CT2_SCRIPT.format(import_line=import_line)
            run = subprocess.run(
                [sys.executable, "-c", script, str(getattr(decoder, form)), str(getattr(marian_reference, form)),
                 json.dumps(gen_prompt), json.dumps(tr_source)],
                capture_output=True, text=True, timeout=300, cwd=ROOT,
            )
            assert run.returncode == 0, run.stderr[-3000:]
            outputs.append(json.loads(run.stdout.strip().splitlines()[-1]))
    ct2_gpt2, ct2_llama, shm_gpt2, shm_llama = outputs
    for theirs, ours in ((ct2_gpt2, shm_gpt2), (ct2_llama, shm_llama)):
        for key in theirs:
            if key in ("score", "tscore"):
                np.testing.assert_allclose(np.concatenate(ours[key]), np.concatenate(theirs[key]), atol=2e-3, err_msg=key)
            elif key in ("generate", "translate"):
                assert [seq for seq, _ in ours[key]] == [seq for seq, _ in theirs[key]], key
                np.testing.assert_allclose([s for _, s in ours[key]], [s for _, s in theirs[key]], atol=2e-3, err_msg=key)
            else:
                assert ours[key] == theirs[key], key


def test_unmerged_seq2seq_decoder_pair_equals_merged(marian_reference, tmp_path):
    """The same Marian export without decoder_model_merged.onnx: decoder_model.onnx for the
    first step, decoder_with_past_model.onnx after it. Same tokens and scores."""
    import shutil

    unmerged = tmp_path / "unmerged"
    unmerged.mkdir()
    for f in marian_reference.onnx.iterdir():
        if f.is_file() and f.name != "decoder_model_merged.onnx":  # not .shmengine-cache (transforms.py)
            shutil.copy(f, unmerged / f.name)
    tokens = [prompt_tokens(marian_reference, text) for text in PROMPTS]
    options = dict(beam_size=BEAM_SIZE, max_decoding_length=MAX_NEW_TOKENS, min_decoding_length=0, return_scores=True)
    with shmengine.Translator(marian_reference.onnx) as merged, shmengine.Translator(unmerged) as pair:
        assert set(pair.model.graphs) == {"encoder", "decoder", "decoder_with_past"}
        a, b = merged.translate_batch(tokens, **options), pair.translate_batch(tokens, **options)
    assert [r.hypotheses for r in a] == [r.hypotheses for r in b]
    np.testing.assert_allclose([r.scores for r in a], [r.scores for r in b], atol=SCORE_TOLERANCE)
