"""Worker programs of the generation models: each runs a whole batch (the full decoding loop,
or a scoring pass) inside one worker process, over sessions built on the shared weights."""

from __future__ import annotations

import numpy as np

from shmengine.decode.decoding import decode, log_softmax, select_examples
from shmengine.decode.steppers import DecoderOnlyStepper, Seq2SeqStepper, run_encoder
from shmengine.runtime.worker import WorkerContext

__all__ = ["GeneratorProgram", "TranslatorProgram", "EncoderProgram"]


def _streamer(context: WorkerContext, options):
    """The decoding loop's per-token hook when the caller streams: emit, then check for a stop."""
    if not options.stream:
        return None

    def on_step(events) -> list[int]:
        context.emit(events)
        return context.wait_for_stops()

    return on_step


class GeneratorProgram:
    """Decoder-only models: ``generate`` and ``score``."""

    def __init__(self, context: WorkerContext, *, pad_id: int):
        self.context = context
        self.session = context.create_session("model")
        self.runner = context.create_runner()
        self.pad_id = pad_id

    def describe(self) -> dict:
        return {"session_providers": self.session.get_providers(), "runner": type(self.runner).__name__}

    def run(self, method: str, payload):
        if method == "generate":
            prompts, options = payload
            stepper = DecoderOnlyStepper(self.session, self.pad_id, self.runner)
            return decode(stepper, prompts, options, _streamer(self.context, options))
        if method == "score":
            return _score_rows(DecoderOnlyStepper(self.session, self.pad_id, self.runner), payload, left_padded=True)
        if method == "forward":  # Generator.forward_batch: every position's logits, per sequence
            logits = DecoderOnlyStepper(self.session, self.pad_id, self.runner).prefill(payload, all_logits=True)
            width = logits.shape[1]  # left padded: sequence i holds the last len(i) positions
            return [np.ascontiguousarray(logits[i, width - len(s) :]) for i, s in enumerate(payload)]
        raise ValueError(f"unknown method {method!r}")


class TranslatorProgram:
    """Encoder-decoder models: ``translate`` and ``score``."""

    def __init__(self, context: WorkerContext, *, pad_id: int, decoder_start_id: int):
        self.context = context
        self.encoder = context.create_session("encoder")
        self.decoder = context.create_session("decoder")
        self.decoder_with_past = context.create_session("decoder_with_past") if "decoder_with_past" in context.catalog else None
        self.runner = context.create_runner()
        self.pad_id = pad_id
        self.start_id = decoder_start_id

    def describe(self) -> dict:
        return {"session_providers": self.decoder.get_providers(), "runner": type(self.runner).__name__}

    def _stepper(self) -> Seq2SeqStepper:
        return Seq2SeqStepper(
            self.encoder,
            self.decoder,
            self.decoder_with_past,
            pad_id=self.pad_id,
            decoder_start_id=self.start_id,
            runner=self.runner,
        )

    def run(self, method: str, payload):
        if method == "translate":
            sources, options = payload
            if options.return_alternatives:
                return self._alternatives(sources, options)
            stepper = self._stepper()
            stepper.want_alignment = options.return_attention
            stepper.encode(sources)
            if options.beam_size == 1 and options.num_hypotheses > 1:
                # decode() runs each example num_hypotheses times, side by side: the encoder
                # states must be repeated the same way
                stepper.select(np.repeat(np.arange(len(sources)), options.num_hypotheses))
            return decode(stepper, [[self.start_id]] * len(sources), options, _streamer(self.context, options))
        if method == "score":
            sources, targets = payload  # targets end with the end token
            stepper = self._stepper()
            stepper.encode(sources)
            decoder_inputs = [[self.start_id] + t[:-1] for t in targets]
            logits = stepper.prefill(decoder_inputs, all_logits=True)
            return _gather_log_probs(log_softmax(logits), targets, [0] * len(targets))
        raise ValueError(f"unknown method {method!r}")

    def _alternatives(self, sources, options):
        """``return_alternatives``: the decoder takes each target prefix as one block before the
        alternatives (decoding.py), and a block of right-padded prefixes of different lengths
        would read pads, so examples decode in groups of one prefix length (most batches are one
        group: no prefix, or prefixes of one length)."""
        lengths = [len(f) for f in options.forced] if options.forced else [0] * len(sources)
        results = [None] * len(sources)
        for number, length in enumerate(sorted(set(lengths))):
            group = [i for i, n in enumerate(lengths) if n == length]
            seed = None if options.seed is None else options.seed + number
            group_options = select_examples(options, group, seed=seed)
            stepper = self._stepper()
            stepper.want_alignment = options.return_attention
            stepper.encode([sources[i] for i in group])
            for i, hyps in zip(group, decode(stepper, [[self.start_id]] * len(group), group_options)):
                results[i] = hyps
        return results


class EncoderProgram:
    """Encoder-only models: ``forward``."""

    def __init__(self, context: WorkerContext, *, pad_id: int):
        self.session = context.create_session("model")
        self.pad_id = pad_id

    def run(self, method: str, payload):
        if method != "forward":
            raise ValueError(f"unknown method {method!r}")
        outputs, mask = run_encoder(self.session, payload, self.pad_id)
        hidden = outputs.get("last_hidden_state")
        if hidden is None:
            hidden = next(iter(outputs.values()))
        pooled = outputs.get("pooler_output")
        if pooled is None:  # sentence-transformers style: mean over the real tokens
            weights = mask[:, :, None].astype(hidden.dtype)
            pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1)
        return hidden, pooled


def _gather_log_probs(log_probs: np.ndarray, targets, offsets) -> list[list[float]]:
    """log_probs[i, offset + t, targets[i][t]] for every target token."""
    rows = []
    for i, target in enumerate(targets):
        positions = offsets[i] + np.arange(len(target))
        rows.append(log_probs[i, positions, target].astype(float).tolist())
    return rows


def _score_rows(stepper: DecoderOnlyStepper, sequences, *, left_padded: bool) -> list[list[float]]:
    """Log-probability of every token after the first, for each sequence."""
    logits = stepper.prefill(sequences, all_logits=True)
    width = logits.shape[1]
    # with left padding, sequence i occupies the last len(i) positions
    offsets = [width - len(s) for s in sequences] if left_padded else [0] * len(sequences)
    return _gather_log_probs(log_softmax(logits), [s[1:] for s in sequences], offsets)



