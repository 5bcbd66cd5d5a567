"""Reference models for the parity tests, and a plain ONNX Runtime greedy loop over their exports.

The fixtures build each model once per cache directory (``models/reference.py``: a transformers
checkpoint, its Optimum ONNX export and its CTranslate2 conversion, all from the same weights)::

    SHMENGINE_REFERENCE_CACHE (tox: {toxworkdir}/reference-models) or a session tmp dir
        └── gpt2/ llama-gqa/ marian/  ──▶  Reference(.hf, .onnx, .ct2, .tokenizer, .model)

This directory needs torch, transformers, optimum-onnx and ctranslate2 (``tox -e parity``);
without them it is skipped whole, so the main test environment does not need them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

DEPENDENCIES = ("torch", "transformers", "optimum.exporters.onnx", "ctranslate2", "onnxruntime")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # models/ as a plain package when not installed

from models.reference import build_reference, special_tokens  # noqa: E402

__all__ = ["DEPENDENCIES", "PROMPTS", "Reference", "hf_greedy", "onnx_greedy", "prompt_tokens", "until_eos"]

# Word prompts of varied length (1 to 30 words); each kind's tokenizer adds its own specials.
# With 20 new tokens, each kind has outputs that end with eos early and outputs that run to the limit.
PROMPTS = [
    "w7",
    "w31 w25",
    "w3 w14 w15",
    "w9 w26 w2 w41 w40",
    "w45 w25 w30 w48 w36 w31 w27 w27",  # Marian: </s> first (an empty translation)
    "w49 w12 w33 w8 w27 w18 w44 w5 w30 w11 w22 w36 w17",
    "w16 w16 w16 w16 w42 w42 w42 w42 w1 w1 w1 w1 w20 w21 w22 w23 w24 w25 w26 w27 w28",
    " ".join(f"w{(7 * i + 3) % 50}" for i in range(30)),
]


class _ReferenceTestModule(pytest.Module):
    """A test module here is skipped, not failed, where a dependency is missing.

    The check runs when the module is collected, not when this conftest is imported: pytest
    cannot skip a conftest that was named on its command line (``pytest tests/parity``).
    """

    def collect(self):
        for name in DEPENDENCIES:
            pytest.importorskip(name, reason=f"the parity tests need {name} (run them with `tox -e parity`)")
        return super().collect()


def pytest_pycollect_makemodule(module_path, parent):
    return _ReferenceTestModule.from_parent(parent, path=module_path)


@dataclass
class Reference:
    """One reference model in its three forms, plus what a test needs to drive it."""

    kind: str
    root: Path
    hf: Path
    onnx: Path
    ct2: Path
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    model: object  # the transformers model, in eval mode
    special: dict = field(default_factory=dict)  # bos/eos/pad/unk/decoder_start ids (None if absent)

    @property
    def seq2seq(self) -> bool:
        return self.kind == "marian"

    @property
    def eos_id(self) -> int:
        return self.special["eos"]


def _cache_dir(tmp_path_factory) -> Path:
    configured = os.environ.get("SHMENGINE_REFERENCE_CACHE")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.getbasetemp() / "reference-models"


def _load(kind: str, cache: Path) -> Reference:
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{kind}.lock")):  # xdist workers or two tox runs share one cache
        root = build_reference(kind, cache)
    auto = AutoModelForSeq2SeqLM if kind == "marian" else AutoModelForCausalLM
    return Reference(
        kind=kind,
        root=root,
        hf=root / "hf",
        onnx=root / "onnx",
        ct2=root / "ct2",
        tokenizer=PreTrainedTokenizerFast.from_pretrained(root / "hf"),
        model=auto.from_pretrained(root / "hf").eval(),
        special=special_tokens(kind),
    )


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory) -> Path:
    return _cache_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def gpt2_reference(reference_cache) -> Reference:
    return _load("gpt2", reference_cache)


@pytest.fixture(scope="session")
def llama_reference(reference_cache) -> Reference:
    return _load("llama-gqa", reference_cache)


@pytest.fixture(scope="session")
def marian_reference(reference_cache) -> Reference:
    return _load("marian", reference_cache)


@pytest.fixture(scope="session", params=["gpt2", "llama", "marian"])
def reference(request) -> Reference:
    """Each reference kind in turn."""
    return request.getfixturevalue(f"{request.param}_reference")


def prompt_tokens(reference: Reference, text: str) -> list[str]:
    """The prompt as CTranslate2 takes it: token strings with the tokenizer's specials (Llama's
    leading ``<s>``, Marian's trailing ``</s>``)."""
    return reference.tokenizer.convert_ids_to_tokens(reference.tokenizer(text)["input_ids"])


def hf_greedy(reference: Reference, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy output per prompt (one at a time: no padding), generated ids only,
    ending with eos where it was generated."""
    import torch

    results = []
    for text in prompts:
        ids = torch.tensor([reference.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            out = reference.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
            )
        start = 1 if reference.seq2seq else ids.shape[1]  # seq2seq output starts with decoder_start
        results.append(until_eos(out[0, start:].tolist(), reference.eos_id))
    return results


def until_eos(ids: list[int], eos: int) -> list[int]:
    """``ids`` cut after the first eos (transformers pads what follows it)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past_key_values feeds, [batch, kv_heads, 0, head_dim], where kv_heads and
    head_dim are the static dims of the graph's inputs."""
    feeds = {}
    for meta in session.get_inputs():
        if meta.name.startswith("past_key_values."):
            _, heads, _, head_dim = meta.shape
            feeds[meta.name] = np.zeros((batch, heads, 0, head_dim), np.float32)
    return feeds


def _as_past(outputs: dict[str, np.ndarray], wanted: set[str]) -> dict[str, np.ndarray]:
    """present.* outputs renamed to the past_key_values.* inputs that the graph takes."""
    past = {}
    for name, value in outputs.items():
        if name.startswith("present."):
            past_name = "past_key_values." + name[len("present.") :]
            if past_name in wanted:
                past[past_name] = value
    return past


def onnx_greedy(
    reference: Reference, prompts: list[str], max_new_tokens: int, *, decoder: str = "merged"
) -> list[list[int]]:
    """Greedy decoding with plain ONNX Runtime over the Optimum export, the whole batch at once.

    Decoder-only (``model.onnx``): prompts left-padded, ``attention_mask`` over past + new,
    ``position_ids`` counted from each row's first real token, KV cache fed back from
    ``present.*``. Marian: ``encoder_model.onnx`` once, then ``decoder_model_merged.onnx``
    (``decoder="merged"``: ``use_cache_branch`` false on the first step with empty past, true
    after) or ``decoder_model.onnx`` then ``decoder_with_past_model.onnx`` (``"unmerged"``).
    Input and output names come from the sessions. Returns generated ids per prompt, ending with
    eos where it was generated.
    """
    encoded = [reference.tokenizer(text)["input_ids"] for text in prompts]
    if reference.seq2seq:
        return _onnx_greedy_seq2seq(reference, encoded, max_new_tokens, decoder)
    return _onnx_greedy_decoder(reference, encoded, max_new_tokens)


def _onnx_greedy_decoder(reference: Reference, encoded: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    session = _session(reference.onnx / "model.onnx")
    names = {meta.name for meta in session.get_inputs()}
    output_names = [meta.name for meta in session.get_outputs()]
    batch, width = len(encoded), max(map(len, encoded))
    pad = reference.eos_id  # any id: masked out
    input_ids = np.full((batch, width), pad, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = ids
        mask[row, width - len(ids) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    past = _empty_past(session, batch)

    generated: list[list[int]] = [[] for _ in encoded]
    done = np.zeros(batch, bool)
    for _ in range(max_new_tokens):
        feeds = {"input_ids": input_ids, "attention_mask": mask, **past}
        if "position_ids" in names:
            feeds["position_ids"] = positions
        outputs = dict(zip(output_names, session.run(output_names, feeds)))
        next_ids = outputs["logits"][:, -1, :].argmax(-1)
        for row in np.flatnonzero(~done):
            generated[row].append(int(next_ids[row]))
        done |= next_ids == reference.eos_id
        if done.all():
            break
        past = _as_past(outputs, names)
        input_ids = np.where(done, pad, next_ids)[:, None].astype(np.int64)
        positions = positions[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return generated


def _onnx_greedy_seq2seq(
    reference: Reference, encoded: list[list[int]], max_new_tokens: int, decoder: str
) -> list[list[int]]:
    if decoder not in ("merged", "unmerged"):
        raise ValueError(f"decoder must be 'merged' or 'unmerged', not {decoder!r}")
    pad = reference.special["pad"]
    batch, width = len(encoded), max(map(len, encoded))
    source = np.full((batch, width), pad, np.int64)
    source_mask = np.zeros((batch, width), np.int64)
    for row, ids in enumerate(encoded):
        source[row, : len(ids)] = ids
        source_mask[row, : len(ids)] = 1

    encoder = _session(reference.onnx / "encoder_model.onnx")
    (hidden,) = encoder.run(["last_hidden_state"], {"input_ids": source, "attention_mask": source_mask})

    if decoder == "merged":
        first = later = _session(reference.onnx / "decoder_model_merged.onnx")
    else:
        directory = reference.onnx
        if not (directory / "decoder_model.onnx").exists():
            directory = reference.root / "onnx-unmerged"  # see models/reference.py
        first = _session(directory / "decoder_model.onnx")
        later = _session(directory / "decoder_with_past_model.onnx")

    tokens = np.full((batch, 1), reference.special["decoder_start"], np.int64)
    generated: list[list[int]] = [[] for _ in encoded]
    done = np.zeros(batch, bool)
    past: dict[str, np.ndarray] = {}
    for step in range(max_new_tokens):
        session = first if step == 0 else later
        names = {meta.name for meta in session.get_inputs()}
        output_names = [meta.name for meta in session.get_outputs()]
        feeds = {"input_ids": tokens, "encoder_attention_mask": source_mask}
        if "encoder_hidden_states" in names:
            feeds["encoder_hidden_states"] = hidden
        if "use_cache_branch" in names:
            feeds["use_cache_branch"] = np.array([step > 0])
            if step == 0:
                # The no-cache branch ignores past_key_values, but the graph still takes them.
                past = _empty_past(session, batch)
        feeds.update({name: value for name, value in past.items() if name in names})
        outputs = dict(zip(output_names, session.run(output_names, feeds)))
        next_ids = outputs["logits"][:, -1, :].argmax(-1)
        for row in np.flatnonzero(~done):
            generated[row].append(int(next_ids[row]))
        done |= next_ids == reference.eos_id
        if done.all():
            break
        # Cross-attention key/values come out of the first step only: decoder_with_past_model.onnx
        # has no present.N.encoder.* outputs, and the merged decoder's cache branch returns empty
        # placeholders for them (shape [0, heads, 1, head_dim]), which must not replace the real ones.
        fresh = _as_past(outputs, set(_input_names(later)))
        past.update({name: value for name, value in fresh.items() if step == 0 or ".encoder." not in name})
        tokens = np.where(done, pad, next_ids)[:, None].astype(np.int64)
    return generated


def _input_names(session) -> list[str]:
    return [meta.name for meta in session.get_inputs()]
