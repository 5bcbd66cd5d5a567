"""Decoding: greedy, sampling and beam search over any step function, vectorised over the batch.

The search talks to the model through a :class:`Stepper`:

    stepper.prefill(prompts)  -> logits [B, V] after each prompt's last token
    stepper.step(token_ids)   -> logits [N, V] after feeding one token per live row
    stepper.select(rows)      -> keep (and reorder, repeat) rows of the model state

so the same code drives a decoder-only model, a seq2seq decoder, or a numpy toy in the tests.
Logits are a numpy array or any :class:`Logits` object: a device runner keeps them on the GPU
and answers ``top(k)`` there, so when no logits processor is active only ``rows x k`` values
and one log-normaliser per row cross to the host each step, not ``rows x vocabulary``.
A worker runs the whole loop for its batch: one round trip per batch, not per token.

Semantics follow CTranslate2 (``src/decoding.cc``), so a caller switching from it gets the same
tokens and scores:

* scores are log-probabilities after the logits processors; a hypothesis' score is the sum over
  its decoded tokens (the end token included), divided by ``length ** length_penalty`` where
  length counts the hypothesis tokens (the end token only when it is returned);
* beam search takes the 2K best candidates per example; an end token among the first K ends a
  hypothesis and its beam is refilled from the next candidates; an example is done when
  ``round(K * patience)`` hypotheses are finished (or, with ``length_penalty == 0``, as soon as
  its best beam finished and ``num_hypotheses`` are there), even while a live beam would still
  score higher; ``early_stopping="never"`` (transformers' name) instead ends it only once no live
  beam can still beat the ``num_hypotheses`` best finished ones (see :func:`_cannot_improve`);
* finished examples leave the batch at once (``stepper.select``), so the rest runs smaller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

__all__ = ["DecodingOptions", "Hypotheses", "Logits", "HostLogits", "Stepper", "StepEvent", "decode", "log_softmax"]

NEG_INF = np.float32(-np.inf)
DEAD_SCORE = np.float32(-1e10)  # CTranslate2's score for a candidate it removed


class Logits(Protocol):
    """Next-token logits [rows, vocabulary], wherever they live (host memory or a device)."""

    @property
    def vocab_size(self) -> int: ...

    def array(self) -> np.ndarray:
        """The logits as a float32 host array [rows, vocabulary]."""

    def take(self, rows: np.ndarray) -> Logits:
        """The logits of these rows only."""

    def top(self, k: int, normalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each row's ``k`` largest logits [rows, k] (any order; ``k == 1`` is the argmax, the
        lowest index among equals), their token ids [rows, k] and the row's log-normaliser
        [rows, 1] (``log_softmax = logits - normaliser``), all float32 / int64 host arrays.
        With ``normalize=False`` the normaliser is not computed (zeros): for a search whose
        scores nobody reads, it is a pass over the whole [rows, vocabulary] saved."""


class HostLogits:
    """:class:`Logits` over a host array (what a numpy stepper returns)."""

    def __init__(self, values: np.ndarray):
        self.values = values

    @property
    def vocab_size(self) -> int:
        return self.values.shape[-1]

    def array(self) -> np.ndarray:
        return self.values.astype(np.float32, copy=False)

    def take(self, rows: np.ndarray) -> HostLogits:
        return HostLogits(self.values[rows])

    def top(self, k: int, normalize: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = self.array()
        if 1 < k < values.shape[-1]:
            from shmengine.decode.cpu_top import top_k

            return top_k(values, k, normalize)  # a beam step: ORT's kernels are ~4x numpy's here
        ids = top_ids(values, k)
        top = np.take_along_axis(values, ids, axis=-1)
        if not normalize:
            return top, ids, np.zeros((len(values), 1), np.float32)
        # the row maximum is among the top k: the normaliser needs no pass of its own for it
        return top, ids, log_normalizer(values, peak=top.max(axis=-1, keepdims=True))


# top_k_ids: logits per block, whose maxima are taken first.
_TOP_K_BLOCK = 64


def top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of each row's ``k`` largest values [rows, k], in no order: the argmax for k = 1
    (the lowest index among equals), every id when k covers the vocabulary."""
    vocab = values.shape[-1]
    if k == 1:
        return np.argmax(values, axis=-1)[:, None]
    if k < vocab:
        return top_k_ids(values, k)
    return np.broadcast_to(np.arange(vocab), values.shape)


def top_k_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The ids of each row's ``k`` largest values [rows, k] (in no order), for 1 < k < vocab.

    ``np.argpartition`` over the whole row is a selection pass that costs ~10x a reduction (a
    fifth of a beam-4 worker's time at 128 rows x 50,257, profiled). Instead, each row is cut in
    blocks of ``_TOP_K_BLOCK``; every one of the row's top k lies in one of the k blocks with
    the largest maxima (an element outside them is beaten by those k maxima), so a max per
    block (a vectorised reduction), a selection over the block maxima and one over the k
    blocks' elements give the same values as the full selection. Among equal values at the
    k-th place either selection may keep any of them."""
    rows, vocab = values.shape
    blocks = vocab // _TOP_K_BLOCK
    if blocks <= 4 * k:  # not enough blocks to skip: select over the rows themselves
        return np.argpartition(values, vocab - k, axis=-1)[:, vocab - k :]
    whole = blocks * _TOP_K_BLOCK
    maxima = values[:, :whole].reshape(rows, blocks, _TOP_K_BLOCK).max(axis=-1)
    best_blocks = np.argpartition(maxima, blocks - k, axis=-1)[:, blocks - k :]
    columns = (best_blocks[:, :, None] * _TOP_K_BLOCK + np.arange(_TOP_K_BLOCK)).reshape(rows, -1)
    if whole < vocab:  # the last, partial block is always a candidate
        columns = np.concatenate([columns, np.broadcast_to(np.arange(whole, vocab), (rows, vocab - whole))], axis=1)
    candidates = np.take_along_axis(values, columns, axis=-1)
    width = columns.shape[1]
    chosen = np.argpartition(candidates, width - k, axis=-1)[:, width - k :]
    return np.take_along_axis(columns, chosen, axis=-1)


def as_logits(logits) -> Logits:
    return HostLogits(logits) if isinstance(logits, np.ndarray) else logits


class Stepper(Protocol):
    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray | Logits: ...

    def step(self, token_ids: np.ndarray) -> np.ndarray | Logits: ...

    def select(self, rows: np.ndarray) -> None: ...


@dataclass(frozen=True)
class DecodingOptions:
    """What to decode and how; built complete, in one call, by the public classes from
    CTranslate2's arguments (``api/options.search_options``). Frozen: a variant (a sub-batch's
    examples, another seed) is a new object, from :func:`select_examples` or
    ``dataclasses.replace``."""

    max_new_tokens: int | list[int]  # one limit for all, or one per example
    end_ids: tuple[int, ...]
    min_new_tokens: int | list[int] = 0
    beam_size: int = 1
    patience: float = 1.0
    num_hypotheses: int = 1
    length_penalty: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppress_ids: tuple[int, ...] = ()
    sampling_topk: int = 1
    sampling_topp: float = 1.0
    sampling_temperature: float = 1.0
    return_end_token: bool = False
    seed: int | None = None
    # Tokens already in each hypothesis before decoding (the prompt, when it is returned): they
    # count towards the score's length normalisation and towards the penalties' history.
    history: list[list[int]] | None = None
    length_offset: list[int] | None = None
    # Tokens each example must start with (a target prefix): forced, scored 0, returned.
    forced: list[list[int]] | None = None
    # Send every decoded token to the supervisor as it comes (callback, generate_tokens).
    stream: bool = False
    # Per example, the step at which free decoding starts after a prefix that is part of the
    # hypothesis (a target prefix, or a returned prompt), or None: see the beam search.
    after_prefix: list[int | None] | None = None
    # Whether an end token that is not returned still counts in the length that normalises the
    # score (CTranslate2 decodes with it in the hypothesis and strips it afterwards).
    end_counts_in_length: bool = False
    # Beam search stop rule: True = CTranslate2's (stop once round(beam_size * patience)
    # hypotheses finished); "never" = exact (stop once no live beam can beat the finished ones).
    early_stopping: bool | str = True
    # CTranslate2's return_alternatives: the num_hypotheses best tokens at the first free
    # position (after the prompt and any forced prefix), each continued by the search; see
    # :func:`_alternatives`. max/min_new_tokens then count the alternative as the first new token.
    return_alternatives: bool = False
    min_alternative_expansion_prob: float = 0.0
    # Whether anything reads the scores and token log-probs (return_scores, a callback, the
    # alternatives' ranking): if not, greedy skips each step's log-normaliser over the vocabulary.
    need_scores: bool = True
    # Keep, per hypothesis token, the attention vector the stepper reports for the step that
    # chose it (``stepper.alignment``: a seq2seq decoder's alignment output, CTranslate2's
    # return_attention).
    return_attention: bool = False

    @property
    def sampling(self) -> bool:
        return self.sampling_topk != 1 and self.sampling_temperature != 0

    def per_example(self, name: str, count: int) -> list[int]:
        value = getattr(self, name)
        return list(value) if isinstance(value, (list, tuple)) else [value] * count


@dataclass
class Hypotheses:
    """Decoded continuations of one example, best first."""

    ids: list[list[int]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    token_log_probs: list[list[float]] = field(default_factory=list)
    # with return_attention: per hypothesis, one attention vector (np.ndarray [source]) per token
    attention: list[list[np.ndarray]] = field(default_factory=list)


@dataclass
class StepEvent:
    """One token decoded for one example (streaming and ``callback``)."""

    batch_id: int
    step: int
    token_id: int
    log_prob: float
    is_last: bool
    hypothesis_id: int = 0
    key: int = -1  # the example's index in this decode call (what a stop request names)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (the model's own precision)."""
    logits = logits.astype(np.float32, copy=False)
    return logits - log_normalizer(logits)


def log_normalizer(logits: np.ndarray, peak: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log-sum-exp [rows, 1] in float32: ``log_softmax(x) = x - log_normalizer(x)``.

    The search loops use it to score only the tokens they look at, rather than writing a
    [rows, vocabulary] log-softmax every step (at 128 rows x 58k tokens that array alone costs
    more than the Python around it). ``peak``: each row's maximum [rows, 1] where the caller
    has it already (the top-k holds it), saving a pass over the rows; the same values result."""
    logits = logits.astype(np.float32, copy=False)
    if peak is not None:
        peak = np.array(peak, dtype=np.float32, copy=True).reshape(len(logits), 1)
    if logits.ndim == 2 and logits.nbytes > _BLOCKED_ABOVE:
        return _log_normalizer_blocked(logits, peak)
    if peak is None:
        peak = np.max(logits, axis=-1, keepdims=True)
    peak[~np.isfinite(peak)] = 0
    work = np.subtract(logits, peak)
    np.exp(work, out=work)
    return peak + np.log(np.sum(work, axis=-1, keepdims=True))


# Above 4 MiB of logits (32 rows x 50k tokens is 6.4), the log-sum-exp runs a block of rows at a
# time, so that exp's output is still in the cache when the sum reads it: 1.24x at 32 x 50,257,
# 1.5x at 128 rows (tools/bench_numexpr.py, "other numpy"); below, the extra Python costs more.
_BLOCKED_ABOVE = 4 << 20
_BLOCK_BYTES = 1 << 20


def _log_normalizer_blocked(logits: np.ndarray, peaks: np.ndarray | None = None) -> np.ndarray:
    """:func:`log_normalizer` of a [rows, vocabulary] float32 array, a block of rows at a time
    (the same operations per row, so the same values to the bit)."""
    rows, vocab = logits.shape
    step = max(1, _BLOCK_BYTES // (4 * vocab))
    out = np.empty((rows, 1), np.float32)
    buffer = np.empty((min(step, rows), vocab), np.float32)
    for start in range(0, rows, step):
        chunk = logits[start : start + step]
        peak = np.max(chunk, axis=-1, keepdims=True) if peaks is None else peaks[start : start + step]
        peak[~np.isfinite(peak)] = 0
        work = buffer[: len(chunk)]
        np.subtract(chunk, peak, out=work)
        np.exp(work, out=work)
        out[start : start + len(chunk)] = peak + np.log(np.sum(work, axis=-1, keepdims=True))
    return out


def _alignment(stepper, options: DecodingOptions) -> np.ndarray | None:
    """The attention of the stepper's last run at its last position [rows, source], when asked."""
    if not options.return_attention:
        return None
    values = getattr(stepper, "alignment", None)
    if values is None:
        raise ValueError("return_attention: this model's decoder reports no attention")
    return values[:, -1, :]


class _History:
    """Token history per live row, for repetition penalties and n-gram bans."""

    def __init__(self, initial: list[list[int]], vocab_size: int, options: DecodingOptions):
        # the tokens of each row are kept only where an n-gram ban reads them (a Python list
        # per row appended every step is a measurable share of a small model's step)
        self.keeps_rows = options.no_repeat_ngram_size > 0
        self.rows = [list(h) for h in initial] if self.keeps_rows else []
        self.options = options
        self.min_new = np.array(options.per_example("min_new_tokens", len(initial)))
        self.longest_min = int(self.min_new.max(initial=0))
        self.presence = None
        if options.repetition_penalty != 1:
            self.presence = np.zeros((len(initial), vocab_size), dtype=bool)
            for r, tokens in enumerate(initial):
                self.presence[r, [t for t in tokens if 0 <= t < vocab_size]] = True

    def select(self, rows: np.ndarray) -> None:
        if self.keeps_rows:
            self.rows = [list(self.rows[r]) for r in rows]
        self.min_new = self.min_new[rows]
        self.longest_min = int(self.min_new.max(initial=0))
        if self.presence is not None:
            self.presence = self.presence[rows]

    def append(self, tokens: np.ndarray) -> None:
        if self.keeps_rows:
            for r, t in enumerate(tokens.tolist()):
                self.rows[r].append(t)
        if self.presence is not None:
            self.presence[np.arange(len(tokens)), tokens] = True

    def changes_logits(self, step: int) -> bool:
        """Whether ``process`` may change the logits at this step (if not, the search can ask the
        logits for their top-k alone, which a device runner answers without a full copy)."""
        o = self.options
        return (
            self.presence is not None
            or o.no_repeat_ngram_size > 0
            or bool(o.suppress_ids)
            or step < self.longest_min
        )

    def process(self, logits: np.ndarray, step: int) -> np.ndarray:
        """Apply penalties and bans to raw logits [rows, V] (a copy is made only when needed)."""
        o = self.options
        if self.presence is not None:
            # only the seen tokens change (a few hundred of a row's 32k-128k): penalising them
            # alone is 2-6x faster than both branches over the whole array, and numexpr's
            # threads over the whole array win less (tools/bench_numexpr.py)
            logits = logits.copy()
            rows, ids = np.nonzero(self.presence)
            seen = logits[rows, ids]
            logits[rows, ids] = np.where(seen < 0, seen * o.repetition_penalty, seen / o.repetition_penalty)
        banned_rows, banned_ids = [], []
        n = o.no_repeat_ngram_size
        if n > 0:
            for r, tokens in enumerate(self.rows):
                if len(tokens) >= n:
                    tail = tuple(tokens[len(tokens) - n + 1 :])
                    for i in range(len(tokens) - n + 1):
                        if tuple(tokens[i : i + n - 1]) == tail:
                            banned_rows.append(r)
                            banned_ids.append(tokens[i + n - 1])
        too_short = np.nonzero(step < self.min_new)[0]
        if banned_rows or o.suppress_ids or len(too_short):
            logits = np.array(logits, dtype=np.float32, copy=True)
            if banned_rows:
                logits[banned_rows, banned_ids] = NEG_INF
            if o.suppress_ids:
                logits[:, list(o.suppress_ids)] = NEG_INF
            if len(too_short):
                logits[np.ix_(too_short, list(o.end_ids))] = NEG_INF
        return logits


def _sample(log_probs: np.ndarray, options: DecodingOptions, rng: np.random.Generator) -> np.ndarray:
    """One token per row: a draw from the top-k / top-p tempered distribution (greedy search takes
    the argmax itself)."""
    scaled = log_probs / np.float32(options.sampling_temperature)
    vocab = scaled.shape[-1]
    k = vocab if options.sampling_topk <= 0 else min(options.sampling_topk, vocab)
    candidates = top_ids(scaled, k)
    cand_scores = np.take_along_axis(scaled, candidates, axis=-1)
    order = np.argsort(-cand_scores, axis=-1, kind="stable")
    candidates = np.take_along_axis(candidates, order, axis=-1)
    cand_scores = np.take_along_axis(cand_scores, order, axis=-1)
    probs = np.exp(cand_scores - cand_scores[:, :1])
    probs /= probs.sum(axis=-1, keepdims=True)
    if options.sampling_topp < 1:
        # keep the smallest prefix whose mass reaches top-p (the first token always stays)
        keep = np.cumsum(probs, axis=-1) - probs < options.sampling_topp
        probs = np.where(keep, probs, 0)
        probs /= probs.sum(axis=-1, keepdims=True)
    draws = rng.random(len(probs))[:, None]
    index = np.minimum((np.cumsum(probs, axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1)
    return candidates[np.arange(len(candidates)), index]


def _normalise(score: float, length: int, penalty: float) -> float:
    return score / (max(length, 1) ** penalty) if penalty != 0 else score


def decode(
    stepper: Stepper,
    prompts: Sequence[Sequence[int]],
    options: DecodingOptions,
    on_step: Callable[[list[StepEvent]], Iterable[int]] | None = None,
) -> list[Hypotheses]:
    """Decode every prompt; returns one :class:`Hypotheses` per prompt, in order.

    ``on_step`` (greedy and sampling only) gets the tokens of each step, one event per live
    example, as soon as they are chosen, and returns the ``key`` of the examples to stop there
    (CTranslate2's ``callback``, which is synchronous: a stop takes effect at that very token).
    """
    if options.return_alternatives:
        return _alternatives(stepper, prompts, options)
    if options.beam_size > 1:
        return _beam_search(stepper, prompts, options)
    if options.num_hypotheses > 1:
        # several independent samples per example: run the batch repeated, then regroup
        repeated = [p for p in prompts for _ in range(options.num_hypotheses)]
        rows = [i for i in range(len(prompts)) for _ in range(options.num_hypotheses)]
        opts = select_examples(options, rows, num_hypotheses=1)

        def regroup_events(events: list[StepEvent]):
            for event in events:
                event.hypothesis_id = event.batch_id % options.num_hypotheses
                event.batch_id //= options.num_hypotheses
            return on_step(events)

        flat = _greedy(stepper, repeated, opts, regroup_events if on_step else None)
        results = []
        for i in range(len(prompts)):
            group = flat[i * options.num_hypotheses : (i + 1) * options.num_hypotheses]
            order = sorted(range(len(group)), key=lambda j: -group[j].scores[0])
            results.append(
                Hypotheses(
                    [group[j].ids[0] for j in order],
                    [group[j].scores[0] for j in order],
                    [group[j].token_log_probs[0] for j in order],
                    [group[j].attention[0] for j in order] if options.return_attention else [],
                )
            )
        return results
    return _greedy(stepper, prompts, options, on_step)


# The fields that may hold one entry per example (a list) instead of one value for all.
PER_EXAMPLE = ("max_new_tokens", "min_new_tokens", "history", "length_offset", "forced", "after_prefix")


def select_examples(options: DecodingOptions, indices: Sequence[int], **changes) -> DecodingOptions:
    """The options of the examples at ``indices`` (in that order, repeats allowed): every
    per-example list cut to them; ``changes`` replace other fields, as in ``dataclasses.replace``."""
    for name in PER_EXAMPLE:
        value = getattr(options, name)
        if isinstance(value, list):
            changes.setdefault(name, [value[i] for i in indices])
    return replace(options, **changes)


class _Resumed:
    """A stepper whose model state is already past the prompt: ``prefill`` hands back the logits
    it was given (so a search can start from a state built by someone else)."""

    def __init__(self, stepper: Stepper, logits):
        self.stepper, self.logits = stepper, logits

    def prefill(self, prompts):
        return self.logits

    def step(self, token_ids):
        return self.stepper.step(token_ids)

    def select(self, rows):
        self.stepper.select(rows)

    @property
    def alignment(self):
        return getattr(self.stepper, "alignment", None)


def _alternatives(stepper: Stepper, prompts, options: DecodingOptions) -> list[Hypotheses]:
    """CTranslate2's ``return_alternatives`` (``decode_alternatives`` in its ``decoding.cc``).

    Per example: the prompt and any forced prefix are fed as they are (scored 0, returned); at the
    first free position the ``num_hypotheses`` most likely tokens are the alternatives (a
    one-step beam search: end tokens are banned there, the suppressed tokens stay suppressed, the
    history penalties see no tokens yet), in that order and cut at the first one whose
    probability is below ``min_alternative_expansion_prob``; each alternative is then continued
    independently by the search the options ask for (greedy, sampling or a beam of
    ``beam_size``, one hypothesis each), whose penalties see only the continuation's own tokens.
    A hypothesis' score is the alternative's log-probability plus the continuation's score
    (normalised by the continuation's length alone), as CTranslate2 adds them. Hypotheses come
    in the order of their alternatives, not re-sorted. ``max_new_tokens`` 0 returns the prefix
    ``num_hypotheses`` times with score 0; 1 returns the alternatives alone.

    CTranslate2 decodes each example alone here; examples decode side by side (a
    decoder-only stepper left-pads prompts of different lengths; a seq2seq caller groups
    examples by prefix length, see ``TranslatorProgram``).
    """
    batch, wanted = len(prompts), options.num_hypotheses
    forced = options.forced or [[] for _ in prompts]
    limits = options.per_example("max_new_tokens", batch)
    minimums = options.per_example("min_new_tokens", batch)
    results = [Hypotheses() for _ in range(batch)]
    active = [i for i in range(batch) if limits[i] > 0]
    if not active and not options.return_attention:
        for example in range(batch):  # every prefix fills the length
            prefix = list(forced[example])
            results[example] = Hypotheses([list(prefix) for _ in range(wanted)], [0.0] * wanted, [[0.0] * len(prefix) for _ in range(wanted)])
        return results
    fed = [list(p) + list(f) for p, f in zip(prompts, forced)]
    logits = as_logits(stepper.prefill(fed))
    # the prefix tokens' attention: position j of the fed block chose token j + 1 (all fed
    # blocks have one length here: a seq2seq caller groups them, a decoder-only one has none)
    block = stepper.alignment if options.return_attention else None
    prefix_attention = [list(block[e, len(fed[e]) - 1 - len(forced[e]) : len(fed[e]) - 1]) if block is not None else []
                        for e in range(batch)]
    for example in range(batch):
        if limits[example] <= 0:  # the prefix fills the length: it alone, once per hypothesis
            prefix = list(forced[example])
            results[example] = Hypotheses(
                [list(prefix) for _ in range(wanted)], [0.0] * wanted, [[0.0] * len(prefix) for _ in range(wanted)],
                [list(prefix_attention[example]) for _ in range(wanted)] if block is not None else [],
            )
    if not active:
        return results
    expansion_attention = block[np.array(active), -1] if block is not None else None
    if len(active) < batch:
        stepper.select(np.array(active))
        logits = logits.take(np.array(active))

    # the expansion: CTranslate2 runs it as a beam search of num_hypotheses beams over one step,
    # with min_length 1 and no history yet
    expansion = replace(options, min_new_tokens=1, repetition_penalty=1.0, no_repeat_ngram_size=0)
    scores = _History([[] for _ in active], logits.vocab_size, expansion).process(logits.array(), 0)
    log_probs = scores - log_normalizer(scores)
    count = min(wanted, log_probs.shape[-1])
    best = np.argsort(-log_probs, axis=-1, kind="stable")[:, :count]
    rows, tokens, owners = [], [], []
    for row, example in enumerate(active):
        prefix = list(forced[example])
        for token in best[row].tolist():
            lp = float(log_probs[row, token])
            if np.exp(np.float32(lp)) < options.min_alternative_expansion_prob or lp == -np.inf:
                break  # CTranslate2 stops at the first alternative below the threshold
            result = results[example]
            result.ids.append(prefix + [token])
            result.scores.append(lp)
            result.token_log_probs.append([0.0] * len(prefix) + [lp])
            if expansion_attention is not None:
                result.attention.append(prefix_attention[example] + [expansion_attention[row]])
            if limits[example] > 1:  # room for a continuation
                rows.append(row)
                tokens.append(token)
                owners.append((example, len(result.ids) - 1))
    if not rows:
        return results

    stepper.select(np.array(rows))
    continuing = np.array(tokens, dtype=np.int64)
    logits = stepper.step(continuing)
    count = len(rows)
    suffix_options = replace(
        options,
        return_alternatives=False,
        num_hypotheses=1,
        max_new_tokens=[limits[e] - 1 for e, _ in owners],
        min_new_tokens=[max(0, minimums[e] - 1) for e, _ in owners],
        history=[[] for _ in range(count)],
        length_offset=[0] * count,
        forced=None,
        after_prefix=None,
        stream=False,
    )
    suffixes = decode(_Resumed(stepper, logits), [[t] for t in tokens], suffix_options)
    for (example, index), suffix in zip(owners, suffixes):
        result = results[example]
        result.ids[index] = result.ids[index] + suffix.ids[0]
        result.scores[index] += suffix.scores[0]
        result.token_log_probs[index] = result.token_log_probs[index] + suffix.token_log_probs[0]
        if options.return_attention:
            result.attention[index] = result.attention[index] + suffix.attention[0]
    return results


def _greedy(stepper: Stepper, prompts, options: DecodingOptions, on_step) -> list[Hypotheses]:
    batch = len(prompts)
    rng = np.random.default_rng(options.seed)
    end_ids = np.array(options.end_ids, dtype=np.int64)
    offsets = options.length_offset or [0] * batch
    limits = options.per_example("max_new_tokens", batch)
    results = [Hypotheses([[]], [0.0], [[]], [[]] if options.return_attention else []) for _ in range(batch)]
    ended = [False] * batch
    alive = np.array([i for i in range(batch) if limits[i] > 0], dtype=np.int64)
    logits = as_logits(stepper.prefill(prompts))
    attention = _alignment(stepper, options)
    history = _History(options.history or [list(p) for p in prompts], logits.vocab_size, options)
    if len(alive) < batch:
        if not len(alive):
            return _finish_greedy(results, offsets, options, ended)
        stepper.select(alive)
        history.select(alive)
        logits = logits.take(alive)
        if attention is not None:
            attention = attention[alive]
    forced = options.forced
    for step in range(max(limits)):
        if options.sampling:
            log_probs = log_softmax(history.process(logits.array(), step))
            chosen = _sample(log_probs, options, rng)
            chosen_lp = log_probs[np.arange(len(chosen)), chosen]
        elif history.changes_logits(step):
            scores = history.process(logits.array(), step)
            chosen = np.argmax(scores, axis=-1)
            chosen_lp = scores[np.arange(len(chosen)), chosen]
            if options.need_scores:
                chosen_lp = chosen_lp - log_normalizer(scores)[:, 0]
        else:
            values, ids, normalizer = logits.top(1, normalize=options.need_scores)
            chosen = ids[:, 0].astype(np.int64, copy=False)
            chosen_lp = values[:, 0] - normalizer[:, 0]
        if forced is not None:
            for row, example in enumerate(alive.tolist()):
                if step < len(forced[example]):
                    chosen[row], chosen_lp[row] = forced[example][step], 0.0
        finished = chosen == end_ids[0] if len(end_ids) == 1 else np.isin(chosen, end_ids)
        keep, events = [], []
        for row, example in enumerate(alive.tolist()):
            token, lp, is_end = int(chosen[row]), float(chosen_lp[row]), bool(finished[row])
            result = results[example]
            if not is_end or options.return_end_token:
                result.ids[0].append(token)
                if attention is not None:
                    result.attention[0].append(attention[row])
            ended[example] = is_end
            result.token_log_probs[0].append(lp)
            result.scores[0] += lp
            done = is_end or step + 1 == limits[example]
            if on_step is not None:
                events.append(StepEvent(example, step, token, lp, done, key=example))
            if not done:
                keep.append(row)
        if events:
            stopped = set(on_step(events) or ())
            if stopped:
                keep = [row for row in keep if int(alive[row]) not in stopped]
        if len(keep) < len(alive):
            if not keep:
                alive = alive[:0]
                break
            rows = np.array(keep)
            alive = alive[rows]
            stepper.select(rows)
            history.select(rows)
            chosen = chosen[rows]
        history.append(chosen)
        logits = as_logits(stepper.step(chosen))
        attention = _alignment(stepper, options)
    return _finish_greedy(results, offsets, options, ended)


def _prefix_rules_apply(options: DecodingOptions, step: int) -> bool:
    """Whether a forced prefix token or the first free step after a prefix comes at this step:
    both look at tokens outside each row's top-k."""
    forced = options.forced is not None and any(step < len(prefix) for prefix in options.forced)
    after = options.after_prefix is not None and step in options.after_prefix
    return forced or after


def _log_prob_reader(scores: np.ndarray | None, normalizer: np.ndarray, row_tokens: np.ndarray, row_lps: np.ndarray):
    """``log_prob(row, token)`` of one step: from the full rows when the search has them, else
    from the row's own top-k (every candidate token is among them)."""
    if scores is not None:
        return lambda row, token: float(scores[row, token] - normalizer[row, 0])

    def from_top(row: int, token: int) -> float:
        return float(row_lps[row][np.flatnonzero(row_tokens[row] == token)[0]])

    return from_top


def _hidden_end(is_end: bool, options: DecodingOptions) -> int:
    """1 when an end token that is not returned still counts in the normalising length."""
    return int(is_end and options.end_counts_in_length and not options.return_end_token)


def _finish_greedy(results: list[Hypotheses], offsets, options: DecodingOptions, ended) -> list[Hypotheses]:
    for example, result in enumerate(results):
        length = len(result.ids[0]) + offsets[example] + _hidden_end(ended[example], options)
        result.scores[0] = _normalise(result.scores[0], length, options.length_penalty)
    return results


def _cannot_improve(finished, live, options: DecodingOptions, offset: int, limit: int) -> bool:
    """Whether no live beam can still end above the ``num_hypotheses``-th best finished hypothesis.

    A live beam's sum of log-probabilities can only fall as it grows (every log-probability is
    <= 0), so the best it can ever score is that sum divided by the most favourable length: the
    longest possible one (the length limit) when ``length_penalty > 0``, its current length when
    ``length_penalty < 0``, and the sum itself when it is 0. Once every live beam's bound is at
    or below the finished hypotheses that will be returned, decoding on cannot change the result:
    the search stops exactly where it would have stopped at the length limit, minus the work.
    ``live`` holds (sum of log-probabilities, tokens decoded) per live beam.
    """
    wanted = options.num_hypotheses
    if len(finished) < wanted:
        return not live  # every beam is dead: nothing more can finish
    penalty = options.length_penalty
    scores = sorted(
        (_normalise(score, len(hyp) + offset + hidden, penalty) for score, hyp, _, hidden in finished), reverse=True
    )
    threshold = scores[wanted - 1]
    for total, decoded in live:
        if penalty > 0:
            bound = _normalise(total, limit + offset, penalty)
        elif penalty < 0:
            bound = _normalise(total, decoded + offset, penalty)
        else:
            bound = total
        if bound > threshold:
            return False
    return True


def _beam_search(stepper: Stepper, prompts, options: DecodingOptions) -> list[Hypotheses]:
    batch, beam = len(prompts), options.beam_size
    candidates_per_example = 2 * beam
    max_finished = max(1, round(beam * options.patience))
    early_exit = options.length_penalty == 0
    exact = options.early_stopping == "never"
    end_set = set(options.end_ids)
    offsets = options.length_offset or [0] * batch
    limits = options.per_example("max_new_tokens", batch)
    finished: list[list[tuple[float, list[int], list[float], int]]] = [[] for _ in range(batch)]
    finished_attention: list[list[list[np.ndarray]]] = [[] for _ in range(batch)]  # beside finished

    logits = as_logits(stepper.prefill(prompts))  # [batch, V]: only the first beam exists before step 0
    attention = _alignment(stepper, options)
    vocab = logits.vocab_size
    history = _History(options.history or [list(p) for p in prompts], vocab, options)
    alive = np.array([i for i in range(batch) if limits[i] > 0], dtype=np.int64)  # in state order
    for example in set(range(batch)) - set(alive.tolist()):
        finished[example].append((0.0, [], [], 0))  # no budget left: the prompt alone
        finished_attention[example].append([])
    if len(alive) < batch and len(alive):
        stepper.select(alive)
        history.select(alive)
        logits = logits.take(alive)
        if attention is not None:
            attention = attention[alive]
    beam_scores = np.zeros((len(alive), 1), dtype=np.float32)
    sequences = [[[]] for _ in alive]  # per live example, per beam: tokens so far
    seq_lps = [[[]] for _ in alive]
    seq_attention = [[[]] for _ in alive]  # with return_attention: per beam, a vector per token
    top_finished = np.zeros(batch, dtype=bool)

    for step in range(max(limits, default=0) if len(alive) else 0):
        width = beam_scores.shape[1]  # 1 on the first step, then beam
        k = min(candidates_per_example, width * vocab)
        # An example's best k continuations are among the k best tokens of each of its beams, so
        # each row is cut to its own k first (one pass over the vocabulary) and only those
        # width * k candidates get log-probabilities and beam scores.
        row_k = min(k, vocab)
        if history.changes_logits(step) or _prefix_rules_apply(options, step):
            # processed logits, or tokens forced from outside the top-k: the full rows are needed
            scores = history.process(logits.array(), step)  # [examples * width, V]
            top = HostLogits(scores).top(row_k)
        else:
            scores = None
            top = logits.top(row_k)
        row_values, row_tokens, normalizer = top
        row_lps = row_values - normalizer
        log_prob = _log_prob_reader(scores, normalizer, row_tokens, row_lps)
        totals = (row_lps.reshape(len(alive), width, row_k) + beam_scores[:, :, None]).reshape(len(alive), width * row_k)
        flat = (row_tokens.reshape(len(alive), width, row_k) + (np.arange(width) * vocab)[None, :, None]).reshape(
            len(alive), width * row_k
        )
        # best first; equal scores in the order (beam, token), whatever order argpartition left
        order = np.lexsort((flat, -totals), axis=-1)[:, :k]
        top_scores = np.take_along_axis(totals, order, axis=-1)
        origin, token = np.divmod(np.take_along_axis(flat, order, axis=-1), vocab)
        if options.forced is not None:
            for i, example in enumerate(alive.tolist()):
                prefix = options.forced[example]
                if step < len(prefix):
                    # CTranslate2: the prefix token goes to the first beam with score 0; the
                    # other beams are dead until the prefix ends
                    origin[i], token[i] = 0, prefix[step]
                    top_scores[i] = NEG_INF
                    top_scores[i, 0] = 0.0
        if options.after_prefix is not None:
            for i, example in enumerate(alive.tolist()):
                if options.after_prefix[example] == step:
                    # CTranslate2 (issue #277): at the first free step after a prefix, an end
                    # token among the secondary candidates would give short hypotheses that
                    # dominate; it becomes a dead candidate in place (token 0, score -1e10)
                    for c in range(1, k):
                        if int(token[i, c]) in end_set:
                            token[i, c], top_scores[i, c] = 0, DEAD_SCORE

        next_rows, next_tokens, next_scores, keep_examples = [], [], [], []
        new_sequences, new_lps, new_attention = [], [], []
        for i, example in enumerate(alive.tolist()):
            last_step = step + 1 >= limits[example]
            chosen: list[int | None] = []  # candidate index of each beam that continues (None: dead)
            secondary = min(beam, k)
            for slot in range(min(beam, k)):
                c = slot
                t = int(token[i, c])
                if t in end_set or last_step:
                    if slot == 0:
                        top_finished[example] = True
                    src = int(origin[i, c])
                    kept = t not in end_set or options.return_end_token
                    hyp = sequences[i][src] + ([t] if kept else [])
                    lps = seq_lps[i][src] + [log_prob(i * width + src, t)]
                    finished[example].append((float(top_scores[i, c]), hyp, lps, _hidden_end(t in end_set, options)))
                    if attention is not None:
                        finished_attention[example].append(seq_attention[i][src] + ([attention[i * width + src]] if kept else []))
                    # refill this beam from the next candidate that is not an end token
                    c = None
                    while secondary < k:
                        if int(token[i, secondary]) not in end_set:
                            c = secondary
                            secondary += 1
                            break
                        secondary += 1
                    if c is None:
                        c = slot  # nothing left to refill with: keep a dead beam (score -inf)
                chosen.append(c)
            # fewer candidates than beams (a beam wider than the first step's vocabulary): the
            # missing beams are dead until real candidates outnumber them
            chosen.extend([None] * (beam - len(chosen)))
            if last_step:
                done = True
            elif exact:
                live = [
                    (float(top_scores[i, c]), len(sequences[i][int(origin[i, c])]) + 1)
                    for c in chosen
                    if c is not None and int(token[i, c]) not in end_set
                ]
                done = _cannot_improve(finished[example], live, options, offsets[example], limits[example])
            elif early_exit:
                done = top_finished[example] and len(finished[example]) >= options.num_hypotheses
            else:
                done = len(finished[example]) >= max_finished
            if done:
                continue
            keep_examples.append(i)
            beams_seq, beams_lp, beams_attention = [], [], []
            for c in chosen:
                src, t = int(origin[i, c or 0]), int(token[i, c or 0])
                dead = c is None or t in end_set
                next_rows.append(i * width + src)
                next_tokens.append(t)
                next_scores.append(NEG_INF if dead else top_scores[i, c])
                beams_seq.append(sequences[i][src] + [t])
                beams_lp.append(seq_lps[i][src] + [log_prob(i * width + src, t)])
                if attention is not None:
                    beams_attention.append(seq_attention[i][src] + [attention[i * width + src]])
            new_sequences.append(beams_seq)
            new_lps.append(beams_lp)
            new_attention.append(beams_attention)
        if not keep_examples:
            break
        rows = np.array(next_rows)
        alive = alive[np.array(keep_examples)]
        sequences, seq_lps, seq_attention = new_sequences, new_lps, new_attention
        beam_scores = np.array(next_scores, dtype=np.float32).reshape(len(alive), beam)
        stepper.select(rows)
        history.select(rows)
        tokens = np.array(next_tokens, dtype=np.int64)
        history.append(tokens)
        logits = as_logits(stepper.step(tokens))
        attention = _alignment(stepper, options)

    results = []
    for example in range(batch):
        ranked = sorted(
            (
                (_normalise(score, len(hyp) + offsets[example] + hidden, options.length_penalty), hyp, lps, k)
                for k, (score, hyp, lps, hidden) in enumerate(finished[example])
            ),
            key=lambda item: -item[0],
        )[: options.num_hypotheses]
        kept_attention = [finished_attention[example][k] for *_, k in ranked] if options.return_attention else []
        results.append(Hypotheses([h for _, h, _, _ in ranked], [s for s, *_ in ranked], [lp for _, _, lp, _ in ranked], kept_attention))
    return results
