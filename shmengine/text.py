"""Text <-> tokens for the launcher, with the tokenizer that ships beside the model.

The Python API takes tokens, as CTranslate2's does; ``shmengine-run`` reads and writes text, so it
tokenizes with the model's own ``tokenizer.json`` (through Hugging Face's ``tokenizers``, the
reference implementation of those files), or splits on spaces with ``--tokenize space``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TextCodec"]


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

    def tokenize(self, line: str) -> list[str]:
        """The tokens the model's tokenizer makes of ``line``, its special tokens included."""
        if self.tokenizer is None:
            return line.split()
        return self.tokenizer.encode(line).tokens

    def detokenize(self, tokens: list[str]) -> str:
        if self.tokenizer is None:
            return " ".join(tokens)
        ids = [self.tokenizer.token_to_id(t) for t in tokens]
        return self.tokenizer.decode([i for i in ids if i is not None], skip_special_tokens=True)
