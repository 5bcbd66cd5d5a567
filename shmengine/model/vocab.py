"""Token strings <-> ids, from the tokenizer files an exported model directory already has.

CTranslate2's API takes tokens as strings (``["▁Hello", "▁world"]``); models take ids. The
vocabulary is read from ``tokenizer.json`` (any Hugging Face fast tokenizer: WordLevel, BPE,
WordPiece, Unigram, plus its added tokens) or from ``vocab.json``. Tokenizing text into those
strings stays the caller's job, as with CTranslate2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from shmengine.errors import InvalidInputError, ModelLoadError

__all__ = ["Vocabulary"]


class Vocabulary:
    """A bidirectional token <-> id map with an optional unknown token."""

    def __init__(self, tokens: dict[str, int], unk_token: str | None = None, source: str = ""):
        self.token_to_id = tokens
        size = max(tokens.values()) + 1 if tokens else 0
        self.id_to_token = [""] * size
        for token, index in tokens.items():
            self.id_to_token[index] = token
        self.unk_id = tokens.get(unk_token) if unk_token else None
        self.unk_token = unk_token if self.unk_id is not None else None
        self.source = source

    def __len__(self) -> int:
        return len(self.id_to_token)

    @classmethod
    def from_directory(cls, directory: Path) -> "Vocabulary":
        tokenizer = directory / "tokenizer.json"
        if tokenizer.is_file():
            return cls._from_tokenizer_json(tokenizer)
        vocab = directory / "vocab.json"
        if vocab.is_file():
            with open(vocab, encoding="utf-8") as f:
                tokens = json.load(f)
            unk = next((t for t in ("<unk>", "[UNK]", "<|endoftext|>") if t in tokens), None)
            return cls(tokens, unk, str(vocab))
        raise ModelLoadError(
            f"model directory {str(directory)!r} has no vocabulary: expected tokenizer.json or vocab.json "
            "(save the tokenizer beside the model with tokenizer.save_pretrained)"
        )

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> "Vocabulary":
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            tokens = dict(vocab)
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            tokens = {piece[0]: i for i, piece in enumerate(vocab)}
        else:
            raise ModelLoadError(f"{str(path)!r} has no vocabulary in its model section")
        for added in spec.get("added_tokens") or []:
            tokens.setdefault(added["content"], added["id"])
        unk = model.get("unk_token")
        if unk is None and isinstance(model.get("unk_id"), int) and isinstance(vocab, list):
            unk = vocab[model["unk_id"]][0]
        return cls(tokens, unk, str(path))

    def to_ids(self, tokens: Sequence, where: str = "input") -> list[int]:
        """Map tokens (strings, or ids already) to ids; unknown strings become the unk id.

        A string where the list belongs is refused (``TokenTypeError``, a ``TypeError`` as in
        CTranslate2) rather than read character by character as tokens."""
        if isinstance(tokens, (str, bytes)):
            from shmengine.errors import TokenTypeError

            raise TokenTypeError(f"{where} is a string; pass a list of tokens (split it with the model's tokenizer)")
        ids = []
        for token in tokens:
            if isinstance(token, (int,)) and not isinstance(token, bool):
                if not 0 <= token < len(self.id_to_token):
                    raise InvalidInputError(f"{where}: token id {token} is outside the vocabulary (size {len(self)})")
                ids.append(token)
                continue
            index = self.token_to_id.get(token)
            if index is None:
                if self.unk_id is None:
                    raise InvalidInputError(
                        f"{where}: unknown token {token!r}, and the vocabulary ({self.source}) has no unknown "
                        "token to map it to; tokenize the text with the model's own tokenizer"
                    )
                index = self.unk_id
            ids.append(index)
        return ids

    def to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.id_to_token[i] for i in ids]

    def id_of(self, token: str | int | None) -> int | None:
        if token is None or isinstance(token, int):
            return token
        return self.token_to_id.get(token)
