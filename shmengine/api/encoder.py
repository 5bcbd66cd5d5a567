"""``shmengine.Encoder``: CTranslate2's Encoder over an encoder-only ONNX export (BERT-like,
sentence-transformers)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from shmengine.api.batching import BatchFuture, split_future
from shmengine.api.engine import PooledModel
from shmengine.api.model_options import ModelOptions
from shmengine.api.results import EncoderForwardOutput
from shmengine.errors import InvalidInputError
from shmengine.model.modeldir import ModelDirectory
from shmengine.runtime.worker import ProgramSpec

__all__ = ["Encoder"]


class Encoder(PooledModel):
    """Run an encoder: ``forward_batch`` gives hidden states and a pooled vector per example.

    Args:
        model_path: an Optimum ONNX export of an encoder (``model.onnx`` with ``input_ids``,
            ``attention_mask`` and optionally ``token_type_ids``), with ``config.json`` and the
            tokenizer's ``tokenizer.json`` or ``vocab.json``.
        Others: as :class:`shmengine.Engine` (``compute_type`` included); ``flash_attention``
            is accepted as by Generator; ``files`` and ``tensor_parallel=True`` raise
            ``NotImplementedError`` (in-memory models and a tensor-parallel encoder are not built).
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
        )
        self.model = ModelDirectory.open(model_path, "encoder")
        self.vocabulary = self.model.vocab
        program = ProgramSpec("shmengine.decode.programs", "EncoderProgram", {"pad_id": self.model.pad_id})
        self._start(self.model.graphs, program, options, roles={"model": "encoder"})

    def forward_batch(
        self,
        inputs,
        lengths: Sequence[int] | None = None,
        token_type_ids=None,
        *,
        asynchronous: bool = False,
    ):
        """Encode a batch: a list of token lists (strings or ids), or an id array with ``lengths``.

        Returns an :class:`EncoderForwardOutput` with ``last_hidden_state`` [batch, length,
        hidden] (padded positions are whatever the model computes there) and ``pooler_output``
        [batch, hidden]: the model's pooler when the graph has one, else the mean over the real
        tokens. ``token_type_ids`` is accepted for CTranslate2 compatibility; segment ids are 0.
        """
        if isinstance(inputs, np.ndarray):
            if lengths is None:
                raise InvalidInputError("forward_batch got an id array without lengths")
            sequences = [row[:n].tolist() for row, n in zip(inputs, lengths)]
        else:
            sequences = [self.vocabulary.to_ids(tokens, where=f"inputs[{i}]") for i, tokens in enumerate(inputs)]
        if not sequences:
            raise InvalidInputError("forward_batch got an empty batch")
        for i, ids in enumerate(sequences):
            if not ids:
                raise InvalidInputError(f"inputs[{i}] is empty; an encoder needs at least one token")
            if self.model.max_positions and len(ids) > self.model.max_positions:
                raise InvalidInputError(
                    f"inputs[{i}] has {len(ids)} tokens, more than the model's {self.model.max_positions} positions"
                )
        def convert(result, _index):
            hidden, pooled = result
            return EncoderForwardOutput(last_hidden_state=hidden, pooler_output=pooled)

        future = BatchFuture()  # its one example future is cancellable while the batch is queued
        example = split_future(future, 1, convert)[0]
        self._pool.submit("forward", sequences, future=future)
        return example if asynchronous else example.result()
