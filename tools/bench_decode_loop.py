#!/usr/bin/env python3
"""The decoding loop alone (no model: a stepper that hands back fixed random logits), with
``log_normalizer``'s blocked pass on and off, interleaved in one run.

    python3 tools/bench_decode_loop.py [--vocab 50257] [--steps 12] [--rounds 7]

What it isolates: the host-side work of greedy and beam search over [rows, vocabulary] logits
per step (top-k, log-sum-exp, bookkeeping), which the ONNX session's time hides in an end-to-end
run on a loaded machine. "plain" forces the one-pass log-sum-exp at every size (what ran before
the blocked pass); "blocked" is the code as it is (blocks of rows above 4 MiB of logits).
Ratio = median over rounds of plain time / blocked time in the same round (> 1: blocked faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shmengine.decode import decoding  # noqa: E402
from shmengine.decode.decoding import DecodingOptions, decode  # noqa: E402


class FixedLogits:
    """A stepper whose every row's logits are one of 256 fixed random rows."""

    def __init__(self, table: np.ndarray):
        self.table = table

    def prefill(self, prompts):
        return self.table[np.arange(len(prompts)) % len(self.table)]

    def step(self, tokens):
        return self.table[np.arange(len(tokens)) % len(self.table)]

    def select(self, rows):
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    table = (np.random.default_rng(0).standard_normal((256, args.vocab)) * 3).astype(np.float32)
    shipped = decoding._BLOCKED_ABOVE
    print("| batch | search | rows x vocab | plain ms | blocked ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch, beam in ((8, 1), (32, 1), (8, 4), (32, 4)):
        options = DecodingOptions(max_new_tokens=args.steps, end_ids=(0,), min_new_tokens=args.steps, beam_size=beam)
        times = {"plain": [], "blocked": []}
        for r in range(args.rounds):
            for name in ("plain", "blocked") if r % 2 else ("blocked", "plain"):
                decoding._BLOCKED_ABOVE = 1 << 62 if name == "plain" else shipped
                start = time.perf_counter()
                decode(FixedLogits(table), [[1]] * batch, options)
                times[name].append(time.perf_counter() - start)
        decoding._BLOCKED_ABOVE = shipped
        ratio = statistics.median(p / b for p, b in zip(times["plain"], times["blocked"]))
        search = "greedy" if beam == 1 else f"beam {beam}"
        print(
            f"| {batch} | {search} | {batch * beam} x {args.vocab} | {statistics.median(times['plain']) * 1e3:.0f} | "
            f"{statistics.median(times['blocked']) * 1e3:.0f} | {ratio:.2f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
