"""CTranslate2's decoding arguments: checked in the caller (before anything is queued) and turned
into :class:`~shmengine.decode.decoding.DecodingOptions` for the workers."""

from __future__ import annotations

import threading

import numpy as np

from shmengine.decode.decoding import DecodingOptions
from shmengine.errors import InvalidInputError
from shmengine.model.vocab import Vocabulary

__all__ = ["set_random_seed", "next_seed", "search_options", "end_ids_for", "warn_ignored"]

_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_ignored(caller: str, **settings) -> None:
    """Warn once per process for each CTranslate2 setting that was given a value other than its
    default but has no effect here (``settings``: name -> (value, default)), so that a result
    that differs from CTranslate2's for that reason is never silent."""
    for name, (value, default) in settings.items():
        if value == default or value is None and default is None:
            continue
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        import warnings

        warnings.warn(
            f"{caller}: {name}={value!r} is accepted for CTranslate2 compatibility but has no effect in shmengine "
            "(this warning is shown once)",
            UserWarning,
            stacklevel=3,
        )

_seed_lock = threading.Lock()
_seed_source: np.random.Generator | None = None


def set_random_seed(seed: int) -> None:
    """Make sampling reproducible: every batch submitted afterwards gets its seed from ``seed``,
    in submission order, whichever worker runs it."""
    global _seed_source
    with _seed_lock:
        _seed_source = np.random.default_rng(seed)


def next_seed() -> int:
    with _seed_lock:
        source = _seed_source or np.random.default_rng()
        return int(source.integers(0, 2**63 - 1))


def end_ids_for(end_token, vocab: Vocabulary, default: list[int]) -> tuple[int, ...]:
    """``end_token`` as CTranslate2 takes it (None, a token, a list of tokens or ids) -> ids."""
    if end_token is None:
        return tuple(default)
    tokens = end_token if isinstance(end_token, (list, tuple)) else [end_token]
    ids = []
    for token in tokens:
        index = vocab.id_of(token)
        if index is None:
            raise InvalidInputError(f"end_token {token!r} is not in the vocabulary")
        ids.append(index)
    return tuple(ids)


def search_options(
    *,
    vocab: Vocabulary,
    end_ids: tuple[int, ...],
    max_new_tokens,
    min_new_tokens,
    beam_size: int,
    patience: float,
    num_hypotheses: int,
    length_penalty: float,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    disable_unk: bool,
    suppress_sequences,
    return_end_token: bool,
    sampling_topk: int,
    sampling_topp: float,
    sampling_temperature: float,
    callback=None,
    early_stopping: bool | str = True,
    return_alternatives: bool = False,
    min_alternative_expansion_prob: float = 0,
    return_attention: bool = False,
    history: list[list[int]] | None = None,
    length_offset: list[int] | None = None,
    forced: list[list[int]] | None = None,
    after_prefix: list[int | None] | None = None,
    end_counts_in_length: bool = False,
    always_suppress: tuple[int, ...] = (),
    return_scores: bool = True,
) -> DecodingOptions:
    """Check the arguments as CTranslate2 does and build the options, complete (raises
    InvalidInputError). The public arguments are CTranslate2's; the others are what the calling
    class knows about its examples (see :class:`~shmengine.decode.decoding.DecodingOptions`),
    and ``always_suppress`` are ids the model must never emit, added to the suppressed ones."""
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise InvalidInputError(f"beam_size must be an integer >= 1 (1 = greedy search), got {beam_size!r}")
    if patience <= 0:
        raise InvalidInputError(f"patience must be > 0, got {patience}")
    if num_hypotheses < 1:
        raise InvalidInputError(f"num_hypotheses must be >= 1, got {num_hypotheses}")
    sampling = sampling_topk != 1 and sampling_temperature != 0
    if num_hypotheses > max(1, round(beam_size * patience)) and not (beam_size == 1 and sampling) and not return_alternatives:
        raise InvalidInputError(
            f"num_hypotheses={num_hypotheses} cannot be greater than beam_size * patience "
            f"({beam_size} x {patience}); raise beam_size, or sample (sampling_topk != 1) for several greedy hypotheses"
        )
    if repetition_penalty <= 0:
        raise InvalidInputError(f"repetition_penalty must be > 0 (1 = none), got {repetition_penalty}")
    if not 0 < sampling_topp <= 1:
        raise InvalidInputError(f"sampling_topp must be in (0, 1], got {sampling_topp}")
    if sampling_temperature < 0:
        raise InvalidInputError(f"sampling_temperature must be >= 0, got {sampling_temperature}")
    if no_repeat_ngram_size < 0:
        raise InvalidInputError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if early_stopping is False:
        raise InvalidInputError(
            "early_stopping=False (transformers' length heuristic) is not implemented; use early_stopping='never' "
            "for the exact rule, or True (the default) for CTranslate2's"
        )
    if early_stopping is not True and early_stopping != "never":
        raise InvalidInputError(f"early_stopping must be True or 'never', got {early_stopping!r}")
    if callback is not None and beam_size != 1:
        raise InvalidInputError("callback only works with greedy search or sampling (beam_size=1)")
    if return_alternatives and not 0 <= min_alternative_expansion_prob <= 1:
        raise InvalidInputError(
            f"min_alternative_expansion_prob must be between 0 and 1, got {min_alternative_expansion_prob}"
        )
    if return_alternatives and callback is not None:
        raise InvalidInputError(
            "callback (and generate_tokens) cannot be combined with return_alternatives: each alternative is "
            "continued separately; call without the callback"
        )
    suppress = []
    for sequence in suppress_sequences or []:
        ids = vocab.to_ids(sequence, where="suppress_sequences")
        if len(ids) != 1:
            raise InvalidInputError(
                f"suppress_sequences entry {sequence!r} has {len(ids)} tokens; only single-token sequences are supported"
            )
        suppress.extend(ids)
    if disable_unk and vocab.unk_id is not None:
        suppress.append(vocab.unk_id)
    suppress.extend(i for i in always_suppress if i not in suppress)
    return DecodingOptions(
        max_new_tokens=max_new_tokens,
        end_ids=end_ids,
        min_new_tokens=min_new_tokens,
        beam_size=beam_size,
        patience=patience,
        num_hypotheses=num_hypotheses,
        length_penalty=length_penalty,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        suppress_ids=tuple(suppress),
        sampling_topk=sampling_topk,
        sampling_topp=sampling_topp,
        sampling_temperature=sampling_temperature,
        return_end_token=return_end_token,
        seed=next_seed() if sampling else None,
        early_stopping=early_stopping,
        return_alternatives=bool(return_alternatives),
        min_alternative_expansion_prob=float(min_alternative_expansion_prob),
        return_attention=bool(return_attention),
        history=history,
        length_offset=length_offset,
        forced=forced,
        stream=callback is not None,
        need_scores=bool(return_scores) or callback is not None or bool(return_alternatives),
        after_prefix=after_prefix,
        end_counts_in_length=end_counts_in_length,
    )
