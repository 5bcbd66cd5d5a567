"""Text <-> tokens for the launcher, with the tokenizer that ships beside the model.

The Python API takes tokens, as CTranslate2's does; ``shmengine-run`` reads and writes text, so it
tokenizes with the model's own ``tokenizer.json`` (through Hugging Face's ``tokenizers``, the
reference implementation of those files), or splits on spaces with ``--tokenize space``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

from shmengine.errors import InvalidInputError

__all__ = ["TextCodec", "read_lines"]


class TextCodec:
    """Turn a line of text into the model's token strings, and token strings back into text."""

    def __init__(self, model_dir: str | Path, mode: str = "model"):
        self.mode = mode
        self.tokenizer = None
        path = Path(model_dir) / "tokenizer.json"
        if mode == "model":
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; use --tokenize space for pre-tokenized text")
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(path))
        elif mode != "space":
            raise ValueError(f"--tokenize must be 'model' or 'space', got {mode!r}")

    def tokenize(self, line: str, special_tokens: bool = True) -> list[str]:
        """The tokens the model's tokenizer makes of ``line``, with its special tokens (Marian's
        trailing ``</s>``, say) unless ``special_tokens=False``: a score target, to which
        scoring adds the end token itself, as CTranslate2 does."""
        if self.tokenizer is None:
            return line.split()
        return self.tokenizer.encode(line, add_special_tokens=special_tokens).tokens

    def detokenize(self, tokens: list[str]) -> str:
        if self.tokenizer is None:
            return " ".join(tokens)
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        return self.tokenizer.decode([i for i in ids if i is not None], skip_special_tokens=True)


def read_lines(path: str | os.PathLike | None) -> Iterator[tuple[str, str]]:
    """``(where, line)`` for each line of a UTF-8 text file, or of stdin when ``path`` is None,
    without its line break; ``where`` names the file and line ("stdin, line 3") for messages.

    The bytes are decoded here, strictly: text that is not UTF-8 (a binary file, Latin-1) is an
    :class:`InvalidInputError` that names the file and the line, instead of a tokenizer's
    ``TypeError`` about surrogates. A directory or a missing file is reported the same way."""
    name = "stdin" if path is None else os.fspath(path)
    if path is not None:
        if os.path.isdir(path):
            raise InvalidInputError(f"{name} is a directory; give a text file, one example per line")
        if not os.path.exists(path):
            raise InvalidInputError(f"{name} does not exist")
    f = sys.stdin.buffer if path is None else open(path, "rb")
    try:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(
                    f"{name}, line {number}: not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                    "shmengine-run reads UTF-8 text (convert it with iconv)"
                ) from None
            yield f"{name}, line {number}", text.rstrip("\r\n")
    finally:
        if path is not None:
            f.close()
