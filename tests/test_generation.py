"""Generator and Translator on the bundled number models: accuracy, API behaviour, bad input.

The expected words come from models/numbers_heldout.tsv, written by the reference function
``number_to_words`` in models/train_numbers.py, not by shmengine.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from conftest import ROOT

import shmengine
from models.train_numbers import number_to_words
from shmengine import InvalidInputError, ModelLoadError

MARIAN = ROOT / "models" / "numbers-marian"
GPT2 = ROOT / "models" / "numbers-gpt2"


def heldout() -> list[tuple[str, str]]:
    with open(ROOT / "models" / "numbers_heldout.tsv", encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


def digits(number: str) -> list[str]:
    """The source tokens of a number, as the Marian model's tokenizer makes them."""
    return list(number) + ["</s>"]


@pytest.fixture(scope="module")
def translator():
    with shmengine.Translator(MARIAN, inter_threads=2, intra_threads=1) as t:
        yield t


@pytest.fixture(scope="module")
def generator():
    with shmengine.Generator(GPT2, inter_threads=2, intra_threads=1) as g:
        yield g


def test_translator_writes_held_out_numbers_in_words(translator):
    pairs = heldout()
    assert len(pairs) == 1000
    results = translator.translate_batch([digits(n) for n, _ in pairs], beam_size=1, max_batch_size=64)
    wrong = [(n, " ".join(r.hypotheses[0])) for r, (n, words) in zip(results, pairs) if " ".join(r.hypotheses[0]) != words]
    assert not wrong, f"{len(wrong)} of {len(pairs)} wrong (the model gets all right), e.g. {wrong[:3]}"


def test_generator_continues_held_out_numbers(generator):
    pairs = heldout()
    bos = generator.vocabulary.id_to_token[generator.model.bos_id]
    prompts = [[bos, *n, "="] for n, _ in pairs]
    results = generator.generate_batch(prompts, max_batch_size=64, max_length=24, include_prompt_in_result=False)
    wrong = [(n, " ".join(r.sequences[0])) for r, (n, words) in zip(results, pairs) if " ".join(r.sequences[0]) != words]
    assert not wrong, f"{len(wrong)} of {len(pairs)} wrong (the model gets all right), e.g. {wrong[:3]}"


def test_split_and_async_results_come_back_in_input_order(translator):
    pairs = heldout()[:40]
    source = [digits(n) for n, _ in pairs]
    whole = [r.hypotheses[0] for r in translator.translate_batch(source, beam_size=2)]
    for kwargs in ({"max_batch_size": 3}, {"max_batch_size": 20, "batch_type": "tokens"}):
        split = translator.translate_batch(source, beam_size=2, **kwargs)
        assert [r.hypotheses[0] for r in split] == whole
    futures = translator.translate_batch(source, beam_size=2, max_batch_size=7, asynchronous=True)
    assert [f.result(timeout=60).hypotheses[0] for f in futures] == whole

    async def gather():
        fs = translator.translate_batch(source[:5], beam_size=2, asynchronous=True)
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in fs))

    assert [r.hypotheses[0] for r in asyncio.run(gather())] == whole[:5]


def test_beam_hypotheses_and_scores(translator):
    result = translator.translate_batch([digits("1984")], beam_size=4, num_hypotheses=3, return_scores=True)[0]
    assert len(result.hypotheses) == 3 and result.scores == sorted(result.scores, reverse=True)
    assert " ".join(result.hypotheses[0]) == "one thousand nine hundred eighty four"


@pytest.mark.parametrize("beam_size", [1, 3])
def test_target_prefix_is_kept_and_continued(translator, beam_size):
    """The prefix starts the hypothesis even where the model would not say it (``two`` for
    1984), and decoding continues from it: the rest of the number's words follow."""
    words = number_to_words(1984).split()  # one thousand nine hundred eighty four
    prefixes = [words[:2], ["two"], None]
    results = translator.translate_batch([digits("1984")] * 3, prefixes, beam_size=beam_size)
    assert results[0].hypotheses[0] == words
    assert results[1].hypotheses[0] == ["two", *words[1:]]
    assert results[2].hypotheses[0] == words  # an example without a prefix in the same batch


def test_scores_prefer_the_right_words(translator, generator):
    right, wrong = translator.score_batch(
        [digits("42"), digits("42")], [["forty", "two"], ["forty", "three"]]
    )
    assert right.tokens == ["forty", "two", "</s>"] and wrong.tokens == ["forty", "three", "</s>"]
    assert len(right.log_probs) == len(wrong.log_probs) == 3 and all(lp <= 0 for lp in right.log_probs + wrong.log_probs)
    assert right.log_probs[0] == pytest.approx(wrong.log_probs[0], abs=1e-4)  # same first word, same context
    assert sum(right.log_probs) > sum(wrong.log_probs)
    bos = generator.vocabulary.id_to_token[generator.model.bos_id]
    good, bad = generator.score_batch([[bos, "4", "2", "=", "forty", "two"], [bos, "4", "2", "=", "forty", "one"]])
    assert good.tokens == ["4", "2", "=", "forty", "two"] and len(good.log_probs) == 5
    assert good.log_probs[-1] > bad.log_probs[-1]


def test_generate_tokens_streams_what_generate_batch_returns(generator):
    bos = generator.vocabulary.id_to_token[generator.model.bos_id]
    prompt = [bos, "7", "0", "7", "="]
    batch = generator.generate_batch([prompt], max_length=20, include_prompt_in_result=False)[0].sequences[0]
    steps = list(generator.generate_tokens(prompt, max_length=20, include_prompt_in_result=False))
    assert [s.token for s in steps if not (s.is_last and s.token_id in generator.model.eos_ids)] == batch
    assert steps[-1].is_last and [s.step for s in steps] == list(range(len(steps)))
    first_two = []
    for step in generator.generate_tokens(prompt, max_length=20, include_prompt_in_result=False):
        first_two.append(step.token)
        if len(first_two) == 2:
            break  # closing the stream early stops the decoding; the engine stays usable
    assert first_two == batch[:2]
    assert generator.generate_batch([prompt], max_length=20, include_prompt_in_result=False)[0].sequences[0] == batch


def test_callback_can_stop_an_example(generator):
    bos = generator.vocabulary.id_to_token[generator.model.bos_id]
    seen = []

    def callback(step):
        seen.append((step.batch_id, step.token))
        return step.batch_id == 0 and step.step == 0

    results = generator.generate_batch(
        [[bos, "1", "2", "3", "="], [bos, "4", "5", "6", "="]], max_length=20, include_prompt_in_result=False, callback=callback
    )
    assert len(results[0].sequences[0]) == 1
    assert " ".join(results[1].sequences[0]) == "four hundred fifty six"
    assert [t for b, t in seen if b == 1][: len(results[1].sequences[0])] == results[1].sequences[0]


def test_sampling_is_reproducible_with_set_random_seed(generator):
    """The same seed gives the same samples; another seed gives others; and the batches of one
    call (three of two identical prompts each) do not repeat each other's samples: each batch
    gets a seed of its own from the seeded source, not the seed itself."""
    bos = generator.vocabulary.id_to_token[generator.model.bos_id]
    prompts = [[bos, "9", "="]] * 6

    def sample(seed):
        shmengine.set_random_seed(seed)
        return [tuple(r.sequences[0]) for r in generator.generate_batch(
            prompts, sampling_topk=0, sampling_temperature=50.0, max_length=10, include_prompt_in_result=False, max_batch_size=2
        )]

    first, again, other = sample(1234), sample(1234), sample(99)
    assert first == again
    assert other != first
    assert len(set(first)) > 1
    assert first[0:2] != first[2:4] != first[4:6] != first[0:2]


def test_translate_file_streams_in_order(translator, tmp_path):
    pairs = heldout()[:300]
    source = tmp_path / "numbers.txt"
    source.write_text("".join(" ".join(digits(n)) + "\n" for n, _ in pairs))
    stats = translator.translate_file(source, tmp_path / "words.txt", max_batch_size=16, beam_size=1)
    lines = (tmp_path / "words.txt").read_text().splitlines()
    expected = [" ".join(r.hypotheses[0]) for r in translator.translate_batch([digits(n) for n, _ in pairs], beam_size=1)]
    assert lines == expected
    assert stats.num_examples == 300 and stats.num_tokens == sum(len(line.split()) for line in lines)


def test_invalid_utf8_names_the_line(translator, tmp_path):
    source = tmp_path / "bad.txt"
    source.write_bytes(b"1 2\n3 4\n\xff\xfe 5\n")
    with pytest.raises(InvalidInputError, match=r"line 3: not valid UTF-8"):
        translator.translate_file(source, tmp_path / "out.txt")


def test_bad_inputs_get_clear_errors_and_the_engine_stays_usable(translator, generator):
    assert translator.translate_batch([]) == []
    assert generator.generate_batch([]) == []
    unk = translator.translate_batch([["1", "no-such-token", "2", "</s>"], ["1", "<unk>", "2", "</s>"]], beam_size=1)
    assert unk[0].hypotheses == unk[1].hypotheses  # an unknown token is read as <unk>
    # an empty example gets an empty hypothesis, as in CTranslate2, and does not disturb the others
    empty = translator.translate_batch([[], digits("15")], beam_size=1)
    assert empty[0].hypotheses == [[]] and empty[1].hypotheses == [["fifteen"]]
    cases = [
        (lambda: translator.translate_batch([digits("12")], beam_size=0), "beam_size must be an integer >= 1"),
        (lambda: translator.translate_batch([digits("12")], beam_size=2, num_hypotheses=3), "num_hypotheses=3 cannot be greater"),
        (lambda: translator.translate_batch([digits("12")], min_decoding_length=9, max_decoding_length=4), "greater than max_decoding_length"),
        (lambda: translator.translate_batch(["1 2"]), "is a string"),
        (lambda: translator.translate_batch([["1"] * 5000], max_input_length=0), "more than the model's"),
        (lambda: generator.generate_batch([[]]), "is empty"),
        (lambda: generator.generate_batch([["1"]], callback=print, beam_size=2), "callback only works"),
        (lambda: generator.generate_batch([["1"]], sampling_topp=0), "sampling_topp"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            call()
    with pytest.raises(InvalidInputError, match="more than the model's 64 positions"):
        translator.translate_batch([["1"] * 5000], beam_size=1)  # the default truncation (1024) is not enough
    long = translator.translate_batch([["1"] * 5000], beam_size=1, max_decoding_length=3, max_input_length=60)[0]
    assert len(long.hypotheses[0]) <= 3
    assert " ".join(translator.translate_batch([digits("15")], beam_size=1)[0].hypotheses[0]) == "fifteen"


def test_model_directory_missing_a_file_names_it(tmp_path):
    import shutil

    broken = tmp_path / "marian"
    shutil.copytree(MARIAN, broken)
    (broken / "encoder_model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="encoder_model.onnx"):
        shmengine.Translator(broken)
    assert not shmengine.contains_model(broken)
    shutil.copy(MARIAN / "encoder_model.onnx", broken / "encoder_model.onnx")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        shmengine.Translator(broken)
    with pytest.raises(ModelLoadError, match="encoder-decoder model; load it with shmengine.Translator"):
        shmengine.Generator(broken)


def test_readme_main_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "shmengine.cli", "translate"], input="1984\n7\n", capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["one thousand nine hundred eighty four", "seven"]
    assert "tokens/s" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "shmengine.cli", "generate"], input="1984 =\n", capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "one thousand nine hundred eighty four"
