#!/usr/bin/env python3
"""numexpr against numpy on the decoding loop's full-vocabulary passes, side by side in one run.

    python3 tools/bench_numexpr.py [--repeats 30]

The passes are those of ``decoding.py`` over [rows, vocabulary] float32 logits: the row-wise
log-sum-exp (every greedy step that reports scores, every beam step) and the repetition penalty
(``np.where`` over the whole array). Shapes: GPT-2 (50,257) and Marian (58,101) vocabularies at
32 and 128 rows (batch 32 greedy, batch 32 x beam 4). numexpr runs with 1 and with 2 threads
(a worker's ``intra_threads``); the ratio is numpy time / numexpr time (> 1: numexpr wins).
"""

from __future__ import annotations

import argparse
import time

import numexpr
import numpy as np


def lse_numpy(x):
    peak = np.max(x, axis=-1, keepdims=True)
    work = np.subtract(x, peak)
    np.exp(work, out=work)
    return peak + np.log(np.sum(work, axis=-1, keepdims=True))


def lse_numexpr(x):
    peak = np.max(x, axis=-1, keepdims=True)
    work = numexpr.evaluate("exp(x - peak)")
    return peak + np.log(np.sum(work, axis=-1, keepdims=True))


def penalty_numpy(x, presence, p):
    return np.where(presence, np.where(x < 0, x * p, x / p), x)


def penalty_numexpr(x, presence, p):
    return numexpr.evaluate("where(presence, where(x < 0, x * p, x / p), x)")


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


PENALTY = np.float32(1.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| pass | rows x vocab | numpy ms | numexpr 1 thread ms | ratio | numexpr 2 threads ms | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rows, vocab in ((32, 50257), (128, 50257), (32, 58101), (128, 58101)):
        x = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
        presence = rng.random((rows, vocab)) < 0.001
        np.testing.assert_allclose(lse_numexpr(x), lse_numpy(x), rtol=1e-5)
        np.testing.assert_array_equal(penalty_numexpr(x, presence, PENALTY), penalty_numpy(x, presence, PENALTY))
        for name, ours, theirs in (
            ("log-sum-exp", lambda x=x: lse_numpy(x), lambda x=x: lse_numexpr(x)),
            ("repetition penalty", lambda x=x, m=presence: penalty_numpy(x, m, PENALTY),
             lambda x=x, m=presence: penalty_numexpr(x, m, PENALTY)),
        ):
            base = best(ours, args.repeats)
            cells = []
            for threads in (1, 2):
                numexpr.set_num_threads(threads)
                t = best(theirs, args.repeats)
                cells += [f"{t * 1e3:.2f}", f"{base / t:.2f}"]
            print(f"| {name} | {rows} x {vocab} | {base * 1e3:.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
