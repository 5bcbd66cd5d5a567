#!/usr/bin/env python3
"""numexpr against numpy on the decoding loop's full-vocabulary passes, side by side in one run.

    python3 tools/bench_numexpr.py                       # 1 and 2 threads, ~90 s
    python3 tools/bench_numexpr.py --threads 1,2,4,8,16  # a 16-core machine
    python3 tools/bench_numexpr.py --quick               # a smoke run (a few seconds)

On the device machine (16 cores, Python 3.12, no numexpr: its wheel travels in .whl, made here by
``pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
--platform manylinux_2_28_x86_64 -d .whl numexpr==2.14.2``), in one call carrying ``.whl``:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/numexpr-*.whl &&
    PYTHONPATH=/tmp/site python3 tools/bench_numexpr.py --threads 1,2,4,8,16

The passes are those of ``shmengine/decode/decoding.py`` over [rows, vocabulary] float32 logits:

- ``log-sum-exp``: ``log_normalizer`` (every beam step, every greedy step that reports scores,
  and sampling): row max, ``exp(x - max)``, row sum, log.
- ``log-softmax``: ``x - log_normalizer(x)`` as a full array (sampling, scoring).
- ``rep. penalty``: ``_History.process`` with ``repetition_penalty != 1``:
  ``where(seen, where(x < 0, x * p, x / p), x)`` over the whole array.

Shapes: 1, 8, 32 and 128 rows (batch 32 x beam 4) by 32,000 (Llama-2 / Marian-sized),
50,257 (GPT-2) and 128,256 (Llama-3) tokens. numexpr runs at each ``--threads`` count (a
worker's ``intra_threads``; numpy's ufuncs use one thread whatever it is).

"numpy" is the straightforward pass (what decoding.py ran when numexpr was decided against);
"other numpy" is numpy written differently, to see whether numexpr's gain (if any) needs
numexpr: for the log-sum-exp, blocks of rows that fit the cache (what ``log_normalizer`` now
runs above 4 MiB of logits); for the penalty, only the seen tokens (what ``_History.process``
now runs).

Robust on a loaded machine: each round runs numpy and every numexpr variant back to back, in an
order that rotates from round to round, and the ratio is taken per round (numpy / numexpr, > 1:
numexpr wins) so that load which changes between rounds cancels out; the table gives the median
time of each and the median per-round ratio over many rounds. The repetitions per cell are sized
so that the whole run stays within ``--budget`` seconds.

numexpr is not a dependency of shmengine (the measurement here is why: see README's
dependency list); on a machine without it the script says so and how to install it, and exits
with status 2. On a machine without network access, carry a wheel (``pip download numexpr``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shmengine.decode.decoding import _log_normalizer_blocked  # noqa: E402

try:
    import numexpr
except ImportError:  # pragma: no cover - depends on the machine
    numexpr = None

ROWS = (1, 8, 32, 128)
VOCABS = (32000, 50257, 128256)
PENALTY = np.float32(1.2)


# ---- numpy: the straightforward passes (the baseline) ----


def lse_numpy(x):
    peak = np.max(x, axis=-1, keepdims=True)
    peak[~np.isfinite(peak)] = 0
    work = np.subtract(x, peak)
    np.exp(work, out=work)
    return peak + np.log(np.sum(work, axis=-1, keepdims=True))


def lse_numpy_blocked(x):
    """The same values from numpy a few rows at a time, so that the exp's output stays in the
    cache between the subtract, the exp and the sum (what numexpr's blocking buys, with numpy's
    vectorised exp): the alternative to numexpr for this pass, as the decoding loop runs it."""
    return _log_normalizer_blocked(x)


def log_softmax_numpy(x):
    return x - lse_numpy(x)


def penalty_numpy(x, seen, p):
    penalised = np.where(x < 0, x * p, x / p)
    return np.where(seen, penalised, x)


def penalty_numpy_sparse(x, seen, p):
    """The same values from numpy touching only the seen tokens (a few hundred per row), not
    computing both branches over the whole array: the alternative to numexpr for this pass."""
    out = x.copy()
    rows, cols = np.nonzero(seen)
    values = out[rows, cols]
    out[rows, cols] = np.where(values < 0, values * p, values / p)
    return out


# ---- numexpr: the same values, with the elementwise work in numexpr's threaded, blocked VM ----


def lse_numexpr(x):
    peak = np.max(x, axis=-1, keepdims=True)
    peak[~np.isfinite(peak)] = 0
    # numexpr's reductions are single-threaded and slower than numpy's, so only the [rows, V]
    # exp is handed to it; the row max and row sum stay in numpy.
    work = numexpr.evaluate("exp(x - peak)", local_dict={"x": x, "peak": peak})
    return peak + np.log(np.sum(work, axis=-1, keepdims=True))


def log_softmax_numexpr(x):
    lse = lse_numexpr(x)
    return numexpr.evaluate("x - lse", local_dict={"x": x, "lse": lse})


def penalty_numexpr(x, seen, p):
    return numexpr.evaluate("where(seen, where(x < 0, x * p, x / p), x)", local_dict={"x": x, "seen": seen, "p": p})


def make_cases(x, seen):
    """(pass name, numpy callable, numexpr callable, other numpy callable or None) for one array."""
    return (
        ("log-sum-exp", lambda: lse_numpy(x), lambda: lse_numexpr(x), lambda: lse_numpy_blocked(x)),
        ("log-softmax", lambda: log_softmax_numpy(x), lambda: log_softmax_numexpr(x), None),
        (
            "rep. penalty",
            lambda: penalty_numpy(x, seen, PENALTY),
            lambda: penalty_numexpr(x, seen, PENALTY),
            lambda: penalty_numpy_sparse(x, seen, PENALTY),
        ),
    )


def check_equal(x, seen) -> None:
    """numexpr must give numpy's values, or its speed is beside the point."""
    np.testing.assert_allclose(lse_numexpr(x), lse_numpy(x), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(log_softmax_numexpr(x), log_softmax_numpy(x), rtol=2e-6, atol=2e-5)
    np.testing.assert_array_equal(penalty_numexpr(x, seen, PENALTY), penalty_numpy(x, seen, PENALTY))
    np.testing.assert_allclose(lse_numpy_blocked(x), lse_numpy(x), rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(penalty_numpy_sparse(x, seen, PENALTY), penalty_numpy(x, seen, PENALTY))


def timed(fn, threads: int | None) -> float:
    if threads is not None:
        numexpr.set_num_threads(threads)  # outside the timed region
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(baseline, variants, budget_s: float, min_rounds: int, max_rounds: int):
    """Interleaved rounds of the baseline and each (numexpr threads or None, callable) variant.

    Returns (median baseline s, [(median variant s, median per-round ratio) per variant], rounds)."""
    runs = [(None, baseline)] + list(variants)
    for threads, fn in runs:  # warm: first-call allocation, numexpr's compile cache, its threads
        timed(fn, threads)
    one_round = sum(timed(fn, threads) for threads, fn in runs)
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(one_round, 1e-9))))
    samples = [[] for _ in runs]
    for r in range(rounds):
        shift = r % len(runs)
        for i in list(range(shift, len(runs))) + list(range(shift)):
            threads, fn = runs[i]
            samples[i].append(timed(fn, threads))
    base = samples[0]
    out = [(statistics.median(times), statistics.median(b / t for b, t in zip(base, times))) for times in samples[1:]]
    return statistics.median(base), out, rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="numexpr thread counts, comma-separated (default 1,2)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    parser.add_argument("--budget", type=float, default=75.0, help="seconds of timed rounds (default 75)")
    parser.add_argument("--min-rounds", type=int, default=7)
    parser.add_argument("--max-rounds", type=int, default=301)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, 3 rounds each")
    args = parser.parse_args()
    if numexpr is None:
        print(
            "numexpr is not installed here, so there is nothing to compare numpy with.\n"
            "Install it first:  python3 -m pip install numexpr   (or carry a wheel: pip download numexpr,\n"
            "then pip install --no-index ./numexpr-*.whl on a machine without network access).",
            file=sys.stderr,
        )
        return 2
    thread_counts = [int(t) for t in args.threads.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    vocabs = [int(v) for v in args.vocabs.split(",")]
    if args.quick:
        rows_list, vocabs, args.min_rounds, args.max_rounds = rows_list[:2], vocabs[:1], 3, 3
    too_many = [t for t in thread_counts if t > numexpr.detect_number_of_cores()]
    cells = len(rows_list) * len(vocabs) * 3
    started = time.perf_counter()

    print(
        f"numpy {np.__version__}, numexpr {numexpr.__version__} (VML: {'yes' if numexpr.use_vml else 'no'}), "
        f"{numexpr.detect_number_of_cores()} cores; budget {args.budget:.0f} s"
    )
    if too_many:
        print(f"warning: more numexpr threads than cores: {too_many}")
    head = " | ".join(f"numexpr {t}t ms | ratio {t}t" for t in thread_counts)
    print(f"\n| pass | rows x vocab | rounds | numpy ms | {head} | other numpy ms | ratio |")
    print("| --- | --- | --- | --- |" + " --- | --- |" * (len(thread_counts) + 1))
    rng = np.random.default_rng(0)
    wins: dict[int, list[str]] = {t: [] for t in thread_counts}
    for vocab in vocabs:
        for rows in rows_list:
            x = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
            seen = rng.random((rows, vocab)) < 0.001  # ~ the prompt and output tokens of a row
            check_equal(x, seen)
            for name, base_fn, ne_fn, alt_fn in make_cases(x, seen):
                left = args.budget - (time.perf_counter() - started)
                share = max(left, 0) / max(cells, 1)
                cells -= 1
                variants = [(t, ne_fn) for t in thread_counts] + ([(None, alt_fn)] if alt_fn else [])
                base, results, rounds = measure(base_fn, variants, share, args.min_rounds, args.max_rounds)
                cols = [f"{ms * 1e3:.3f} | {ratio:.2f}" for ms, ratio in results]
                if not alt_fn:
                    cols.append(" | ")
                print(
                    f"| {name} | {rows} x {vocab} | {rounds} | {base * 1e3:.3f} | " + " | ".join(cols) + " |",
                    flush=True,
                )
                for t, (_, ratio) in zip(thread_counts, results):
                    if ratio >= 1.1:
                        best_numpy = min(base, results[-1][0]) if alt_fn else base
                        beats_alt = results[thread_counts.index(t)][0] < best_numpy
                        wins[t].append(
                            f"{name} {rows}x{vocab} ({ratio:.2f}{'' if beats_alt else ', not the other numpy'})"
                        )
    print("\nratio = median over rounds of numpy time / the other's time in the same round (> 1: the other is faster).")
    for t in thread_counts:
        print(f"numexpr at {t} thread(s) is >= 1.1x numpy at: {', '.join(wins[t]) or 'nowhere'}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
