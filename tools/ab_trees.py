#!/usr/bin/env python3
"""Before/after for a hot-path change: the same generation workload from two source trees,
alternated in one run on one machine, tokens/s and the ratio per row.

    git worktree add /tmp/base <commit>
    python3 tools/ab_trees.py --before /tmp/base --after . --gpt2 DIR [--marian DIR] [--rounds 3]

Each measurement is a fresh interpreter with ``PYTHONPATH=<tree>`` running one Generator (or
Translator) with ``inter_threads=1, intra_threads=1`` over a 16-token prompt and 32 new tokens
per example; the trees alternate round by round and each row keeps its best round, so load from
elsewhere on the machine falls on both sides alike. The decoded token count is checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
import shmengine
kind, path, batch, beam = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
cls = shmengine.Generator if kind == "gpt2" else shmengine.Translator
with cls(path, inter_threads=1, intra_threads=1) as model:
    vocab = len(model.vocabulary.id_to_token)
    ids = rng.integers(4, vocab - 2, size=(batch, 16)).tolist()
    if kind == "gpt2":
        def run():
            out = model.generate_batch(ids, max_length=32, min_length=32, beam_size=beam, include_prompt_in_result=False)
            return sum(len(r.sequences_ids[0]) for r in out)
    else:
        sources = [[model.vocabulary.id_to_token[i] for i in row] + ["</s>"] for row in ids]
        def run():
            out = model.translate_batch(sources, max_decoding_length=32, min_decoding_length=32, beam_size=beam)
            return sum(len(r.hypotheses[0]) for r in out)
    run()
    best, tokens = float("inf"), 0
    for _ in range(3):
        start = time.perf_counter(); tokens = run(); best = min(best, time.perf_counter() - start)
print(json.dumps({"tokens": tokens, "seconds": best}))
"""


def measure(tree: str, kind: str, path: str, batch: int, beam: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, kind, path, str(batch), str(beam)], env=env,
                         capture_output=True, text=True, check=True, cwd=os.path.abspath(tree))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--gpt2")
    parser.add_argument("--marian")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for kind, path in (("gpt2", args.gpt2), ("marian", args.marian)):
        if not path:
            continue
        for beam in (1, 4):
            for batch in map(int, args.batch_sizes.split(",")):
                best = {}
                for _ in range(args.rounds):
                    for side, tree in (("before", args.before), ("after", args.after)):
                        r = measure(tree, kind, path, batch, beam)
                        rate = r["tokens"] / r["seconds"]
                        if rate > best.get(side, (0, 0))[0]:
                            best[side] = (rate, r["tokens"])
                if best["before"][1] != best["after"][1]:
                    print(f"  note: {kind} batch {batch} beam {beam}: {best['before'][1]} vs {best['after'][1]} tokens")
                row = (kind, batch, "greedy" if beam == 1 else "beam 4", best["before"][0], best["after"][0])
                rows.append(row)
                print(f"  {row[0]} b{row[1]} {row[2]}: {row[3]:.1f} -> {row[4]:.1f} tok/s ({row[4] / row[3]:.2f}x)", flush=True)
    print("\n| model | batch | search | before tok/s | after tok/s | after/before |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, batch, search, before, after in rows:
        print(f"| {kind} | {batch} | {search} | {before:.1f} | {after:.1f} | {after / before:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
