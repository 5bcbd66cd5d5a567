"""Steppers: one decoding step of an Optimum ONNX export, with its KV cache, as ``decoding.py`` wants.

A stepper holds the *naming* logic of an export; where tensors live and how the session runs is
its runner's (``runners.py``: host numpy arrays, or OrtValues kept on a device). Everything is
read from the sessions' input and output metadata, never hard-coded:

* ``past_key_values.<rest>`` inputs are fed from the ``present.<rest>`` outputs of the previous
  step; their head count, head size and dtype come from the input's declared shape and type;
* ``attention_mask`` / ``position_ids`` are fed when the graph declares them; prompts of different
  lengths are left-padded, masked, and their positions counted from each prompt's first token;
* merged decoders (Optimum's ``decoder_model_merged.onnx``, with a ``use_cache_branch`` input) run
  their first step with an empty cache and the flag off, then with the flag on;
* seq2seq models run the encoder once per batch; the decoder is the merged graph, or the pair
  ``decoder_model.onnx`` (first step) + ``decoder_with_past_model.onnx``. Cross-attention caches
  (``.encoder.`` in their names) are computed on the first step and kept as they are.

``select(rows)`` keeps, reorders or repeats batch rows of every cached tensor: that is how beams
are reordered and finished examples leave the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shmengine.decode.runners import HOST, KEEP, LOGITS, ORT_TYPES, HostRunner, Runner
from shmengine.model.alignment import ALIGNMENT
from shmengine.model.graph_edits import LOGIT_POSITIONS

__all__ = ["DecoderOnlyStepper", "Seq2SeqStepper", "run_encoder", "pad_right"]


def _inputs(session) -> dict:
    return {i.name: i for i in session.get_inputs()}


def _int_dtype(meta) -> type:
    return ORT_TYPES.get(meta.type, np.int64)


def _present(past_name: str) -> str:
    return "present" + past_name[len("past_key_values") :]


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def _pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(s) for s in sequences)
    ids = np.full((len(sequences), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), length), dtype=np.int64)
    for i, s in enumerate(sequences):
        if s:
            ids[i, length - len(s) :] = s
            mask[i, length - len(s) :] = 1
    return ids, mask


class DecoderOnlyStepper:
    """A decoder-only Optimum export (``model.onnx`` or ``decoder_model_merged.onnx``)."""

    def __init__(self, session, pad_id: int, runner: Runner | None = None):
        self.session = session
        self.pad_id = pad_id
        self.runner = runner or HostRunner()
        self.inputs = _inputs(session)
        output_names = {o.name for o in session.get_outputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values")]
        self.present_of = {p: _present(p) for p in self.past_names}
        missing = [v for v in self.present_of.values() if v not in output_names]
        if missing:
            raise ValueError(f"the decoder has cache inputs but no output {missing[0]!r} to feed them")
        self.ids_dtype = _int_dtype(self.inputs["input_ids"])
        self.mask_dtype = _int_dtype(self.inputs["attention_mask"]) if "attention_mask" in self.inputs else None
        self.positions_dtype = _int_dtype(self.inputs["position_ids"]) if "position_ids" in self.inputs else None
        # a graph edited at load time to compute logits only where asked (graph_edits.py)
        self.chooses_logit_positions = LOGIT_POSITIONS in self.inputs
        self.cache: dict = {}  # past input name -> tensor, wherever the runner keeps it
        self.mask: np.ndarray | None = None
        self.positions: np.ndarray | None = None

    def _run(self, input_ids: np.ndarray, first: bool, all_logits: bool = False):
        feeds = {"input_ids": input_ids.astype(self.ids_dtype, copy=False)}
        if self.chooses_logit_positions:
            length = input_ids.shape[1]
            feeds[LOGIT_POSITIONS] = np.arange(length) if all_logits else np.array([length - 1])
        if self.mask_dtype is not None:
            feeds["attention_mask"] = self.mask.astype(self.mask_dtype, copy=False)
        if self.positions_dtype is not None:
            feeds["position_ids"] = self.positions.astype(self.positions_dtype, copy=False)
        if "use_cache_branch" in self.inputs:
            feeds["use_cache_branch"] = np.array([not first])
        feeds.update(self.cache)
        fetch = {"logits": HOST if all_logits else LOGITS}
        fetch.update({present: KEEP for present in self.present_of.values()})
        outputs = self.runner.run(self.session, feeds, fetch)
        self.cache = {p: outputs[self.present_of[p]] for p in self.past_names}
        return outputs["logits"]

    def prefill(self, prompts: Sequence[Sequence[int]], *, all_logits: bool = False):
        """Logits after each prompt's last token (a :class:`decoding.Logits`), or with
        ``all_logits`` the host array [batch, positions, vocabulary] of every position."""
        ids, self.mask = _pad_left(prompts, self.pad_id)
        positions = np.cumsum(self.mask, axis=1) - 1
        self.positions = np.where(self.mask == 1, positions, 1)
        self.cache = {p: self.runner.empty(self.inputs[p], len(prompts)) for p in self.past_names}
        logits = self._run(ids, first=True, all_logits=all_logits)
        self.positions = self.positions[:, -1:] + 1
        return logits

    def step(self, token_ids: np.ndarray):
        self.mask = np.concatenate([self.mask, np.ones((len(token_ids), 1), dtype=self.mask.dtype)], axis=1)
        logits = self._run(token_ids.reshape(-1, 1), first=False)
        self.positions = self.positions + 1
        return logits

    def select(self, rows: np.ndarray) -> None:
        if _is_identity(rows, len(self.mask)):
            return
        self.cache = self.runner.take(self.cache, rows)
        self.mask = self.mask[rows]
        self.positions = self.positions[rows]


def _is_identity(rows: np.ndarray, count: int) -> bool:
    return len(rows) == count and bool(np.array_equal(rows, np.arange(count)))


def _encoder_feeds(inputs: dict, sources: Sequence[Sequence[int]], pad_id: int) -> tuple[dict, np.ndarray]:
    ids, mask = pad_right(sources, pad_id)
    feeds = {"input_ids": ids.astype(_int_dtype(inputs["input_ids"]), copy=False)}
    if "attention_mask" in inputs:
        feeds["attention_mask"] = mask.astype(_int_dtype(inputs["attention_mask"]), copy=False)
    if "token_type_ids" in inputs:
        feeds["token_type_ids"] = np.zeros_like(ids, dtype=_int_dtype(inputs["token_type_ids"]))
    return feeds, mask


def run_encoder(session, sources: Sequence[Sequence[int]], pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Run an encoder export on right-padded sources: (outputs by name as host arrays, attention mask)."""
    feeds, mask = _encoder_feeds(_inputs(session), sources, pad_id)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds))), mask


class Seq2SeqStepper:
    """An encoder-decoder Optimum export; ``encode`` first, then the decoding steps."""

    def __init__(
        self, encoder, decoder, decoder_with_past=None, *, pad_id: int, decoder_start_id: int, runner: Runner | None = None
    ):
        self.encoder = encoder
        self.first = decoder  # merged decoder, or the no-cache decoder of a pair
        self.rest = decoder_with_past or decoder
        self.pad_id = pad_id
        self.decoder_start_id = decoder_start_id
        self.runner = runner or HostRunner()
        self.first_inputs = _inputs(self.first)
        self.rest_inputs = _inputs(self.rest)
        self.first_outputs = {o.name for o in self.first.get_outputs()}
        self.rest_outputs = {o.name for o in self.rest.get_outputs()}
        self.past_names = [n for n in self.rest_inputs if n.startswith("past_key_values")]
        self.state: dict = {}  # name -> tensor (host array, or kept by the runner)
        # Which source sentence each state row decodes. Every row of one source holds the same
        # encoder states and cross-attention caches, so a select() that keeps this mapping (a
        # beam reorder) leaves those tensors as they are and moves only the self-attention caches.
        self.row_source = np.zeros(0, dtype=np.int64)
        # return_attention: fetch the alignment output (model/alignment.py) with every run;
        # ``alignment`` then holds the last run's [rows, positions, source] probabilities
        self.want_alignment = False
        self.alignment: np.ndarray | None = None

    def encode(self, sources: Sequence[Sequence[int]]) -> None:
        feeds, mask = _encoder_feeds(_inputs(self.encoder), sources, self.pad_id)
        outputs = self.runner.run(self.encoder, feeds, {"last_hidden_state": KEEP})
        self.state = {"encoder_hidden_states": outputs["last_hidden_state"], "encoder_attention_mask": mask}
        self.row_source = np.arange(len(sources))

    def _feeds(self, inputs: dict, input_ids: np.ndarray, first: bool) -> dict:
        feeds = {"input_ids": input_ids.astype(_int_dtype(inputs["input_ids"]), copy=False)}
        for name in ("encoder_hidden_states", "encoder_attention_mask"):
            if name in inputs:
                value = self.state[name]
                feeds[name] = value.astype(_int_dtype(inputs[name]), copy=False) if name.endswith("mask") else value
        if "use_cache_branch" in inputs:
            feeds["use_cache_branch"] = np.array([not first])
        for name in inputs:
            if name.startswith("past_key_values"):
                feeds[name] = self.state[name] if not first else self.runner.empty(inputs[name], len(input_ids))
        return feeds

    def _run(self, input_ids: np.ndarray, first: bool, all_logits: bool = False):
        session, inputs, outputs = (
            (self.first, self.first_inputs, self.first_outputs) if first else (self.rest, self.rest_inputs, self.rest_outputs)
        )
        fetch = {"logits": HOST if all_logits else LOGITS}
        # cross-attention caches are computed once, on the first step, and kept as they are
        wanted = [p for p in self.past_names if _present(p) in outputs and (first or ".encoder." not in p)]
        if not all_logits:
            fetch.update({_present(p): KEEP for p in wanted})
        if self.want_alignment:
            fetch[ALIGNMENT] = HOST
        results = self.runner.run(session, self._feeds(inputs, input_ids, first), fetch)
        if self.want_alignment:
            self.alignment = np.asarray(results[ALIGNMENT], dtype=np.float32)
        if not all_logits:
            self.state.update({p: results[_present(p)] for p in wanted})
        return results["logits"]

    def prefill(self, prompts: Sequence[Sequence[int]], *, all_logits: bool = False):
        """``prompts`` are the decoder inputs, all of length 1 (the start token) unless scoring;
        ``all_logits`` returns the host array of every position and keeps no cache."""
        ids = pad_right(prompts, self.pad_id)[0]  # the decoder is causal: right padding is harmless
        return self._run(ids, first=True, all_logits=all_logits)

    def step(self, token_ids: np.ndarray):
        return self._run(token_ids.reshape(-1, 1), first=False)

    def select(self, rows: np.ndarray) -> None:
        if _is_identity(rows, len(self.row_source)):
            return
        row_source = self.row_source[rows]
        same_sources = np.array_equal(row_source, self.row_source)
        moving = {name: value for name, value in self.state.items() if not (same_sources and _per_source(name))}
        self.state.update(self.runner.take(moving, rows))
        self.row_source = row_source


def _per_source(state_name: str) -> bool:
    """Tensors that depend only on the source sentence: the encoder's outputs and cross-attention caches."""
    return state_name.startswith("encoder_") or ".encoder." in state_name
