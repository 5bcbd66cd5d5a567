"""What a model directory holds: which ONNX graphs, which special tokens, which vocabulary.

Accepted layouts are Hugging Face Optimum's ONNX exports, as users already have them:

* decoder-only: ``model.onnx`` (or ``decoder_model_merged.onnx``, or ``decoder_model.onnx``);
* seq2seq: ``encoder_model.onnx`` with ``decoder_model_merged.onnx``, or with
  ``decoder_model.onnx`` (+ ``decoder_with_past_model.onnx``);
* encoder-only: ``model.onnx`` (BERT-like, sentence-transformers).

beside ``config.json`` (+ ``generation_config.json``) and the tokenizer files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from shmengine.errors import ModelLoadError
from shmengine.model.vocab import Vocabulary

__all__ = ["ModelDirectory"]

def _first(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class ModelDirectory:
    path: Path
    kind: str  # "decoder", "seq2seq" or "encoder"
    graphs: dict[str, Path]  # store key -> ONNX file
    config: dict
    generation_config: dict
    vocab: Vocabulary
    eos_ids: list[int] = field(default_factory=list)
    bos_id: int | None = None
    pad_id: int = 0
    decoder_start_id: int | None = None
    max_positions: int | None = None

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @classmethod
    def open(cls, path: str | os.PathLike, kind: str) -> "ModelDirectory":
        """Inspect ``path`` for a model of ``kind``; every error names the missing piece."""
        directory = Path(path)
        if not directory.exists():
            raise ModelLoadError(f"model path {str(directory)!r} does not exist")
        if not directory.is_dir():
            raise ModelLoadError(f"{str(directory)!r} is a file; a {kind} model is a directory (an Optimum ONNX export)")
        graphs = cls._find_graphs(directory, kind)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"model directory {str(directory)!r} lacks config.json (written by save_pretrained / optimum-cli)")
        config = _read_json(config_path)
        if kind != "seq2seq" and config.get("is_encoder_decoder"):
            raise ModelLoadError(
                f"{str(config_path)!r} describes an encoder-decoder model; load it with shmengine.Translator"
            )
        generation_path = directory / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.is_file() else {}
        vocab = Vocabulary.from_directory(directory)
        eos_ids = _as_list(_first(generation.get("eos_token_id"), config.get("eos_token_id")))
        if kind != "encoder" and not eos_ids:
            raise ModelLoadError(f"{str(config_path)!r} names no eos_token_id; cannot tell when generation ends")
        bos = _first(generation.get("bos_token_id"), config.get("bos_token_id"))
        pad = _first(generation.get("pad_token_id"), config.get("pad_token_id"), eos_ids[0] if eos_ids else 0)
        start = _first(generation.get("decoder_start_token_id"), config.get("decoder_start_token_id"))
        if kind == "seq2seq" and start is None:
            start = _first(bos, pad)
        max_positions = _first(config.get("max_position_embeddings"), config.get("n_positions"), config.get("n_ctx"))
        return cls(directory, kind, graphs, config, generation, vocab, eos_ids, bos, pad, start, max_positions)

    @staticmethod
    def _find_graphs(directory: Path, kind: str) -> dict[str, Path]:
        def have(name: str) -> Path | None:
            p = directory / name
            return p if p.is_file() else None

        listing = ", ".join(sorted(p.name for p in directory.glob("*.onnx"))) or "no .onnx file"
        if kind == "seq2seq":
            encoder = have("encoder_model.onnx")
            if encoder is None:
                raise ModelLoadError(
                    f"model directory {str(directory)!r} lacks encoder_model.onnx (it has {listing}); "
                    "export it with optimum-cli export onnx --task text2text-generation-with-past"
                )
            merged = have("decoder_model_merged.onnx")
            if merged:
                return {"encoder": encoder, "decoder": merged}
            decoder = have("decoder_model.onnx")
            if decoder is None:
                raise ModelLoadError(
                    f"model directory {str(directory)!r} lacks decoder_model_merged.onnx or decoder_model.onnx "
                    f"(it has {listing})"
                )
            graphs = {"encoder": encoder, "decoder": decoder}
            with_past = have("decoder_with_past_model.onnx")
            if with_past:
                graphs["decoder_with_past"] = with_past
            return graphs
        for name in ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx"):
            if (found := have(name)) and (kind == "decoder" or name == "model.onnx"):
                return {"model": found}
        wanted = "model.onnx" if kind == "encoder" else "model.onnx (or decoder_model_merged.onnx)"
        raise ModelLoadError(f"model directory {str(directory)!r} lacks {wanted} (it has {listing})")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not readable JSON: {exc}") from exc
