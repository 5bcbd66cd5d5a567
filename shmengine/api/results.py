"""Results, with CTranslate2's field names so code written against it reads them unchanged."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "GenerationResult",
    "TranslationResult",
    "ScoringResult",
    "GenerationStepResult",
    "ExecutionStats",
    "EncoderForwardOutput",
    "AsyncTranslationResult",
    "AsyncGenerationResult",
    "AsyncScoringResult",
]

# CTranslate2's asynchronous results (``asynchronous=True``) are ``concurrent.futures.Future``s
# here: the same ``result()`` and ``done()``, and ``asyncio.wrap_future`` works on them.
AsyncTranslationResult = AsyncGenerationResult = AsyncScoringResult = Future


@dataclass
class GenerationResult:
    """``Generator.generate_batch``: hypotheses best first (tokens and ids), scores if asked."""

    sequences: list[list[str]]
    sequences_ids: list[list[int]]
    scores: list[float] = field(default_factory=list)
    logits: list = field(default_factory=list)


@dataclass
class TranslationResult:
    """``Translator.translate_batch``: hypotheses best first, scores if asked."""

    hypotheses: list[list[str]]
    scores: list[float] = field(default_factory=list)
    attention: list = field(default_factory=list)
    logits: list = field(default_factory=list)

    def __getitem__(self, key):  # CTranslate2 1.x style: result[0]["tokens"]
        if isinstance(key, int):
            entry = {"tokens": self.hypotheses[key]}
            if self.scores:
                entry["score"] = self.scores[key]
            return entry
        return getattr(self, key)

    def __len__(self) -> int:
        return len(self.hypotheses)


@dataclass
class ScoringResult:
    """``score_batch``: the scored tokens and the log-probability of each."""

    tokens: list[str]
    log_probs: list[float]


@dataclass
class GenerationStepResult:
    """One token of ``generate_tokens`` / the ``callback``."""

    step: int
    batch_id: int
    token_id: int
    hypothesis_id: int
    token: str
    log_prob: float | None
    is_last: bool


@dataclass
class ExecutionStats:
    """``translate_file`` / ``score_file``: what was done and how long it took."""

    num_tokens: int = 0
    num_examples: int = 0
    total_time_in_ms: float = 0.0


@dataclass
class EncoderForwardOutput:
    """``Encoder.forward_batch``: ``last_hidden_state`` [batch, max_length, hidden] and the pooled
    output [batch, hidden] (the model's pooler when it has one, else the masked mean)."""

    last_hidden_state: np.ndarray
    pooler_output: np.ndarray | None = None
