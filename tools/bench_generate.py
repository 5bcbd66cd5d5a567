"""Generation throughput and memory: CTranslate2 and shmengine side by side, in one run.

    python tools/bench_generate.py [--quick] [--models gpt2,marian] [--cache DIR]

Builds (once, cached) a random-init GPT-2-124M-shaped decoder and a Marian-base-shaped seq2seq
model with transformers, exports them with optimum-cli (shmengine's input) and converts them with
ct2-transformers-converter (CTranslate2's input): same weights on both sides. Needs the parity
environment's packages (torch==2.13.0, transformers, optimum-onnx, ctranslate2).

Each engine runs in a subprocess of its own, so its peak memory is its own: private PSS of the
process and its children plus every byte of shmengine's /dev/shm files, sampled every 50 ms.
shmengine runs twice: by default, and with ``prepack_weights=True`` (ORT's prepacked weights,
made once and shared by the workers). Every example decodes exactly
``--new-tokens`` tokens (min_length = max_length), so both engines do the same work. Rows:
model x inter_threads (1, 2; intra 1) x batch size (1, 8, 32) x search (greedy, beam 4);
tokens/s counts generated tokens over wall time with every batch submitted at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENGINES = ("ct2", "shm", "shm-prepacked")
SHAPES = {
    "gpt2": dict(vocab=50257, layers=12, hidden=768, heads=12, positions=1024),
    "marian": dict(vocab=58101, layers=6, hidden=512, heads=8, ffn=2048, positions=512),
}


def build(kind: str, cache: Path) -> Path:
    """hf/, onnx/ and ct2/ of a random-init model of ``kind`` under cache/kind (reused if DONE)."""
    out = cache / kind
    if (out / "DONE").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel, PreTrainedTokenizerFast

    s = SHAPES[kind]
    torch.manual_seed(0)
    if kind == "gpt2":
        vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, s["vocab"])}}
        config = GPT2Config(vocab_size=s["vocab"], n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                            n_positions=s["positions"], bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
        specials = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        task = "text-generation-with-past"
    else:
        vocab = {"</s>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, s["vocab"] - 1)}, "<pad>": s["vocab"] - 1}
        config = MarianConfig(vocab_size=s["vocab"], d_model=s["hidden"], encoder_layers=s["layers"], decoder_layers=s["layers"],
                              encoder_attention_heads=s["heads"], decoder_attention_heads=s["heads"], encoder_ffn_dim=s["ffn"],
                              decoder_ffn_dim=s["ffn"], max_position_embeddings=s["positions"], pad_token_id=s["vocab"] - 1,
                              eos_token_id=0, decoder_start_token_id=s["vocab"] - 1)
        model = MarianMTModel(config)
        specials = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        task = "text2text-generation-with-past"
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model.save_pretrained(out / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials).save_pretrained(out / "hf")
    subprocess.run(["optimum-cli", "export", "onnx", "--model", str(out / "hf"), "--task", task, str(out / "onnx")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["ct2-transformers-converter", "--model", str(out / "hf"), "--output_dir", str(out / "ct2"), "--force"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (out / "DONE").write_text("ok")
    return out


def _descendants(pid: int) -> list[int]:
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent_of[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent_of.items() if pp in frontier]
        found += frontier
    return found


def _memory_kib(pids: list[int]) -> int:
    """Private PSS of the processes plus every byte of shmengine's /dev/shm files.

    Shared pages are counted once, whether or not a process has touched them: a segment page no
    worker has read yet still costs memory, and PSS alone would not show it."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split()[0].rstrip(":"): int(line.split()[1]) for line in f if line.startswith("Pss")}
            total += fields.get("Pss", 0) - fields.get("Pss_Shmem", 0)
        except (OSError, ValueError):
            pass
    for name in os.listdir("/dev/shm"):
        if name.startswith("shmengine-"):
            try:
                total += os.stat(os.path.join("/dev/shm", name)).st_blocks * 512 // 1024
            except OSError:
                pass
    return total


def peak_memory_mib(proc: subprocess.Popen, stop: threading.Event, box: dict) -> None:
    peak = 0
    while not stop.is_set() and proc.poll() is None:
        peak = max(peak, _memory_kib([proc.pid, *_descendants(proc.pid)]))
        time.sleep(0.05)
    box["peak_mib"] = peak / 1024


# -- the measuring child ------------------------------------------------------------------------


def child(args) -> None:
    """Runs inside the subprocess: one engine, one model, one inter_threads; prints JSON rows."""
    import numpy as np

    kind, engine, inter = args.kind, args.engine, args.inter
    model_dir = Path(args.model_dir)
    rng = np.random.default_rng(0)
    vocab = SHAPES[kind]["vocab"]
    new = args.new_tokens
    if engine == "ct2":
        import ctranslate2

        cls = ctranslate2.Generator if kind == "gpt2" else ctranslate2.Translator
        model = cls(str(model_dir / "ct2"), device="cpu", inter_threads=inter, intra_threads=1)
    else:
        sys.path.insert(0, str(ROOT))
        import shmengine

        cls = shmengine.Generator if kind == "gpt2" else shmengine.Translator
        model = cls(model_dir / "onnx", device="cpu", inter_threads=inter, intra_threads=1, max_queued_batches=-1,
                    prepack_weights=engine == "shm-prepacked")
    rows = []
    for batch in args.batches:
        for beam in (1, 4):
            examples = batch * args.batches_per_row
            prompts = [[f"t{int(t)}" for t in rng.integers(2, vocab - 2, size=args.prompt_length)] for _ in range(examples)]
            if kind == "gpt2":
                prompts = [["<|endoftext|>"] + p for p in prompts]
                run = lambda p, b=beam, bs=batch: model.generate_batch(  # noqa: E731
                    p, max_batch_size=bs, beam_size=b, max_length=new, min_length=new, include_prompt_in_result=False)
            else:
                run = lambda p, b=beam, bs=batch: model.translate_batch(  # noqa: E731
                    p, max_batch_size=bs, beam_size=b, max_decoding_length=new, min_decoding_length=new)
            run(prompts[: min(len(prompts), batch)])  # warm-up
            start = time.perf_counter()
            run(prompts)
            elapsed = time.perf_counter() - start
            rows.append({"batch": batch, "beam": beam, "tokens_per_s": examples * new / elapsed})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows), flush=True)


def run_child(kind: str, engine: str, inter: int, model_dir: Path, opts) -> tuple[list[dict], float]:
    cmd = [sys.executable, __file__, "--child", "--kind", kind, "--engine", engine, "--inter", str(inter),
           "--model-dir", str(model_dir), "--new-tokens", str(opts.new_tokens), "--prompt-length", str(opts.prompt_length),
           "--batches-per-row", str(opts.batches_per_row), "--batch-sizes", ",".join(map(str, opts.batches))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    stop, box = threading.Event(), {}
    sampler = threading.Thread(target=peak_memory_mib, args=(proc, stop, box))
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{engine} {kind} inter={inter} failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), box.get("peak_mib", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, fewer tokens (a smoke run)")
    parser.add_argument("--models", default="gpt2,marian")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "shmengine-bench-models"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--batches-per-row", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--inter", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.batches = [int(b) for b in opts.batch_sizes.split(",")]
    if opts.child:
        child(opts)
        return 0
    if opts.quick:
        opts.batches, opts.new_tokens, opts.batches_per_row = [1, 8], 16, 2
    table = []
    for kind in opts.models.split(","):
        print(f"building/reusing {kind} in {opts.cache} ...", file=sys.stderr, flush=True)
        model_dir = build(kind, Path(opts.cache))
        results = {}
        for inter in (1, 2):
            for engine in ENGINES:
                print(f"{kind}: {engine} inter_threads={inter}", file=sys.stderr, flush=True)
                results[engine, inter] = run_child(kind, engine, inter, model_dir, opts)
        for inter in (1, 2):
            rows = {engine: results[engine, inter][0] for engine in ENGINES}
            memory = {engine: results[engine, inter][1] for engine in ENGINES}
            for i, c in enumerate(rows["ct2"]):
                s, p = rows["shm"][i], rows["shm-prepacked"][i]
                one = results["shm-prepacked", 1][0][i]["tokens_per_s"]
                table.append((kind, inter, c["batch"], "greedy" if c["beam"] == 1 else f"beam {c['beam']}",
                              c["tokens_per_s"], s["tokens_per_s"], p["tokens_per_s"], p["tokens_per_s"] / one,
                              memory["ct2"], memory["shm"], memory["shm-prepacked"]))
    header = (f"{'model':<7}{'inter':>6}{'batch':>6}  {'search':<8}{'ct2 tok/s':>10}{'shm':>9}{'shm/ct2':>9}"
              f"{'shm-pp':>9}{'pp/ct2':>8}{'pp 2/1':>8}{'ct2 MiB':>9}{'shm MiB':>9}{'pp MiB':>8}")
    print(header)
    print("-" * len(header))
    for kind, inter, batch, search, c, s, p, scale, cm, sm, pm in table:
        print(f"{kind:<7}{inter:>6}{batch:>6}  {search:<8}{c:>10.1f}{s:>9.1f}{s / c:>8.2f}x{p:>9.1f}{p / c:>7.2f}x"
              f"{(f'{scale:.2f}x' if inter == 2 else ''):>8}{cm:>9.0f}{sm:>9.0f}{pm:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
