"""Generation throughput and memory: CTranslate2 and shmengine side by side, in one run.

    python tools/bench_generate.py [--quick] [--models gpt2,marian] [--cache DIR]

Builds (once, cached) a random-init GPT-2-124M-shaped decoder and a Marian-base-shaped seq2seq
model with transformers, exports them with optimum-cli (shmengine's input) and converts them with
ct2-transformers-converter (CTranslate2's input): same weights on both sides. Needs the parity
environment's packages (torch==2.13.0, transformers, optimum-onnx, ctranslate2).

    python tools/bench_generate.py --models gpt2 --engines ct2,shm,ct2-int8,shm-int8 --inter 1,2

Each engine runs in a subprocess of its own, so its memory is its own, counted whole: each
process's PSS less its shared-memory part, plus every /dev/shm file and memfd (the weights
segment, prepacked model files, transport arenas) that the tree holds open or maps, once, at its
allocated size; only this run's processes are looked at, not other users' /dev/shm files. "MiB"
columns are measured after generating (model loaded, warm, 0.5 s after the last batch returned:
settled); the peak over the child's life,
sampled every 50 ms, is printed beside. Engines: CTranslate2 (``ct2``, ``ct2-int8``) and
shmengine by default, with ``prepack_weights=True`` (``-pp``: ORT's prepacked weights, made once
and shared by the workers), in float32 and ``compute_type="int8"`` (quantized once before the
measured children, read from the cache by each). Both engines get the same
``max_queued_batches`` (default -1, unlimited: every batch is submitted at once). Every example
is asked for exactly ``--new-tokens`` tokens (min_length = max_length); tokens/s counts the
tokens each engine actually decoded (best hypothesis of each example) and warns if that differs
from what was asked. Rows: model x compute type x inter_threads (1, 2; intra 1) x batch size
(1, 8, 32) x search (greedy, beam 4).

``--before DIR`` also runs the shmengine engines from another checkout (a ``git worktree`` of
an older commit), alternating with this one's in the same run: the ``before`` columns.

Beside each wall-clock ratio, ``cpu`` is the same ratio in tokens per CPU-second of the engine's
whole process tree (shmengine's workers included): on a machine other jobs load, it shows the
work each engine does, where wall-clock rates also measure what the others left free.
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

# name -> (engine, compute_type, prepack_weights; None: the engine's default)
ENGINES = {
    "ct2": ("ct2", "float32", False),
    "shm": ("shm", "float32", False),
    "shm-pp": ("shm", "float32", True),
    "ct2-int8": ("ct2", "int8", False),
    "shm-int8": ("shm", "int8", None),  # the engine's default for int8: prepacked, as shm-int8-pp
    "shm-int8-np": ("shm", "int8", False),  # int8 without ORT's prepacking (about half the speed)
    "shm-int8-pp": ("shm", "int8", True),
}
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


def _shared_objects(pid: int, seen: dict) -> None:
    """Every /dev/shm file and memfd that ``pid`` holds open or maps, by inode, at its allocated
    size (tmpfs pages cost RAM whether or not anyone maps them, and PSS splits or hides them)."""
    candidates = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            candidates.append(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and (parts[5].startswith("/dev/shm/") or parts[5].startswith("/memfd:")):
                    candidates.append(f"/proc/{pid}/map_files/{parts[0]}")
    except OSError:
        pass
    for link in candidates:
        try:
            target = os.readlink(link)
            if not (target.startswith("/dev/shm/") or target.startswith("/memfd:")):
                continue
            st = os.stat(link)
        except OSError:
            continue
        seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512 // 1024


def tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) used so far by ``pid`` (default: this process), its threads and
    its live descendants (shmengine's fork server and workers). On a machine other jobs load,
    tokens per CPU-second compare engines' work where wall-clock rates mostly compare luck."""
    pid = pid or os.getpid()
    ticks = 0
    for p in (pid, *_descendants(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def _memory_kib(pids: list[int]) -> int:
    """The whole tree's memory: each process's PSS less its shared-memory part, plus every
    /dev/shm file and memfd the tree holds (open or mapped), once, at its allocated size.

    Only this run's processes are looked at, so other users' /dev/shm files are not counted."""
    total = 0
    shared: dict = {}
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split()[0].rstrip(":"): int(line.split()[1]) for line in f if line.startswith("Pss")}
            total += fields.get("Pss", 0) - fields.get("Pss_Shmem", 0)
        except (OSError, ValueError):
            continue
        _shared_objects(p, shared)
    return total + sum(shared.values())


def peak_memory_mib(proc: subprocess.Popen, stop: threading.Event, box: dict) -> None:
    peak = 0
    while not stop.is_set() and proc.poll() is None:
        peak = max(peak, _memory_kib([proc.pid, *_descendants(proc.pid)]))
        time.sleep(0.05)
    box["peak_mib"] = peak / 1024


# -- the measuring child ------------------------------------------------------------------------


def _count_tokens(results, kind: str) -> int:
    """Tokens actually decoded (best hypothesis of each example), not what was asked for."""
    if kind == "gpt2":
        return sum(len(r.sequences_ids[0]) for r in results)
    return sum(len(r.hypotheses[0]) for r in results)


def _engine(name: str) -> tuple[str, str, bool | None]:
    return ENGINES[name.removesuffix("@before")]


def child(args) -> None:
    """Runs inside the subprocess: one engine, one model, one inter_threads; prints JSON rows,
    then waits for a line on stdin so that the parent can measure the tree after generating."""
    import numpy as np

    kind, engine, inter = args.kind, args.engine, args.inter
    side, compute_type, prepack = _engine(engine)
    model_dir = Path(args.model_dir)
    rng = np.random.default_rng(0)
    vocab = SHAPES[kind]["vocab"]
    new = args.new_tokens
    if side == "ct2":
        import ctranslate2

        cls = ctranslate2.Generator if kind == "gpt2" else ctranslate2.Translator
        model = cls(str(model_dir / "ct2"), device="cpu", inter_threads=inter, intra_threads=1,
                    compute_type=compute_type, max_queued_batches=args.max_queued_batches)
    else:
        sys.path.insert(0, args.tree or str(ROOT))
        import shmengine

        cls = shmengine.Generator if kind == "gpt2" else shmengine.Translator
        model = cls(model_dir / "onnx", device="cpu", inter_threads=inter, intra_threads=1,
                    max_queued_batches=args.max_queued_batches, prepack_weights=prepack, compute_type=compute_type)
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
            start, cpu = time.perf_counter(), tree_cpu_seconds()
            results = run(prompts)
            elapsed, cpu = time.perf_counter() - start, tree_cpu_seconds() - cpu
            decoded = _count_tokens(results, kind)
            rows.append({"batch": batch, "beam": beam, "tokens": decoded, "asked": examples * new,
                         "tokens_per_s": decoded / elapsed, "tokens_per_cpu_s": decoded / max(cpu, 1e-3)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps(rows), flush=True)
    sys.stdin.readline()  # the parent measures memory now, with the model loaded and warm


def run_child(kind: str, engine: str, inter: int, model_dir: Path, opts) -> tuple[list[dict], float, float] | None:
    """(rows, peak MiB over the child's life, MiB after generating) of one engine; None if it failed."""
    cmd = [sys.executable, __file__, "--child", "--kind", kind, "--engine", engine, "--inter", str(inter),
           "--model-dir", str(model_dir), "--new-tokens", str(opts.new_tokens), "--prompt-length", str(opts.prompt_length),
           "--batches-per-row", str(opts.batches_per_row), "--batch-sizes", ",".join(map(str, opts.batches)),
           "--max-queued-batches", str(opts.max_queued_batches)]
    if engine.endswith("@before"):
        cmd += ["--tree", str(opts.before)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    stop, box = threading.Event(), {}
    sampler = threading.Thread(target=peak_memory_mib, args=(proc, stop, box))
    sampler.start()
    line = proc.stdout.readline()
    after = 0.0
    if line:
        # Settled, not in the middle of the last batch's clean-up: an engine frees the batch's
        # KV cache as it returns (shmengine's worker trims its heap just after replying), and a
        # sample taken at once caught that half the time (seen: the same tree 413 and 826 MiB).
        time.sleep(0.5)
        samples = []
        for _ in range(5):
            samples.append(_memory_kib([proc.pid, *_descendants(proc.pid)]) / 1024)
            time.sleep(0.1)
        after = max(samples)
        proc.stdin.write("\n")
        proc.stdin.flush()
    proc.wait()
    stop.set()
    sampler.join()
    if proc.returncode != 0 or not line:
        print(f"{engine} {kind} inter={inter} failed (exit {proc.returncode}); its cells stay empty", file=sys.stderr)
        return None
    rows = json.loads(line)
    print(json.dumps({"engine": engine, "kind": kind, "inter": inter, "peak_mib": box.get("peak_mib", 0.0),
                      "after_mib": after}), file=sys.stderr, flush=True)
    for r in rows:
        if r["tokens"] != r["asked"]:
            print(f"warning: {engine} {kind} inter={inter} batch={r['batch']} beam={r['beam']} decoded {r['tokens']} "
                  f"tokens, not the {r['asked']} asked for; tokens/s counts what was decoded", file=sys.stderr)
    return rows, box.get("peak_mib", 0.0), after


def _prepare_int8(model_dir: Path, kind: str, tree: Path = ROOT) -> None:
    """Quantize once before any measured child, so no child's peak holds the quantization (the
    cache beside the model makes every later start read the int8 file). In a subprocess: each
    tree quantizes with its own code."""
    code = (f"import sys; sys.path.insert(0, {str(tree)!r}); import shmengine\n"
            f"cls = shmengine.{'Generator' if kind == 'gpt2' else 'Translator'}\n"
            f"with cls({str(model_dir / 'onnx')!r}, compute_type='int8', inter_threads=1, intra_threads=1) as m:\n"
            "    assert m.compute_type == 'int8_float32', m.compute_type\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, fewer tokens (a smoke run)")
    parser.add_argument("--models", default="gpt2,marian")
    parser.add_argument("--engines", default="ct2,shm,shm-pp,ct2-int8,shm-int8", help=f"any of {', '.join(ENGINES)}")
    parser.add_argument("--before", type=Path, help="another checkout whose shmengine engines run too (the 'before' columns)")
    parser.add_argument("--inter", default="1,2", help="inter_threads values")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "shmengine-bench-models"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--batches-per-row", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--max-queued-batches", type=int, default=-1,
                        help="passed to both engines (same meaning in both: -1 unlimited, 0 automatic, N)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every engine this many times, alternating, and keep each row's best tokens/s "
                             "(on a machine others load, the engines then see the same load; memory: the largest)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    opts.batches = [int(b) for b in opts.batch_sizes.split(",")]
    if opts.child:
        opts.inter = int(opts.inter)
        child(opts)
        return 0
    if opts.quick:
        opts.batches, opts.new_tokens, opts.batches_per_row = [1, 8], 16, 2
    engines = opts.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine {unknown[0]!r}; choose from {', '.join(ENGINES)}")
    if opts.before:
        engines += [f"{e}@before" for e in engines if ENGINES[e][0] == "shm"]
    inters = [int(i) for i in opts.inter.split(",")]
    table = []
    for kind in opts.models.split(","):
        print(f"building/reusing {kind} in {opts.cache} ...", file=sys.stderr, flush=True)
        model_dir = build(kind, Path(opts.cache))
        if any(_engine(e)[0] == "shm" and _engine(e)[1] == "int8" for e in engines):
            _prepare_int8(model_dir, kind)
            if opts.before:
                _prepare_int8(model_dir, kind, opts.before)
        results = {}
        for round_ in range(opts.rounds):
            for inter in inters:
                for engine in engines:
                    print(f"{kind}: {engine} inter_threads={inter} (round {round_ + 1})", file=sys.stderr, flush=True)
                    measured = run_child(kind, engine, inter, model_dir, opts)
                    if measured is None:
                        continue
                    rows, peak, after = measured
                    if (engine, inter) in results:  # best of the rounds: other load on the machine only slows
                        best = results[engine, inter][0]
                        rows = [dict(r if r["tokens_per_s"] >= b["tokens_per_s"] else b,
                                     tokens_per_cpu_s=max(r["tokens_per_cpu_s"], b["tokens_per_cpu_s"]))
                                for r, b in zip(rows, best)]
                        peak, after = max(peak, results[engine, inter][1]), max(after, results[engine, inter][2])
                    results[engine, inter] = (rows, peak, after)
        for compute in ("float32", "int8"):
            ct2 = f"ct2{'-int8' if compute == 'int8' else ''}"
            shm, pp = ("shm-int8", "shm-int8-pp") if compute == "int8" else ("shm", "shm-pp")
            pre = shm + "@before"
            if not any((e, inters[0]) in results for e in (ct2, shm, pp)):
                continue
            for inter in inters:
                rows = {e: results[e, inter][0] for e in (ct2, shm, pp, pre) if (e, inter) in results}
                if not rows:
                    continue
                some = next(iter(rows.values()))
                for i, r in enumerate(some):
                    rate = {e: rows[e][i]["tokens_per_s"] for e in rows}
                    cpu_rate = {e: rows[e][i]["tokens_per_cpu_s"] for e in rows}
                    mem = {e: results[e, inter][2] for e in rows}
                    peak = {e: results[e, inter][1] for e in rows}
                    table.append((kind, compute, inter, r["batch"], "greedy" if r["beam"] == 1 else f"beam {r['beam']}",
                                  rate, mem, peak, ct2, shm, pp, pre, cpu_rate))
    before = " before bef/ct2 bef MiB cpu/bef" if opts.before else ""
    header = (f"{'model':<7}{'type':<8}{'inter':>6}{'batch':>6}  {'search':<8}{'ct2 tok/s':>10}{'shm':>8}{'shm/ct2':>8}{'cpu':>7}"
              f"{'shm-pp':>8}{'pp/ct2':>8}{'ct2 MiB':>9}{'shm MiB':>9}{'pp MiB':>8}{'peak ct2/shm/pp':>17}{before}")
    print(header)
    print("-" * len(header))

    def cell(d, key, fmt):
        return format(d[key], fmt) if key in d else "-"

    def ratio(rate, e, base):
        return f"{rate[e] / rate[base]:.2f}x" if base in rate and e in rate else "-"

    for kind, compute, inter, batch, search, rate, mem, peak, ct2, shm, pp, pre, cpu_rate in table:
        peaks = "/".join(cell(peak, e, ".0f") for e in (ct2, shm, pp))
        print(f"{kind:<7}{compute:<8}{inter:>6}{batch:>6}  {search:<8}{cell(rate, ct2, '.1f'):>10}{cell(rate, shm, '.1f'):>8}"
              f"{ratio(rate, shm, ct2):>8}{ratio(cpu_rate, shm, ct2):>7}{cell(rate, pp, '.1f'):>8}{ratio(rate, pp, ct2):>8}{cell(mem, ct2, '.0f'):>9}{cell(mem, shm, '.0f'):>9}"
              f"{cell(mem, pp, '.0f'):>8}{peaks:>17}"
              + (f"{cell(rate, pre, '.1f'):>7}{ratio(rate, pre, ct2):>8}{cell(mem, pre, '.0f'):>8}" if opts.before else "")
              + (f"{ratio(cpu_rate, shm, pre):>9}" if opts.before else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
