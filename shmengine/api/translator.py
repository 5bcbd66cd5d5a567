"""``shmengine.Translator``: CTranslate2's Translator over an Optimum seq2seq ONNX export."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future

from shmengine.api.generator import DecodingModel, _iterate_in_chunks, _slice_options, _stream
from shmengine.api.model_options import ModelOptions
from shmengine.api.options import end_ids_for, search_options, warn_ignored
from shmengine.api.results import ExecutionStats, GenerationStepResult, ScoringResult, TranslationResult
from shmengine.errors import InvalidInputError, TokenTypeError
from shmengine.model.modeldir import ModelDirectory
from shmengine.runtime.worker import ProgramSpec

__all__ = ["Translator"]


def _split_tokens(line: str) -> list[str]:
    return line.split()


def _join_tokens(tokens: Sequence[str]) -> str:
    return " ".join(tokens)


def _read_lines(path: str | os.PathLike) -> Iterator[str]:
    """Lines of a UTF-8 text file, one at a time; bad UTF-8 is an error that names the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"{os.fspath(path)}, line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _pairs(source: Iterable, target: Iterable) -> Iterator[tuple]:
    """zip(), but a source or target left over is an error, as CTranslate2 raises for files of
    different lengths (zip alone would drop the rest without a word)."""
    end = object()
    sources, targets = iter(source), iter(target)
    for number in itertools.count(1):
        s, t = next(sources, end), next(targets, end)
        if s is end and t is end:
            return
        if s is end or t is end:
            longer = "target" if s is end else "source"
            raise InvalidInputError(f"the {longer} has more examples than the other side: example {number} has no partner")
        yield s, t


def _source_attention(attention, length: int, original: int) -> list[list[list[float]]]:
    """Per hypothesis and token, the attention over the source as CTranslate2 returns it: cut to
    the source's real length (not the batch's padding), then padded with zeros to the length of
    the source as given (it differs when max_input_length truncated it)."""
    out = []
    for vectors in attention:
        rows = []
        for vector in vectors:
            row = [float(x) for x in vector[:length]]
            rows.append(row + [0.0] * (original - len(row)) if original > len(row) else row[:original])
        out.append(rows)
    return out


def _replace_unknowns(hypotheses, attention, source_tokens, source_given, unk_token) -> None:
    """CTranslate2's replace_unknowns: each unknown target token becomes the source token it
    attends to most (the first of equals), as the caller gave it."""
    if unk_token is None:
        return
    for hypothesis, vectors in zip(hypotheses, attention):
        for t, token in enumerate(hypothesis):
            if token == unk_token and t < len(vectors) and vectors[t]:
                position = max(range(len(vectors[t])), key=lambda j: (vectors[t][j], -j))
                given = source_given[position]
                hypothesis[t] = given if isinstance(given, str) else source_tokens[position]


class Translator(DecodingModel):
    """Translation (and any text-to-text task) with an encoder-decoder model (Marian, T5, BART...).

    Args:
        model_path: an Optimum ONNX export directory: ``encoder_model.onnx`` with
            ``decoder_model_merged.onnx`` (or ``decoder_model.onnx`` + ``decoder_with_past_model.onnx``),
            ``config.json``, ``generation_config.json`` and the tokenizer's ``tokenizer.json``.
        Others: as :class:`shmengine.Generator`.

    Source tokens are given as the model's tokenizer makes them, special tokens included (for
    Marian: ending with ``</s>``), exactly as CTranslate2 takes them.
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
        self.model = ModelDirectory.open(model_path, "seq2seq")
        self.vocabulary = self.model.vocab
        if options.tensor_parallel:  # split over the ranks of mpirun (shmengine.tp), as Generator's
            from shmengine.tp.local import attach_translator

            attach_translator(self, inter_threads=options.inter_threads, intra_threads=options.intra_threads,
                   device=options.device, device_index=options.device_index, compute_type=options.compute_type)
            return
        program = ProgramSpec(
            "shmengine.decode.programs",
            "TranslatorProgram",
            {"pad_id": self.model.pad_id, "decoder_start_id": self.model.decoder_start_id},
        )
        roles = {"encoder": "seq2seq_encoder", "decoder": "seq2seq_decoder", "decoder_with_past": "seq2seq_decoder"}
        self._start(self.model.graphs, program, options, roles=roles)

    # -- inputs ---------------------------------------------------------------------------------

    def _source_ids(self, source, max_input_length: int) -> list[list[int]]:
        if isinstance(source, (str, bytes)) or not isinstance(source, Sequence):
            raise TokenTypeError("source must be a list of token lists, e.g. [['▁Hello', '▁world']]")
        model = self.model
        sources = []
        for i, tokens in enumerate(source):
            if isinstance(tokens, (str, bytes)):
                raise TokenTypeError(f"source[{i}] is a string; pass a list of tokens (split it with the tokenizer)")
            ids = self.vocabulary.to_ids(tokens, where=f"source[{i}]")
            if max_input_length and len(ids) > max_input_length:
                # CTranslate2 keeps the end token of a truncated source: the encoder was trained on
                # sources that end with it, and without it the model reads a sentence that goes on
                ends = max_input_length > 1 and ids[-1] in model.eos_ids
                ids = ids[: max_input_length - 1] + [ids[-1]] if ends else ids[:max_input_length]
            if model.max_positions and len(ids) > model.max_positions:
                raise InvalidInputError(
                    f"source[{i}] has {len(ids)} tokens, more than the model's {model.max_positions} positions; "
                    "set max_input_length to truncate"
                )
            sources.append(ids)
        return sources

    # -- translation ----------------------------------------------------------------------------

    def translate_batch(
        self,
        source: Sequence[Sequence[str | int]],
        target_prefix: Sequence[Sequence[str | int] | None] | None = None,
        *,
        max_batch_size: int = 0,
        batch_type: str = "examples",
        asynchronous: bool = False,
        beam_size: int = 2,
        patience: float = 1,
        num_hypotheses: int = 1,
        length_penalty: float = 1,
        coverage_penalty: float = 0,
        repetition_penalty: float = 1,
        no_repeat_ngram_size: int = 0,
        disable_unk: bool = False,
        suppress_sequences=None,
        end_token=None,
        return_end_token: bool = False,
        prefix_bias_beta: float = 0,
        max_input_length: int = 1024,
        max_decoding_length: int = 256,
        min_decoding_length: int = 1,
        use_vmap: bool = False,
        return_scores: bool = False,
        return_logits_vocab: bool = False,
        return_attention: bool = False,
        return_alternatives: bool = False,
        min_alternative_expansion_prob: float = 0,
        sampling_topk: int = 1,
        sampling_topp: float = 1,
        sampling_temperature: float = 1,
        replace_unknowns: bool = False,
        callback=None,
        early_stopping: bool | str = True,
    ):
        """Translate a batch of token lists (CTranslate2's ``translate_batch``).

        ``target_prefix`` forces each hypothesis to start with the given tokens (they are part of
        the result and count towards ``max_decoding_length``). ``return_alternatives`` (CTranslate2's
        meaning): the ``num_hypotheses`` most likely tokens at the first position after the
        target prefix, each continued by the search (``beam_size``), in that order; alternatives
        below ``min_alternative_expansion_prob`` are left out. ``return_attention`` (CTranslate2's
        meaning: per hypothesis token, the attention probabilities over the source tokens of the
        last decoder layer's first cross-attention head, the one its converter picks for
        alignment) and ``replace_unknowns`` (an unknown target token becomes the source token it
        attends to most) need a decoder that exposes that attention (shmengine adds it to Optimum
        seq2seq exports; otherwise they raise). ``coverage_penalty``, ``prefix_bias_beta`` (a
        hard prefix is used), ``use_vmap`` and ``return_logits_vocab`` are accepted and have no
        effect (a warning, once). Returns a :class:`TranslationResult`
        per example, or with ``asynchronous=True`` one ``concurrent.futures.Future`` per example.
        ``early_stopping`` picks when beam search ends an example (transformers' keyword and
        values): ``True``, the default, is CTranslate2's rule: stop once ``round(beam_size *
        patience)`` hypotheses have finished, even while a live beam would still score higher
        (the answer can then be worse than greedy search's); ``"never"`` stops only once no live
        beam can beat the hypotheses to return, so they are the best the beam search holds
        (exact; the beams run longer).
        """
        warn_ignored(
            "translate_batch", coverage_penalty=(coverage_penalty, 0), prefix_bias_beta=(prefix_bias_beta, 0),
            use_vmap=(use_vmap, False), return_logits_vocab=(return_logits_vocab, False),
        )
        attention = bool(return_attention or replace_unknowns)  # replace_unknowns reads it too
        if attention:
            self._check_attention("return_attention" if return_attention else "replace_unknowns")
        if return_alternatives and prefix_bias_beta > 0:
            raise InvalidInputError("prefix_bias_beta cannot be combined with return_alternatives (as in CTranslate2)")
        if not source:
            return []
        if max_decoding_length < 1:
            raise InvalidInputError(f"max_decoding_length must be >= 1, got {max_decoding_length}")
        if min_decoding_length > max_decoding_length:
            raise InvalidInputError(
                f"min_decoding_length ({min_decoding_length}) is greater than max_decoding_length ({max_decoding_length})"
            )
        sources = self._source_ids(source, max_input_length)
        if target_prefix is not None and len(target_prefix) != len(sources):
            raise InvalidInputError(f"target_prefix has {len(target_prefix)} entries for {len(sources)} source examples")
        forced = [
            self.vocabulary.to_ids(p, where=f"target_prefix[{i}]") if p else []
            for i, p in enumerate(target_prefix or [None] * len(sources))
        ]
        max_new = max_decoding_length
        if self.model.max_positions:
            max_new = min(max_new, self.model.max_positions)
        # CTranslate2 decodes a batch that holds any target prefix in prefix mode, where every
        # example's first free step (step 0 for one without a prefix) gets the issue #277 rule
        # (see decoding.py); a batch with none skips it
        after_prefix = [len(f) for f in forced] if any(forced) else [None] * len(forced)
        new_tokens, least_new = [max_new] * len(sources), [min_decoding_length] * len(sources)
        if return_alternatives:
            # CTranslate2 cuts the prefix to max_decoding_length; after it, the alternative is
            # the first new token, and the rest of max_decoding_length and min_decoding_length
            forced = [f[:max_new] for f in forced]
            new_tokens = [0 if len(f) == max_new else max_new - len(f) for f in forced]
            least_new = [1 + max(0, min_decoding_length - 1 - len(f)) for f in forced]
        # Marian's <pad> only starts the decoder: transformers bans it (bad_words_ids) and
        # CTranslate2's converter drops it from the vocabulary, so neither ever emits it; here
        # min_decoding_length, which bans the end token, made beam search pick it
        marian_pad = self.model.model_type == "marian" and self.model.pad_id == self.model.decoder_start_id
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
            return_attention=attention,
            return_scores=return_scores,
            forced=forced if any(forced) else None,
            after_prefix=after_prefix,
            end_counts_in_length=True,
            history=[[] for _ in sources],
            always_suppress=(self.model.pad_id,) if marian_pad else (),
        )

        def convert(hyps, example):
            hypotheses = [self.vocabulary.to_tokens(h) for h in hyps.ids]
            vectors = []
            if attention:
                original = filled[example]
                vectors = _source_attention(hyps.attention, len(sources[original]), len(source[original]))
                if replace_unknowns:
                    _replace_unknowns(hypotheses, vectors, self.vocabulary.to_tokens(self.vocabulary.to_ids(source[original])),
                                      list(source[original]), self.vocabulary.unk_token)
            return TranslationResult(
                hypotheses=hypotheses,
                scores=list(hyps.scores) if return_scores else [],
                attention=vectors if return_attention else [],
            )

        # An empty source translates to an empty hypothesis, with no trip to a worker (the
        # encoder cannot take a zero-length input).
        filled = [i for i, ids in enumerate(sources) if ids]
        futures: list[Future] = []
        for _ in sources:
            empty: Future = Future()
            empty.set_running_or_notify_cancel()
            empty.set_result(TranslationResult(hypotheses=[[]], scores=[0.0] if return_scores else []))
            futures.append(empty)
        if filled:
            sub_options = _slice_options(options, filled)
            submitted = self._submit_decoding(
                "translate", [sources[i] for i in filled], sub_options,
                max_batch_size, batch_type, convert, callback, positions=filled,
            )
            for i, future in zip(filled, submitted):
                futures[i] = future
        return futures if asynchronous else [f.result() for f in futures]

    def _check_attention(self, setting: str) -> None:
        """Raise unless the decoder graphs output the alignment attention (model/alignment.py)."""
        from shmengine.model.alignment import ALIGNMENT

        catalog = getattr(getattr(self, "_store", None), "catalog", None) or {}  # a tensor-parallel store has none
        graphs = [key for key in ("decoder", "decoder_with_past") if key in catalog]
        if not graphs or any(ALIGNMENT not in {o.name for o in catalog[key].outputs} for key in graphs):
            raise InvalidInputError(
                f"{setting}=True needs the decoder's cross-attention, and this model's decoder does not expose it: "
                "shmengine adds it to Optimum seq2seq exports whose last decoder layer has a Softmax named "
                "'.../layers.N/encoder_attn/Softmax' (tensor-parallel translators do not have it yet); "
                f"call without {setting}"
            )

    @property
    def num_translators(self) -> int:
        """Batches that run side by side: the worker processes (CTranslate2's name)."""
        return self.num_workers

    def translate_iterable(
        self,
        source: Iterable[Sequence[str]],
        target_prefix: Iterable[Sequence[str]] | None = None,
        max_batch_size: int = 32,
        batch_type: str = "examples",
        **options,
    ) -> Iterator[TranslationResult]:
        """Translate an iterable of token lists, read and run in chunks, results in order."""
        items = source if target_prefix is None else zip(source, target_prefix)

        def submit(chunk):
            if target_prefix is None:
                return self.translate_batch(chunk, max_batch_size=max_batch_size, batch_type=batch_type, asynchronous=True, **options)
            src, prefix = zip(*chunk)
            return self.translate_batch(
                list(src), list(prefix), max_batch_size=max_batch_size, batch_type=batch_type, asynchronous=True, **options
            )

        yield from _iterate_in_chunks(items, max_batch_size, submit)

    def translate_file(
        self,
        source_path: str | os.PathLike,
        output_path: str | os.PathLike,
        target_path: str | os.PathLike | None = None,
        *,
        max_batch_size: int = 32,
        read_batch_size: int = 0,
        batch_type: str = "examples",
        with_scores: bool = False,
        source_tokenize_fn: Callable[[str], list[str]] | None = None,
        target_tokenize_fn: Callable[[str], list[str]] | None = None,
        target_detokenize_fn: Callable[[list[str]], str] | None = None,
        progress: Callable[[int], None] | None = None,
        **options,
    ) -> ExecutionStats:
        """Translate a file line by line into another, in order, never holding the whole file.

        Lines are split on spaces unless ``source_tokenize_fn`` is given; hypotheses are joined
        with spaces unless ``target_detokenize_fn`` is given. ``target_path`` gives target
        prefixes, one line per source line. ``progress(n)`` is called after every written line.
        Returns the number of examples and target tokens and the time taken.
        """
        tokenize = source_tokenize_fn or _split_tokens
        detokenize = target_detokenize_fn or _join_tokens
        stats = ExecutionStats()
        start = time.perf_counter()
        sources = (tokenize(line) for line in _read_lines(source_path))
        prefixes = None
        if target_path is not None:
            prefixes = ((target_tokenize_fn or _split_tokens)(line) for line in _read_lines(target_path))
        results = self.translate_iterable(
            sources, prefixes, max_batch_size=max_batch_size, batch_type=batch_type, return_scores=with_scores, **options
        )
        with open(output_path, "w", encoding="utf-8") as out:
            for result in results:
                tokens = result.hypotheses[0] if result.hypotheses else []
                line = detokenize(tokens)
                if with_scores:
                    line = f"{result.scores[0]:.6f} ||| {line}"
                out.write(line + "\n")
                stats.num_examples += 1
                stats.num_tokens += len(tokens)
                if progress:
                    progress(stats.num_examples)
        stats.total_time_in_ms = (time.perf_counter() - start) * 1000
        return stats

    def generate_tokens(
        self, source: Sequence[str | int], target_prefix: Sequence[str | int] | None = None, **options
    ) -> Iterator[GenerationStepResult]:
        """Yield the translation of one example token by token (greedy or sampling)."""
        options.setdefault("beam_size", 1)
        return _stream(
            self,
            lambda cb: self.translate_batch(
                [source], [target_prefix] if target_prefix else None, callback=cb, asynchronous=True, **options
            ),
        )

    # -- scoring --------------------------------------------------------------------------------

    def score_batch(
        self,
        source: Sequence[Sequence[str | int]],
        target: Sequence[Sequence[str | int]],
        *,
        max_batch_size: int = 0,
        batch_type: str = "examples",
        max_input_length: int = 1024,
        offset: int = 0,
        asynchronous: bool = False,
    ):
        """Log-probability of each target token (and of the end token) given the source."""
        if len(source) != len(target):
            raise InvalidInputError(f"score_batch got {len(source)} sources and {len(target)} targets")
        if not source:
            return []
        sources = self._source_ids(source, max_input_length)
        eos = self.model.eos_ids[0]
        targets = []
        for i, t in enumerate(target):
            ids = self.vocabulary.to_ids(t, where=f"target[{i}]")
            if max_input_length and len(ids) + 1 > max_input_length:
                # as CTranslate2: the target is truncated too, to max_input_length tokens counting
                # the end token, which stays (it scores target[:max_input_length - 1] + </s>)
                ids = ids[: max(0, max_input_length - 1)]
            targets.append(ids + [eos])

        def convert(log_probs, example):
            ids = targets[example][offset:]
            return ScoringResult(tokens=self.vocabulary.to_tokens(ids), log_probs=list(log_probs[offset:]))

        futures = self._submit_split(
            "score",
            [len(s) for s in sources],
            lambda indices: ([sources[i] for i in indices], [targets[i] for i in indices]),
            convert,
            max_batch_size,
            batch_type,
        )
        return futures if asynchronous else [f.result() for f in futures]

    def score_iterable(
        self, source: Iterable, target: Iterable, max_batch_size: int = 64, batch_type: str = "examples", **options
    ) -> Iterator[ScoringResult]:
        """Score an iterable of (source, target) pairs, in chunks, in order."""

        def submit(chunk):
            src, tgt = zip(*chunk)
            return self.score_batch(list(src), list(tgt), max_batch_size=max_batch_size, batch_type=batch_type, asynchronous=True, **options)

        yield from _iterate_in_chunks(_pairs(source, target), max_batch_size, submit)

    def score_file(
        self,
        source_path: str | os.PathLike,
        target_path: str | os.PathLike,
        output_path: str | os.PathLike,
        *,
        max_batch_size: int = 32,
        read_batch_size: int = 0,
        batch_type: str = "examples",
        max_input_length: int = 1024,
        offset: int = 0,
        with_tokens_score: bool = False,
        source_tokenize_fn=None,
        target_tokenize_fn=None,
        target_detokenize_fn=None,
    ) -> ExecutionStats:
        """Score a parallel file pair; each output line is ``mean log-prob ||| target``."""
        tokenize_source = source_tokenize_fn or _split_tokens
        tokenize_target = target_tokenize_fn or _split_tokens
        detokenize = target_detokenize_fn or _join_tokens
        stats = ExecutionStats()
        start = time.perf_counter()
        sources = (tokenize_source(line) for line in _read_lines(source_path))
        targets = (tokenize_target(line) for line in _read_lines(target_path))
        results = self.score_iterable(
            sources, targets, max_batch_size=max_batch_size, batch_type=batch_type,
            max_input_length=max_input_length, offset=offset,
        )
        with open(output_path, "w", encoding="utf-8") as out:
            for result in results:
                mean = sum(result.log_probs) / max(1, len(result.log_probs))
                line = f"{mean:.6f} ||| {detokenize(result.tokens[:-1])}"
                if with_tokens_score:
                    line += " ||| " + " ".join(f"{t}:{lp:.6f}" for t, lp in zip(result.tokens, result.log_probs))
                out.write(line + "\n")
                stats.num_examples += 1
                stats.num_tokens += len(result.tokens)
        stats.total_time_in_ms = (time.perf_counter() - start) * 1000
        return stats
