#!/usr/bin/env python
"""Tensor and data parallelism under mpirun against one plain process, side by side, in one run.

Four rows, each printed with its ratio to the baseline measured in the same run:

a. **TP batch-1 latency**: ``Generator(path, tensor_parallel=True, intra_threads=I)`` on N ranks
   (``mpirun -np N``), median seconds per greedy generation of ``--new-tokens`` tokens from a
   ``--prompt``-token prompt, against one process with ``intra_threads=I`` and with
   ``intra_threads=N*I`` (the same cores). Target: <= 0.7x one process with intra 1 at N = 2.
   (``--oversubscribe`` is left out where the ranks fit the cores: see :func:`mpirun`.)
b. **TP batch-8 throughput**: tokens/s of batches of 8, same settings.
c. **data parallel**: ``mpirun -np N shmengine-run generate --input F`` (one worker per rank)
   against ``shmengine-run generate --inter-threads N`` on the same file: lines/s. Target >= 0.9x.

Every example generates exactly ``--new-tokens`` tokens (min_length = max_length), so the
token counts are equal. Usage::

    python tools/bench_tp.py --model /path/to/optimum-gpt2-export [--ranks 2] [--intra 1,2]

Without ``--model`` the bundled numbers-gpt2 runs (tiny: it measures overheads, not compute).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mpirun(ranks: int, threads_per_rank: int = 1) -> list[str]:
    """mpirun for ``ranks`` ranks. ``--oversubscribe`` only where ranks outnumber the cores: it
    makes Open MPI yield while it waits, and an all-reduce then took 1.0 ms here instead of
    1.8 µs (8-byte-per-rank payloads, 2 ranks on 2 cores). One core per rank when a rank runs
    one thread; no binding when it runs more (a bound rank would run them all on one core)."""
    binary = Path(sys.executable).with_name("mpirun")
    command = [str(binary) if binary.exists() else "mpirun", "-np", str(ranks)]
    if ranks > (os.cpu_count() or 1):
        command.insert(1, "--oversubscribe")
    command[1:1] = ["--bind-to", "core" if threads_per_rank == 1 and ranks * threads_per_rank <= (os.cpu_count() or 1) else "none"]
    if os.geteuid() == 0:
        command.insert(1, "--allow-run-as-root")
    return command


# -- the measuring side (run by this script itself, plain or under mpirun) ---------------------


def measure(args) -> dict:
    import shmengine

    generator = shmengine.Generator(args.model, tensor_parallel=args.tp, intra_threads=args.intra)
    vocab = generator.vocabulary.id_to_token
    words = [t for t in vocab if not t.startswith("<")] or vocab
    bos = vocab[generator.model.bos_id] if generator.model.bos_id is not None else words[0]

    def prompt(i: int) -> list[str]:
        return [bos] + [words[(i * 7 + j * 3) % len(words)] for j in range(args.prompt - 1)]

    options = dict(max_length=args.new_tokens, min_length=args.new_tokens, include_prompt_in_result=False)
    with generator:
        generator.generate_batch([prompt(0)], **options)  # warm-up
        latencies = []
        for i in range(args.repeats):
            start = time.perf_counter()
            generator.generate_batch([prompt(i)], **options)
            latencies.append(time.perf_counter() - start)
        start = time.perf_counter()
        tokens = 0
        for r in range(max(1, args.repeats // 2)):
            results = generator.generate_batch([prompt(r * 8 + j) for j in range(8)], **options)
            tokens += sum(len(x.sequences_ids[0]) for x in results)
        rate = tokens / (time.perf_counter() - start)
        return {"latency": statistics.median(latencies), "rate": rate, "bytes": generator.weights_nbytes}


def run_measure(ranks: int, tp: bool, intra: int, args) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        command = [sys.executable, __file__, "--measure", "--model", str(args.model), "--intra", str(intra),
                   "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                   "--out", out.name] + (["--tp"] if tp else [])
        if tp:
            command = mpirun(ranks, intra) + command
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"measuring failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def run_data_parallel(ranks: int, args) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.txt"
        source.write_text("".join(f"{i} {i + 1} {i + 2}\n" for i in range(args.lines)))
        base = [sys.executable, "-m", "shmengine.cli", "generate", str(args.model), "--input", str(source),
                "--max-length", str(args.new_tokens), "--max-batch-size", "8", "--intra-threads", "1"]
        times = {}
        for name, command in (("one", base + ["--output", f"{tmp}/one.txt", "--inter-threads", str(ranks)]),
                              ("mpi", mpirun(ranks) + base + ["--output", f"{tmp}/mpi.txt", "--inter-threads", "1"])):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            times[name] = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        same = Path(f"{tmp}/one.txt").read_text() == Path(f"{tmp}/mpi.txt").read_text()
        if not same:
            raise SystemExit("data-parallel output differs from one process")
        return args.lines / times["one"], args.lines / times["mpi"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "numbers-gpt2"))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--intra", default="1,2")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--lines", type=int, default=400, help="lines of the data-parallel input")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.intra = int(args.intra)
        result = measure(args)
        import shmengine

        if shmengine.MpiInfo.getCurRank() == 0:
            Path(args.out).write_text(json.dumps(result))
        return 0

    n = args.ranks
    print(f"model {args.model}; {n} ranks; prompt {args.prompt}, {args.new_tokens} new tokens; "
          f"{os.cpu_count()} CPUs", flush=True)
    rows = []
    for intra in (int(x) for x in args.intra.split(",")):
        tp = run_measure(n, True, intra, args)
        one = run_measure(1, False, intra, args)
        same_cores = run_measure(1, False, intra * n, args) if intra * n != intra else one
        rows.append((f"TP batch-1 latency, intra {intra}", f"{tp['latency'] * 1e3:.1f} ms",
                     f"1 proc intra {intra}: {one['latency'] * 1e3:.1f} ms", tp["latency"] / one["latency"],
                     f"1 proc intra {intra * n}: {same_cores['latency'] * 1e3:.1f} ms", tp["latency"] / same_cores["latency"]))
        rows.append((f"TP batch-8 tokens/s, intra {intra}", f"{tp['rate']:.1f}", f"1 proc intra {intra}: {one['rate']:.1f}",
                     tp["rate"] / one["rate"], f"1 proc intra {intra * n}: {same_cores['rate']:.1f}",
                     tp["rate"] / same_cores["rate"]))
        rows.append((f"weight bytes per rank, intra {intra}", f"{tp['bytes'] / 2**20:.1f} MiB",
                     f"1 proc: {one['bytes'] / 2**20:.1f} MiB", tp["bytes"] / one["bytes"], "", None))
        print(*(f"{r[0]}: {r[1]} | {r[2]} ({r[3]:.2f}x)" for r in rows[-3:]), sep="\n", flush=True)
    one_rate, mpi_rate = run_data_parallel(n, args)
    rows.append(("data parallel lines/s", f"{mpi_rate:.1f} ({n} ranks x 1 worker)",
                 f"1 proc inter {n}: {one_rate:.1f}", mpi_rate / one_rate, "", None))
    print("\n| measure | mpirun | baseline | ratio | baseline 2 | ratio 2 |\n| --- | --- | --- | --- | --- | --- |")
    for name, ours, base, ratio, base2, ratio2 in rows:
        print(f"| {name} | {ours} | {base} | {ratio:.2f} | {base2} | {'' if ratio2 is None else f'{ratio2:.2f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
