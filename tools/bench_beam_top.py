#!/usr/bin/env python3
"""A beam step's top-k and log-normaliser over host logits: numpy (``decoding.top_k_ids`` and
``log_normalizer``, what ``HostLogits.top`` ran before) against ORT's kernels (``cpu_top.py``,
what it runs now), interleaved in one run, one thread each.

    python3 tools/bench_beam_top.py [--rounds 15]

Rows are batch x beam (128 = Marian-base at batch 32, beam 4); ratio = numpy / ORT (> 1: ORT
faster). The ids are checked equal as sets, the normalisers within float32 rounding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shmengine.decode.cpu_top import top_k  # noqa: E402
from shmengine.decode.decoding import log_normalizer, top_k_ids  # noqa: E402


def numpy_top(values: np.ndarray, k: int):
    ids = top_k_ids(values, k)
    top = np.take_along_axis(values, ids, axis=-1)
    return top, ids, log_normalizer(values, peak=top.max(axis=-1, keepdims=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| rows x vocab | k | numpy ms | ORT ms | numpy / ORT |")
    print("| --- | --- | --- | --- | --- |")
    for rows, vocab, k in ((128, 58101, 8), (32, 58101, 8), (128, 50257, 8), (32, 50257, 8), (8, 50257, 8), (16, 32000, 10)):
        values = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
        a, b = numpy_top(values, k), top_k(values, k)
        assert np.array_equal(np.sort(a[1], axis=1), np.sort(b[1], axis=1)), "the two top-k differ"
        np.testing.assert_allclose(a[2], b[2], rtol=1e-5)  # float32 sums in two orders
        times = {"numpy": [], "ort": []}
        for _ in range(args.rounds):
            for name, fn in (("numpy", numpy_top), ("ort", top_k)):
                start = time.perf_counter()
                fn(values, k)
                times[name].append(time.perf_counter() - start)
        n, o = (statistics.median(times[x]) * 1e3 for x in ("numpy", "ort"))
        print(f"| {rows} x {vocab} | {k} | {n:.2f} | {o:.2f} | {n / o:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
