"""The search algorithms against a numpy toy model whose answers can be computed independently."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shmengine.decode.decoding import DecodingOptions, decode

VOCAB, END = 6, 0


class ToyStepper:
    """A bigram model: the next-token logits depend only on the last token."""

    def __init__(self, seed=0, scale=2.0):
        self.table = np.random.default_rng(seed).standard_normal((VOCAB, VOCAB)).astype(np.float32) * scale
        self.last = None
        self.selects = []

    def prefill(self, prompts):
        self.last = np.array([p[-1] for p in prompts])
        return self.table[self.last]

    def step(self, tokens):
        self.last = np.asarray(tokens)
        return self.table[self.last]

    def select(self, rows):
        self.selects.append(len(rows))
        self.last = self.last[rows]

    def log_probs(self, last):
        row = self.table[last].astype(np.float64)
        return row - np.log(np.exp(row - row.max()).sum()) - row.max()


def options(**kw):
    base = dict(max_new_tokens=4, end_ids=(END,))
    base.update(kw)
    return DecodingOptions(**base)


def test_greedy_is_the_argmax_chain_and_scores_are_length_normalised():
    toy = ToyStepper()
    prompts = [[1], [2], [3, 4]]
    results = decode(toy, prompts, options(max_new_tokens=5))
    for prompt, result in zip(prompts, results):
        last, tokens, total = prompt[-1], [], 0.0
        for _ in range(5):
            lp = toy.log_probs(last)
            nxt = int(np.argmax(lp))
            total += lp[nxt]
            if nxt == END:
                break
            tokens.append(nxt)
            last = nxt
        assert result.ids[0] == tokens
        assert result.scores[0] == pytest.approx(total / max(len(tokens), 1), abs=1e-5)


def _exhaustive_best(toy, start, max_new, length_penalty):
    """Every sequence up to max_new tokens that ends with END (or is cut at max_new)."""
    best = None
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(VOCAB), repeat=n):
            if END in seq[:-1] or (n < max_new and seq[-1] != END):
                continue
            last, total = start, 0.0
            for t in seq:
                total += toy.log_probs(last)[t]
                last = t
            hyp = list(seq[:-1]) if seq[-1] == END else list(seq)
            score = total / (max(len(hyp), 1) ** length_penalty)
            if best is None or score > best[0]:
                best = (score, hyp)
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_optimum(length_penalty):
    toy = ToyStepper(seed=3, scale=1.0)
    # a beam wider than every path, patience enough to finish them all: beam search is exact
    results = decode(toy, [[2], [5]], options(max_new_tokens=3, beam_size=VOCAB**3, patience=4.0, length_penalty=length_penalty))
    for start, result in zip([2, 5], results):
        score, hyp = _exhaustive_best(toy, start, 3, length_penalty)
        assert result.ids[0] == hyp
        assert result.scores[0] == pytest.approx(score, abs=1e-4)


def test_beam_returns_sorted_hypotheses_and_finished_examples_leave_the_batch():
    toy = ToyStepper(seed=1)
    results = decode(toy, [[1], [2], [3]], options(max_new_tokens=8, beam_size=3, num_hypotheses=3))
    for r in results:
        assert len(r.ids) == 3 and r.scores == sorted(r.scores, reverse=True)
    assert toy.selects[0] == 9  # expanded to 3 beams after the first step
    # No one ends (END is never likely), but each example has its own length limit: once an
    # example reaches it, its 3 beams leave the batch, and every later step runs on fewer rows.
    toy = ToyStepper(seed=1)
    toy.table[:, END] = -100
    limits = [2, 8, 5]
    results = decode(toy, [[1], [2], [3]], options(max_new_tokens=limits, beam_size=3, num_hypotheses=3))
    assert [[len(h) for h in r.ids] for r in results] == [[n] * 3 for n in limits]
    # after step t, 3 rows for each example still under its limit (no select after the last step)
    assert toy.selects == [3 * sum(n > t for n in limits) for t in range(1, max(limits))]


def test_min_length_and_end_token_handling():
    toy = ToyStepper(seed=0)
    toy.table[:, END] = 10  # the model always wants to end
    assert decode(toy, [[1]], options(max_new_tokens=5))[0].ids[0] == []
    forced = decode(toy, [[1]], options(max_new_tokens=5, min_new_tokens=3))[0].ids[0]
    assert len(forced) == 3 and END not in forced
    with_end = decode(toy, [[1]], options(max_new_tokens=5, return_end_token=True))[0].ids[0]
    assert with_end == [END]


def test_repetition_penalty_and_no_repeat_ngram():
    toy = ToyStepper(seed=0)
    toy.table[:] = -5
    toy.table[:, 3] = 5  # always 3
    toy.table[:, 4] = 4  # then 4
    toy.table[:, END] = -10
    assert decode(toy, [[1]], options(max_new_tokens=4))[0].ids[0] == [3, 3, 3, 3]
    # 3 is in the history: 5 / 2 = 2.5 < 4, so 4 wins from then on (both penalised afterwards)
    assert decode(toy, [[1]], options(max_new_tokens=3, repetition_penalty=2.0))[0].ids[0] == [3, 4, 3]
    ids = decode(toy, [[1]], options(max_new_tokens=6, no_repeat_ngram_size=2))[0].ids[0]
    bigrams = list(zip(ids, ids[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_repetition_penalty_values_on_a_full_vocabulary():
    """The penalty, applied to the seen tokens only, equals CTranslate2's rule written over the
    whole array: a seen token's logit x becomes x * p if x < 0 else x / p; the others stay."""
    from shmengine.decode.decoding import _History

    rng = np.random.default_rng(0)
    vocab, penalty = 50257, 1.3
    histories = [rng.integers(0, vocab, size=n).tolist() for n in (0, 1, 40, 300)]
    history = _History(histories, vocab, options(repetition_penalty=penalty))
    logits = (rng.standard_normal((len(histories), vocab)) * 3).astype(np.float32)
    before = logits.copy()
    got = history.process(logits, step=5)
    seen = np.zeros((len(histories), vocab), dtype=bool)
    for row, tokens in enumerate(histories):
        seen[row, tokens] = True
    expected = np.where(seen, np.where(logits < 0, logits * np.float32(penalty), logits / np.float32(penalty)), logits)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(logits, before)  # the caller's array is left as it was


@pytest.mark.parametrize("rows", [2, 33, 128])
def test_log_normalizer_equals_numpy_log_sum_exp(rows):
    """The row log-sum-exp, small (one pass) and large (a block of rows at a time), is numpy's
    max-shifted formula over the whole array to the bit, and the float64 value to float32's
    precision; -inf logits (banned tokens) count as zero probability."""
    from shmengine.decode.decoding import log_normalizer

    rng = np.random.default_rng(rows)
    logits = (rng.standard_normal((rows, 50257)) * 4).astype(np.float32)
    logits[0, :1000] = -np.inf
    peak = logits.max(axis=-1, keepdims=True)
    expected = peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))
    got = log_normalizer(logits)
    assert got.shape == (rows, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    # the row maxima handed in (the top-k holds them) give the same values to the bit, and the
    # top-k's own normaliser is that one
    np.testing.assert_array_equal(log_normalizer(logits, peak=peak), expected)
    from shmengine.decode.decoding import HostLogits

    # a beam step's top-k (k > 1) comes from ORT's kernels (cpu_top.py), whose sum runs in
    # another order: the same to float32 rounding
    np.testing.assert_allclose(HostLogits(logits).top(4)[2], expected, rtol=5e-6)
    np.testing.assert_array_equal(HostLogits(logits).top(1)[2], expected)
    wide = logits.astype(np.float64)
    exact = np.log(np.exp(wide - wide.max(-1, keepdims=True)).sum(-1, keepdims=True)) + wide.max(-1, keepdims=True)
    np.testing.assert_allclose(got, exact, rtol=1e-6)


@pytest.mark.parametrize("vocab,k", [(50257, 8), (58101, 4), (50257, 50), (1000, 3), (300, 7), (64 * 40, 2)])
def test_top_k_ids_selects_each_rows_largest_values(vocab, k):
    """The blocked top-k (a max per block, then a selection over the best blocks) keeps, in
    every row, exactly the k largest values that a full sort finds: rows whose best values sit
    together in one block, in the partial last block, rows that are mostly -inf (banned
    tokens) and rows with ties at the k-th place included."""
    from shmengine.decode.decoding import top_k_ids

    rng = np.random.default_rng(vocab + k)
    rows = 12
    values = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    values[0, 128 : 128 + k] = 50.0 + np.arange(k)  # all of the top k in one block
    values[1, vocab - k :] = 40.0  # in the last positions (the partial block where there is one)
    values[2, :] = -np.inf
    values[2, 5] = 1.0  # one finite value: the rest of its top k are -inf
    values[3, :] = 0.5  # every value tied
    values[4, ::97] = 9.0  # more ties at the top than k
    ids = top_k_ids(values, k)
    assert ids.shape == (rows, k)
    for row in range(rows):
        assert len(set(ids[row].tolist())) == k, f"row {row}: an id chosen twice"
        np.testing.assert_array_equal(np.sort(values[row, ids[row]]), np.sort(values[row])[-k:], err_msg=f"row {row}")


@pytest.mark.parametrize("vocab,k", [(50257, 8), (58101, 4), (300, 7), (43, 2)])
def test_a_beam_steps_top_k_is_each_rows_largest_values_with_their_normaliser(vocab, k):
    """HostLogits.top for k > 1 (ORT's TopK and log-sum-exp, cpu_top.py, a block of rows per run:
    58,101 tokens make blocks of 9 of the 10 rows): in every row the k largest values that a
    full sort finds, sorted, the lower id first among equals (numpy's stable sort is the
    reference), and the log-sum-exp of float64 numpy; rows mostly -inf, all -inf and rows of
    ties included."""
    from shmengine.decode.decoding import HostLogits

    rng = np.random.default_rng(vocab * k)
    values = (rng.standard_normal((10, vocab)) * 3).astype(np.float32)
    values[0, :] = -np.inf
    values[0, 5] = 1.0
    values[1, :] = 0.5  # every value tied
    values[2, ::7] = 9.0
    top, ids, normalizer = HostLogits(values).top(k)
    expected_ids = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(top, np.take_along_axis(values, expected_ids, axis=-1))
    wide = values.astype(np.float64)
    peak = wide.max(-1, keepdims=True)
    np.testing.assert_allclose(normalizer, peak + np.log(np.exp(wide - peak).sum(-1, keepdims=True)), rtol=5e-6)
    _, same_ids, zeros = HostLogits(values).top(k, normalize=False)
    np.testing.assert_array_equal(same_ids, expected_ids)
    np.testing.assert_array_equal(zeros, np.zeros((10, 1), np.float32))
    values[3, :] = -np.inf  # every token banned: the normaliser is -inf (log of 0), not NaN
    normalizer = HostLogits(values).top(k)[2]
    assert normalizer[3, 0] == -np.inf and np.isfinite(np.delete(normalizer, 3, axis=0)).all()


def test_forced_prefix_greedy_and_beam():
    toy = ToyStepper(seed=2)
    for beam in (1, 3):
        result = decode(toy, [[1], [1]], options(max_new_tokens=6, beam_size=beam, forced=[[4, 5], []]))
        assert result[0].ids[0][:2] == [4, 5]
        free = decode(ToyStepper(seed=2), [[5]], options(max_new_tokens=4, beam_size=beam))[0].ids[0]
        assert result[0].ids[0][2:] == free  # after the prefix the toy continues from token 5


def test_sampling_is_reproducible_and_topk_restricts():
    toy = ToyStepper(seed=4, scale=0.5)
    a = decode(toy, [[1]] * 8, options(max_new_tokens=6, sampling_topk=0, seed=7))
    b = decode(ToyStepper(seed=4, scale=0.5), [[1]] * 8, options(max_new_tokens=6, sampling_topk=0, seed=7))
    assert [r.ids for r in a] == [r.ids for r in b]
    assert len({tuple(r.ids[0]) for r in a}) > 1  # it does sample
    # one sampled token each, END included (return_end_token), must be one of the two most likely
    top2 = decode(ToyStepper(seed=4, scale=0.5), [[1]] * 30, options(max_new_tokens=1, sampling_topk=2, seed=1, return_end_token=True))
    allowed = set(np.argsort(-toy.table[1])[:2].tolist())
    assert {r.ids[0][0] for r in top2} == allowed


def test_callback_sees_every_token_and_can_stop():
    toy = ToyStepper(seed=0)
    toy.table[:, END] = -100
    seen = []

    def on_step(events):
        seen.extend((e.batch_id, e.token_id, e.is_last) for e in events)
        return [e.key for e in events if e.batch_id == 0 and e.step == 1]  # stop example 0 after two tokens

    results = decode(toy, [[1], [2]], options(max_new_tokens=5), on_step)
    assert len(results[0].ids[0]) == 2 and len(results[1].ids[0]) == 5
    assert [t for b, t, _ in seen if b == 1] == results[1].ids[0]
    assert [last for b, _, last in seen if b == 1][-1]


def _exhaustive_ranking(toy, start, max_new, length_penalty):
    """(score, hypothesis) of every sequence up to max_new tokens ending with END or cut at
    max_new, best first: what an exact search over the toy must return."""
    ranked = []
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(VOCAB), repeat=n):
            if END in seq[:-1] or (n < max_new and seq[-1] != END):
                continue
            last, total = start, 0.0
            for t in seq:
                total += toy.log_probs(last)[t]
                last = t
            hyp = list(seq[:-1]) if seq[-1] == END else list(seq)
            length = max(len(hyp), 1)
            ranked.append((total / length**length_penalty if length_penalty else total, hyp))
    return sorted(ranked, key=lambda item: -item[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
def test_exact_stop_rule_returns_the_exhaustive_optimum_where_ctranslate2s_rule_stops_early(length_penalty):
    # A beam as wide as every candidate of every step (6**4 at the last of 4 steps) never prunes,
    # so what it returns depends only on when it stops. This patience makes CTranslate2's rule
    # stop after round(1296 * patience) = 6 finished hypotheses; the exact rule must still find
    # the exhaustive top 2 on every seed.
    missed_by_ctranslate2 = 0
    for seed in range(12):
        opts = dict(max_new_tokens=4, beam_size=VOCAB**4, patience=6 / VOCAB**4, num_hypotheses=2, length_penalty=length_penalty)
        exact = decode(ToyStepper(seed=seed, scale=1.5), [[1], [4]], options(early_stopping="never", **opts))
        default = decode(ToyStepper(seed=seed, scale=1.5), [[1], [4]], options(**opts))
        for start, result, ct2 in zip([1, 4], exact, default):
            ranking = _exhaustive_ranking(ToyStepper(seed=seed, scale=1.5), start, 4, length_penalty)
            true_score = {tuple(hyp): score for score, hyp in ranking}
            # the two best scores (the toy is a bigram model, so ties between paths happen) ...
            assert result.scores == pytest.approx([score for score, _ in ranking[:2]], abs=1e-4), (seed, start)
            # ... carried by hypotheses that really score that
            assert [true_score[tuple(h)] for h in result.ids] == pytest.approx(result.scores, abs=1e-4)
            missed_by_ctranslate2 += ct2.ids != result.ids
    assert missed_by_ctranslate2 > 0  # the case the rule exists for is exercised


def test_exact_stop_rule_stops_before_the_length_limit_when_nothing_can_win():
    toy = ToyStepper(seed=0)
    toy.table[:, END] = 8  # ending is by far the most likely: the finished hypotheses cannot be beaten
    result = decode(toy, [[1]], options(max_new_tokens=50, beam_size=4, early_stopping="never", length_penalty=1.0))
    assert result[0].ids[0] == []
    assert len(toy.selects) <= 3  # it stopped within a few steps, not at step 50
