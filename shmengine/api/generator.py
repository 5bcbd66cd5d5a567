"""``shmengine.Generator``: CTranslate2's Generator over an Optimum decoder-only ONNX export."""

from __future__ import annotations

import os
import queue
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future

import numpy as np

from shmengine.api.batching import BatchFuture, plan_batches, split_future
from shmengine.api.engine import PooledModel
from shmengine.api.model_options import ModelOptions
from shmengine.api.options import end_ids_for, search_options, warn_ignored
from shmengine.api.results import GenerationResult, GenerationStepResult, ScoringResult
from shmengine.decode.decoding import StepEvent, log_softmax, select_examples
from shmengine.errors import InvalidInputError, TokenTypeError
from shmengine.model.modeldir import ModelDirectory
from shmengine.runtime.worker import ProgramSpec

__all__ = ["Generator", "DecodingModel"]


class DecodingModel(PooledModel):
    """What Generator and Translator share: splitting a call into sub-batches for the workers."""

    def __new__(cls, *args, **kwargs):
        # the constructor's arguments, kept so that load_model() can build the engine again
        self = super().__new__(cls)
        self._constructor_call = (args, kwargs)
        return self

    def unload_model(self, to_cpu: bool = False) -> None:
        """Stop the workers and free the shared weights, keeping this object (CTranslate2's
        ``unload_model``); :meth:`load_model` brings them back. Calls in between raise
        :class:`~shmengine.EngineClosedError` (a ``RuntimeError``, as CTranslate2 raises).
        ``to_cpu`` is accepted: the weights are read again from the model directory."""
        self.close()

    def load_model(self, keep_cache: bool = False) -> None:
        """Start the workers again after :meth:`unload_model` (a no-op while loaded); the model
        directory is read again, as at construction. ``keep_cache`` is accepted."""
        if not self.model_is_loaded:
            args, kwargs = self._constructor_call
            type(self).__init__(self, *args, **kwargs)

    @property
    def model_is_loaded(self) -> bool:
        """Whether the workers are running (False after :meth:`unload_model` or ``close``)."""
        return not self.closed

    @property
    def num_queued_batches(self) -> int:
        """Batches waiting for a worker (CTranslate2's name; a call split by ``max_batch_size``
        counts each sub-batch)."""
        return len(self._pool._pending)

    @property
    def num_active_batches(self) -> int:
        """Batches waiting or running (CTranslate2's name)."""
        running = sum(1 for w in list(self._pool._workers.values()) if w.batch is not None)
        return self.num_queued_batches + running

    @property
    def tensor_parallel(self) -> bool:
        """Whether the model is split over MPI ranks (CTranslate2's property)."""
        return getattr(self, "_tensor_parallel", False)

    def _submit_split(self, method, lengths, payload_for, convert, max_batch_size, batch_type, on_event_for=None):
        """Cut the examples into length-sorted batches, submit each, and hand back one future per
        example in input order. ``payload_for(indices)`` makes a batch's payload and
        ``convert(batch_result[j], example)`` the result of the example at ``indices[j]``."""
        futures: list[Future | None] = [None] * len(lengths)
        for indices in plan_batches(lengths, max_batch_size, batch_type):
            on_event = on_event_for(indices) if on_event_for else None
            batch_future = BatchFuture()
            per_example = split_future(batch_future, len(indices), lambda result, j, idx=indices: convert(result[j], idx[j]))
            self._pool.submit(method, payload_for(indices), on_event=on_event, future=batch_future)
            for i, f in zip(indices, per_example):
                futures[i] = f
        return futures

    def _submit_decoding(
        self, method, inputs, options, max_batch_size, batch_type, convert, callback, positions=None
    ):
        """Decode ``inputs`` in sub-batches; ``positions`` maps each input to its index in the
        caller's batch (for the callback's ``batch_id``) when some examples were answered
        without decoding."""

        def on_event_for(indices):
            batch_ids = [positions[i] for i in indices] if positions else indices
            return _callback_router(callback, batch_ids, self.vocabulary)

        return self._submit_split(
            method,
            [len(x) for x in inputs],
            lambda indices: ([inputs[i] for i in indices], _slice_options(options, indices)),
            convert,
            max_batch_size,
            batch_type,
            on_event_for if callback else None,
        )


class Generator(DecodingModel):
    """Text generation with a decoder-only model (GPT-2, Llama, ... exported by Optimum).

    Args:
        model_path: an Optimum ONNX export directory: ``model.onnx`` (with its KV-cache inputs),
            ``config.json``, ``generation_config.json`` and ``tokenizer.json`` or ``vocab.json``.
        device, device_index, inter_threads, intra_threads, max_queued_batches: as
            :class:`shmengine.Engine` (CTranslate2's meanings).
        compute_type: CTranslate2's values and meanings (see :class:`shmengine.Engine`);
            ``"int8"`` on CPU quantizes the weights once (cached beside the model);
            ``self.compute_type`` is the type that runs after any fallback.
        tensor_parallel: split the model over the ranks of ``mpirun`` (CTranslate2's meaning:
            every rank runs the same script and makes the same calls; each holds a shard of
            the weights). GPT-2 and Llama exports; ``inter_threads`` replicas of the shard per
            rank, ``intra_threads=0`` this rank's share of its host's cores; see ``shmengine.tp.local``.
        prepack_weights, graph_optimization_level: see :class:`shmengine.Engine`.

    Every batch (or sub-batch, with ``max_batch_size``) runs its whole decoding loop inside one
    worker; sub-batches run in parallel on the workers.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str = "cpu",
        *,
        device_index: int | Sequence[int] = 0,
        compute_type: str = "default",
        inter_threads: int = 1,
        intra_threads: int = 0,
        max_queued_batches: int = 0,
        flash_attention: bool = False,
        tensor_parallel: bool = False,
        files=None,
        prepack_weights: bool | None = None,
        graph_optimization_level: str = "all",
    ):
        options = ModelOptions(
            device=device,
            device_index=device_index,
            compute_type=compute_type,
            inter_threads=inter_threads,
            intra_threads=intra_threads,
            max_queued_batches=max_queued_batches,
            flash_attention=flash_attention,
            tensor_parallel=tensor_parallel,
            files=files,
            prepack_weights=prepack_weights,
            graph_optimization_level=graph_optimization_level,
            tensor_parallel_built=True,
        )
        self.model = ModelDirectory.open(model_path, "decoder")
        self.vocabulary = self.model.vocab
        if options.tensor_parallel:
            from shmengine.tp.local import attach_generator

            attach_generator(self, inter_threads=options.inter_threads, intra_threads=options.intra_threads,
                   device=options.device, device_index=options.device_index, compute_type=options.compute_type)
            return
        program = ProgramSpec("shmengine.decode.programs", "GeneratorProgram", {"pad_id": self.model.pad_id})
        self._start(self.model.graphs, program, options, roles={"model": "decoder"})
        if "logits" not in {o.name for o in self._store.catalog["model"].outputs}:
            self.close()
            raise InvalidInputError(f"{self.model.graphs['model']} has no 'logits' output: it is not a generation model")

    # -- generation -----------------------------------------------------------------------------

    def generate_batch(
        self,
        start_tokens: Sequence[Sequence[str | int]],
        *,
        max_batch_size: int = 0,
        batch_type: str = "examples",
        asynchronous: bool = False,
        beam_size: int = 1,
        patience: float = 1,
        num_hypotheses: int = 1,
        length_penalty: float = 1,
        repetition_penalty: float = 1,
        no_repeat_ngram_size: int = 0,
        disable_unk: bool = False,
        suppress_sequences=None,
        end_token=None,
        return_end_token: bool = False,
        max_length: int = 512,
        min_length: int = 0,
        static_prompt=None,
        cache_static_prompt: bool = True,
        include_prompt_in_result: bool = True,
        return_scores: bool = False,
        return_logits_vocab: bool = False,
        return_alternatives: bool = False,
        min_alternative_expansion_prob: float = 0,
        sampling_topk: int = 1,
        sampling_topp: float = 1,
        sampling_temperature: float = 1,
        callback=None,
        early_stopping: bool | str = True,
    ):
        """Generate from a batch of start tokens (CTranslate2's ``generate_batch``).

        Tokens are strings of the model's vocabulary (ids are accepted too). ``max_length`` counts
        the prompt (less its start token) when ``include_prompt_in_result``, as CTranslate2 does,
        and the result then holds the prompt without its start token. With
        ``include_prompt_in_result=False`` the result holds only new tokens; CTranslate2 instead
        returns the tails of prompts longer than the batch's shortest one as if generated (its
        results then depend on how the batch was cut); for prompts of equal length the two agree. ``static_prompt`` is
        prepended to every prompt and left out of the results; ``cache_static_prompt``,
        ``return_logits_vocab`` is accepted and ignored (a warning, once).
        ``return_alternatives`` (CTranslate2's meaning): the ``num_hypotheses`` most likely
        tokens after the prompt, each continued by the search, in that order (alternatives below
        ``min_alternative_expansion_prob`` are left out); ``max_length`` then counts from the
        sequence's start whether or not the prompt is returned, as in CTranslate2. ``callback(GenerationStepResult)`` sees each token as it is
        decoded (greedy and sampling); returning True stops that example. Returns one
        :class:`GenerationResult` per example, or with ``asynchronous=True`` one
        ``concurrent.futures.Future`` per example.
        ``early_stopping`` picks when beam search ends an example (transformers' keyword and
        values): ``True``, the default, is CTranslate2's rule: stop once ``round(beam_size *
        patience)`` hypotheses have finished, even while a live beam would still score higher
        (the answer can then be worse than greedy search's); ``"never"`` stops only once no live
        beam can beat the hypotheses to return, so they are the best the beam search holds
        (exact; the beams run longer).
        """
        if isinstance(start_tokens, (str, bytes)) or not isinstance(start_tokens, Sequence):
            raise TokenTypeError("start_tokens must be a list of token lists, e.g. [['<s>', 'Hello']]")
        warn_ignored("generate_batch", return_logits_vocab=(return_logits_vocab, False))
        if not start_tokens:
            return []
        if max_length < 1:
            raise InvalidInputError(f"max_length must be >= 1, got {max_length}")
        if min_length > max_length:
            raise InvalidInputError(f"min_length ({min_length}) is greater than max_length ({max_length})")
        static = self.vocabulary.to_ids(static_prompt, where="static_prompt") if static_prompt else []
        prompts = []
        for i, tokens in enumerate(start_tokens):
            if isinstance(tokens, (str, bytes)):
                raise TokenTypeError(f"start_tokens[{i}] is a string; pass a list of tokens (split it with the tokenizer)")
            ids = static + self.vocabulary.to_ids(tokens, where=f"start_tokens[{i}]")
            if not ids:
                raise InvalidInputError(
                    f"start_tokens[{i}] is empty; generation needs at least one start token (the bos token, for instance)"
                )
            limit = self.model.max_positions
            if limit and len(ids) > limit:
                raise InvalidInputError(
                    f"start_tokens[{i}] has {len(ids)} tokens, more than the model's {limit} positions; shorten it"
                )
            prompts.append(ids)

        offset = [len(p) - 1 - len(static) if include_prompt_in_result else 0 for p in prompts]
        max_new = [max(0, max_length - o) for o in offset]
        if self.model.max_positions:
            max_new = [min(m, self.model.max_positions - len(p)) for m, p in zip(max_new, prompts)]
        new_tokens, least_new = max_new, [max(0, min_length - o) for o in offset]
        if return_alternatives:
            prompts, new_tokens, least_new = _alternative_limits(
                prompts, len(static), include_prompt_in_result, max_length, min_length, self.model.max_positions
            )
        options = search_options(
            vocab=self.vocabulary,
            end_ids=end_ids_for(end_token, self.vocabulary, self.model.eos_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=least_new,
            beam_size=beam_size,
            patience=patience,
            num_hypotheses=num_hypotheses,
            length_penalty=length_penalty,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            disable_unk=disable_unk,
            suppress_sequences=suppress_sequences,
            return_end_token=return_end_token,
            sampling_topk=sampling_topk,
            sampling_topp=sampling_topp,
            sampling_temperature=sampling_temperature,
            callback=callback,
            early_stopping=early_stopping,
            return_alternatives=return_alternatives,
            min_alternative_expansion_prob=min_alternative_expansion_prob,
            length_offset=offset,
            end_counts_in_length=True,
            # a returned prompt is a prefix of the hypothesis: CTranslate2 decodes it constrained
            after_prefix=[0 if include_prompt_in_result and len(p) - len(static) > 1 else None for p in prompts],
            history=[p[1 + len(static) :] if include_prompt_in_result else [] for p in prompts],
            return_scores=return_scores,
        )

        def convert(hyps, example):
            # CTranslate2 returns the prompt without its start token (the bos token, when the
            # prompt begins with it)
            prompt = prompts[example][len(static) :]
            starts_with_bos = bool(prompt) and prompt[0] == self.model.bos_id
            # CTranslate2 decodes a returned prompt as a forced prefix inside max_length: a prompt
            # longer than max_length comes back cut to its first max_length tokens after the start
            prompt = prompt[: 1 + max_length]
            prefix = (prompt[1:] if starts_with_bos else prompt) if include_prompt_in_result else []
            ids = [prefix + h for h in hyps.ids]
            scores = list(hyps.scores)
            if max_new[example] == 0 and beam_size > 1 and len(ids) < min(num_hypotheses, beam_size) and not return_alternatives:
                # a prompt that fills max_length under beam search: CTranslate2 returns it once per
                # beam, the first beam scored 0 and the others with the dead score of a beam
                # that was never alive while the prompt was forced
                count = min(num_hypotheses, beam_size)
                dead = -1e10 / (max(max_length, 1) ** length_penalty) if length_penalty else -1e10
                ids, scores = ids * count, scores + [dead] * (count - 1)
            return GenerationResult(
                sequences=[self.vocabulary.to_tokens(s) for s in ids],
                sequences_ids=ids,
                scores=scores if return_scores else [],
            )

        futures = self._submit_decoding("generate", prompts, options, max_batch_size, batch_type, convert, callback)
        return futures if asynchronous else [f.result() for f in futures]

    def generate_tokens(self, prompt: Sequence[str | int], **options) -> Iterator[GenerationStepResult]:
        """Yield tokens one by one as they are decoded (greedy or sampling), CTranslate2-style.

        ``max_length`` counts the new tokens only (the prompt is not part of the stream), as in
        CTranslate2. Closing the iterator early (``break``) stops the decoding in the worker.
        """
        options.setdefault("include_prompt_in_result", False)
        return _stream(self, lambda cb: self.generate_batch([prompt], callback=cb, asynchronous=True, **options))

    def forward_batch(self, tokens: Sequence[Sequence[str | int]], return_log_probs: bool = False) -> np.ndarray:
        """The model's output at every position of each sequence (CTranslate2's
        ``forward_batch``): logits, or log-probabilities with ``return_log_probs``, as a float32
        array [batch, longest sequence, vocabulary]; positions past a shorter sequence's end are 0."""
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise TokenTypeError("tokens must be a list of token lists, e.g. [['<s>', 'Hello']]")
        sequences = []
        for i, seq in enumerate(tokens):
            if isinstance(seq, (str, bytes)):
                raise TokenTypeError(f"tokens[{i}] is a string; pass a list of tokens")
            ids = self.vocabulary.to_ids(seq, where=f"tokens[{i}]")
            if not ids:
                raise InvalidInputError(f"tokens[{i}] is empty")
            if self.model.max_positions and len(ids) > self.model.max_positions:
                raise InvalidInputError(f"tokens[{i}] has {len(ids)} tokens, more than the model's {self.model.max_positions} positions")
            sequences.append(ids)
        if not sequences:
            return np.zeros((0, 0, len(self.vocabulary.id_to_token)), np.float32)
        rows = self._pool.submit("forward", sequences).result()
        out = np.zeros((len(rows), max(len(r) for r in rows), rows[0].shape[-1]), np.float32)
        for i, row in enumerate(rows):
            out[i, : len(row)] = log_softmax(row) if return_log_probs else row
        return out

    @property
    def num_generators(self) -> int:
        """Batches that run side by side: the worker processes (CTranslate2's name)."""
        return self.num_workers

    async def async_generate_tokens(self, prompt: Sequence[str | int], **options):
        """:meth:`generate_tokens` as an asynchronous iterator (CTranslate2's name), for asyncio:
        each token is awaited without blocking the event loop; leaving the loop early stops the
        decoding in the worker."""
        import asyncio

        loop = asyncio.get_running_loop()
        steps = self.generate_tokens(prompt, **options)
        end = object()
        try:
            while True:
                step = await loop.run_in_executor(None, next, steps, end)
                if step is end:
                    return
                yield step
        finally:
            steps.close()

    def score_iterable(
        self, tokens: Iterable[Sequence[str | int]], max_batch_size: int = 64, batch_type: str = "examples", **options
    ) -> Iterator[ScoringResult]:
        """Score an iterable of token sequences, in chunks, results in order (CTranslate2's name)."""
        yield from _iterate_in_chunks(
            tokens, max_batch_size, lambda chunk: self.score_batch(
                list(chunk), max_batch_size=max_batch_size, batch_type=batch_type, asynchronous=True, **options
            )
        )

    def generate_iterable(
        self, start_tokens: Iterable[Sequence[str]], max_batch_size: int = 32, batch_type: str = "examples", **options
    ) -> Iterator[GenerationResult]:
        """Generate from an iterable of prompts, reading and running it in chunks, in order."""
        yield from _iterate_in_chunks(
            start_tokens, max_batch_size, lambda chunk: self.generate_batch(
                chunk, max_batch_size=max_batch_size, batch_type=batch_type, asynchronous=True, **options
            )
        )

    # -- scoring --------------------------------------------------------------------------------

    def score_batch(
        self,
        tokens: Sequence[Sequence[str | int]],
        *,
        max_batch_size: int = 0,
        batch_type: str = "examples",
        max_input_length: int = 1024,
        offset: int = 0,
        asynchronous: bool = False,
    ):
        """Log-probability of each token given the ones before it (CTranslate2's ``score_batch``).

        Each :class:`ScoringResult` covers the tokens after the first (the first is only
        conditioned on); sequences longer than ``max_input_length`` are truncated first
        (0 = no limit), and ``offset`` skips that many more scored tokens at the start.
        """
        if not tokens:
            return []
        sequences = []
        for i, seq in enumerate(tokens):
            ids = self.vocabulary.to_ids(seq, where=f"tokens[{i}]")
            if max_input_length and len(ids) > max_input_length:
                ids = ids[:max_input_length]
            if self.model.max_positions and len(ids) > self.model.max_positions:
                raise InvalidInputError(
                    f"tokens[{i}] has {len(ids)} tokens, more than the model's {self.model.max_positions} positions; "
                    "set max_input_length to truncate"
                )
            sequences.append(ids)
        # A sequence of fewer than 2 tokens has nothing to score (the first token is only
        # conditioned on): an empty result, as CTranslate2 gives, without a worker.
        scored = [i for i, ids in enumerate(sequences) if len(ids) >= 2]

        def convert(log_probs, position):
            ids = sequences[scored[position]][1 + offset :]
            return ScoringResult(tokens=self.vocabulary.to_tokens(ids), log_probs=list(log_probs[offset:]))

        submitted = self._submit_split(
            "score", [len(sequences[i]) for i in scored], lambda indices: [sequences[scored[j]] for j in indices],
            convert, max_batch_size, batch_type,
        ) if scored else []
        futures: list[Future] = []
        answers = iter(submitted)
        for ids in sequences:
            if len(ids) >= 2:
                futures.append(next(answers))
            else:
                empty = Future()
                empty.set_result(ScoringResult(tokens=[], log_probs=[]))
                futures.append(empty)
        return futures if asynchronous else [f.result() for f in futures]


def _alternative_limits(prompts, static: int, include_prompt: bool, max_length: int, min_length: int, positions):
    """``return_alternatives`` as CTranslate2 counts it (``decode_alternatives``): a returned
    prompt is a prefix cut to ``max_length`` tokens after its start token; the alternative
    follows everything fed before it (static prompt included), and ``max_length`` /
    ``min_length`` count from the sequence's start. Returns the prompts to feed and, per
    prompt, the new tokens allowed (0: the prompt fills ``max_length``) and required, the
    alternative being the first."""
    fed, limits, minimums = [], [], []
    for ids in prompts:
        if include_prompt:
            ids = ids[: static + max_length + 1]
        prefix = len(ids) - static - 1 if include_prompt else 0
        limit = 0 if prefix == max_length else 1 + max(0, max_length - len(ids))
        if positions and limit:
            limit = max(1, min(limit, positions - len(ids)))
        fed.append(ids)
        limits.append(limit)
        minimums.append(1 + max(0, min_length - len(ids)))
    return fed, limits, minimums


def _slice_options(options, indices):
    """The options of one sub-batch: its examples' entries, and a seed of its own when sampling
    (drawn in submission order: one seed for all sub-batches would give identical prompts in
    different sub-batches identical samples)."""
    from shmengine.api.options import next_seed

    return select_examples(options, indices, seed=next_seed() if options.seed is not None else None)


def _callback_router(callback, indices, vocabulary):
    """Turn worker events of one sub-batch into the user's GenerationStepResult callbacks."""

    def on_event(events: list[StepEvent]) -> list[int]:
        stops = []
        for event in events:
            result = GenerationStepResult(
                step=event.step,
                batch_id=indices[event.batch_id],
                token_id=event.token_id,
                hypothesis_id=event.hypothesis_id,
                token=vocabulary.id_to_token[event.token_id],
                log_prob=event.log_prob,
                is_last=event.is_last,
            )
            if callback(result):
                stops.append(event.key)
        return stops

    return on_event


_END = object()


def _stream(model, start) -> Iterator[GenerationStepResult]:
    """Run ``start(callback)`` (one example) and yield its step results as they arrive."""
    steps: queue.Queue = queue.Queue()
    stop = {"now": False}

    def callback(step: GenerationStepResult) -> bool:
        steps.put(step)
        return stop["now"]

    futures = start(callback)
    futures[0].add_done_callback(lambda _: steps.put(_END))
    try:
        while True:
            item = steps.get()
            if item is _END:
                futures[0].result()  # raise the batch's error, if any
                return
            yield item
            if item.is_last:
                futures[0].result()
                return
    finally:
        stop["now"] = True


def _iterate_in_chunks(items: Iterable, chunk_size: int, submit) -> Iterator:
    """Read ``items`` in chunks, submit each chunk, yield results in order with one chunk ahead."""
    chunk_size = max(1, chunk_size)
    pending: list = []
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == chunk_size * 4:
            pending.extend(submit(chunk))
            chunk = []
            while len(pending) > chunk_size * 8:
                yield pending.pop(0).result()
    if chunk:
        pending.extend(submit(chunk))
    for future in pending:
        yield future.result()
