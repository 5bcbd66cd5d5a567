"""Reference models for the parity tests: tiny random-init transformers models, made offline.

Each kind is one checkpoint written three ways from the same weights::

    build_reference(kind, out_dir) -> out_dir/<kind>/
        hf/            transformers checkpoint + tokenizer.json (WordLevel, Whitespace pre-tokenizer)
        onnx/          optimum-cli export onnx --task text-generation-with-past (decoders: model.onnx)
                       or text2text-generation-with-past (Marian: encoder_model.onnx,
                       decoder_model.onnx, decoder_with_past_model.onnx, decoder_model_merged.onnx),
                       with config.json, generation_config.json and the tokenizer files
        onnx-unmerged/ only if an exporter ever leaves the unmerged Marian pair out of onnx/: the
                       same export with --no-post-process
        ct2/           ct2-transformers-converter --model hf
        build.log      what the exporters printed
        DONE           written last: a directory with it is reused as it is

Kinds: ``gpt2``, ``llama-gqa`` (4 query heads over 2 key/value heads), ``marian``.

At the usual init (std 0.02) these models barely look at their input, so a parity test over them
would pass whatever the engine did with positions, padding or the KV cache; and their logits are
so flat that near-ties are common. The weights here are drawn wider (seeded: every build is the
same), see ``_model``; ``tests/parity/test_references.py`` checks that outputs depend on the
prompt, that some end with eos early and some run to the length limit.

Nothing is downloaded: the configs, tokenizers and weights are made here; the exporters run as
subprocesses of this interpreter (``python -c`` on their entry points, so no PATH lookup).

Run ``python -m models.reference OUT_DIR [KIND ...]`` to build them by hand.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["KINDS", "build_reference", "special_tokens", "vocabulary", "WORDS"]

KINDS = ("gpt2", "llama-gqa", "marian")

SEED = 1234
WORDS = [f"w{i}" for i in range(50)]
# ONNX Runtime 1.31 reads IR versions up to 13; onnx 1.23 writes 14 unless told otherwise.
MAX_IR_VERSION = 13
UNMERGED = ("decoder_model.onnx", "decoder_with_past_model.onnx")
LOGIT_SCALE = 2.0

# Specials per kind, in id order around the words. Marian's <pad> must be the last id:
# CTranslate2's converter drops the last token when it is <pad> (the decoder starts from a zero
# embedding instead of a pad token), and transformers' Marian starts the decoder from <pad>.
_LAYOUT = {
    "gpt2": {"before": ["<unk>", "<|endoftext|>"], "after": []},
    "llama-gqa": {"before": ["<unk>", "<s>", "</s>"], "after": []},
    "marian": {"before": ["</s>", "<unk>"], "after": ["<pad>"]},
}


def vocabulary(kind: str) -> list[str]:
    """The kind's tokens in id order."""
    layout = _LAYOUT[_check_kind(kind)]
    return layout["before"] + WORDS + layout["after"]


def special_tokens(kind: str) -> dict[str, int | None]:
    """bos/eos/pad/unk/decoder_start ids (None where the kind has no such token)."""
    ids = {t: i for i, t in enumerate(vocabulary(kind))}
    if kind == "gpt2":
        eot = ids["<|endoftext|>"]
        return {"bos": eot, "eos": eot, "pad": None, "unk": ids["<unk>"], "decoder_start": None}
    if kind == "llama-gqa":
        return {"bos": ids["<s>"], "eos": ids["</s>"], "pad": None, "unk": ids["<unk>"], "decoder_start": None}
    pad = ids["<pad>"]
    return {"bos": None, "eos": ids["</s>"], "pad": pad, "unk": ids["<unk>"], "decoder_start": pad}


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown reference kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def _tokenizer(kind: str):
    """A WordLevel tokenizer over :func:`vocabulary`, wrapped as a PreTrainedTokenizerFast.

    Llama's adds ``<s>`` in front (as Llama tokenizers do); Marian's appends ``</s>`` to every
    source (as MarianTokenizer does); GPT-2's adds nothing.
    """
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary(kind))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    specials = {"unk_token": "<unk>"}
    if kind == "gpt2":
        specials.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    elif kind == "llama-gqa":
        specials.update(bos_token="<s>", eos_token="</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    else:
        specials.update(eos_token="</s>", pad_token="<pad>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    tok.add_special_tokens(sorted(set(specials.values()), key=vocab.__getitem__))
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **specials)


def _model(kind: str):
    """The transformers model, seeded, with weights drawn so that outputs depend on the input.

    At the usual init (std 0.02) these tiny models ignore their input: Marian's sinusoidal
    positions drown the token embeddings, and a tied output projection makes every model repeat
    its last token (a token's own embedding scores highest against itself). So: std 0.1-0.2,
    untied ``lm_head``, Marian's embeddings drawn wider, and the final norm scaled by
    ``LOGIT_SCALE`` so that the next-token distribution is peaked (beam search then has clear
    winners and hypotheses end at different steps). GPT-2's end-of-text row is doubled so that
    some greedy outputs end before 20 tokens and some do not.
    """
    import torch
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MarianConfig,
        MarianMTModel,
    )

    ids = special_tokens(kind)
    vocab_size = len(vocabulary(kind))
    torch.manual_seed(SEED)
    if kind == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            initializer_range=0.2,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            tie_word_embeddings=False,
        )
        model = GPT2LMHeadModel(config)
        with torch.no_grad():
            model.transformer.ln_f.weight *= LOGIT_SCALE
            model.transformer.ln_f.bias *= LOGIT_SCALE
            model.lm_head.weight[ids["eos"]] *= 2
    elif kind == "llama-gqa":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            initializer_range=0.2,
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=None,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.model.norm.weight *= LOGIT_SCALE
    else:
        config = MarianConfig(
            vocab_size=vocab_size,
            decoder_vocab_size=vocab_size,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_position_embeddings=128,
            activation_function="swish",
            init_std=0.1,
            pad_token_id=ids["pad"],
            eos_token_id=ids["eos"],
            decoder_start_token_id=ids["decoder_start"],
            forced_eos_token_id=None,  # MarianConfig's default (0) would force </s> at max_length
            share_encoder_decoder_embeddings=True,
            scale_embedding=True,
            tie_word_embeddings=False,
        )
        model = MarianMTModel(config)
        with torch.no_grad():
            shared = model.model.shared.weight
            shared.normal_(0.0, 0.3)
            # The decoder starts from <pad>, whose embedding stays zero (CTranslate2: "start from
            # a zero embedding").
            shared[ids["pad"]] = 0.0
            last = model.model.decoder.layers[-1].final_layer_norm  # post-norm: feeds lm_head
            last.weight *= LOGIT_SCALE
            last.bias *= LOGIT_SCALE
            # CTranslate2 drops <pad> from the vocabulary, so transformers and ONNX must never
            # pick it either (real Marian checkpoints do this with bad_words_ids instead).
            model.final_logits_bias[0, ids["pad"]] = -1e4
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"] if ids["pad"] is not None else ids["eos"],
        decoder_start_token_id=ids["decoder_start"],
    )
    return model.eval()


def _run(args: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{' '.join(args[3:])} failed with exit code {proc.returncode}:\n{tail}")


def _optimum(hf: Path, out: Path, task: str, log: Path, *extra: str) -> None:
    _run(
        [sys.executable, "-c", "from optimum.commands.optimum_cli import main; main()",
         "export", "onnx", "--model", str(hf), "--task", task, *extra, str(out)],
        log,
    )  # fmt: skip
    _cap_ir_version(out)


def _ct2(hf: Path, out: Path, log: Path) -> None:
    _run(
        [sys.executable, "-c", "from ctranslate2.converters.transformers import main; main()",
         "--model", str(hf), "--output_dir", str(out), "--force"],
        log,
    )  # fmt: skip


def _cap_ir_version(directory: Path) -> None:
    """Rewrite any exported graph whose IR version ONNX Runtime 1.31 cannot read."""
    import onnx

    for path in sorted(directory.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        if model.ir_version > MAX_IR_VERSION:
            model.ir_version = MAX_IR_VERSION
            onnx.save(model, str(path))


def build_reference(kind: str, out_dir: str | Path) -> Path:
    """Build (or reuse) the reference model ``kind`` under ``out_dir/kind`` and return that path."""
    root = Path(out_dir) / _check_kind(kind)
    if (root / "DONE").exists():
        return root
    if root.exists():
        shutil.rmtree(root)  # a build that did not finish
    root.mkdir(parents=True)
    log = root / "build.log"

    hf = root / "hf"
    model = _model(kind)
    model.save_pretrained(hf)
    _tokenizer(kind).save_pretrained(hf)
    del model

    if kind == "marian":
        _optimum(hf, root / "onnx", "text2text-generation-with-past", log)
        # optimum-onnx 0.1.0 keeps decoder_model.onnx and decoder_with_past_model.onnx beside the
        # merged decoder; an exporter that replaces them gets a second, unmerged export.
        if not all((root / "onnx" / f).exists() for f in UNMERGED):
            _optimum(hf, root / "onnx-unmerged", "text2text-generation-with-past", log, "--no-post-process")
    else:
        _optimum(hf, root / "onnx", "text-generation-with-past", log)
    _ct2(hf, root / "ct2", log)

    (root / "DONE").write_text("ok\n")
    return root


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(f"usage: python -m models.reference OUT_DIR [{' '.join(KINDS)}]", file=sys.stderr)
        return 2
    for kind in argv[1:] or KINDS:
        print(build_reference(kind, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
