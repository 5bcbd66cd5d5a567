"""Model builders and the small bundled models (installed as ``shmengine.models``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED_DIR", "default_model_path", "bundled_model_path"]

BUNDLED_DIR = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The bundled default model: what ``shmengine-run`` uses when no model is named."""
    path = BUNDLED_DIR / "default"
    if not (path / "model.onnx").is_file():
        raise FileNotFoundError(
            f"the bundled default model is missing from {path}; rebuild it with "
            "`python -m shmengine.models.builders default`"
        )
    return path


def bundled_model_path(name: str) -> Path:
    """A bundled model directory: ``numbers-marian`` (seq2seq) or ``numbers-gpt2`` (decoder)."""
    path = BUNDLED_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"the bundled model {name!r} is missing from {BUNDLED_DIR}; rebuild it with "
            "`python models/train_numbers.py all`"
        )
    return path
