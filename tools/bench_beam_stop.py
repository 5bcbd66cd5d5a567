"""The two beam stop rules side by side on the bundled numbers model: accuracy and time.

    python tools/bench_beam_stop.py [--numbers 10000] [--beam-size 2] [--inter-threads 2]

Translates 0..N-1 with CTranslate2's rule (``early_stopping=True``, the API default), the exact
rule (``early_stopping="never"``, the launcher's default) and greedy search, in one run on one
engine, and prints how many come out as ``number_to_words`` says and the time of each, with the
exact rule's time as a ratio of CTranslate2's rule.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shmengine  # noqa: E402
from models.train_numbers import number_to_words  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numbers", type=int, default=10000)
    parser.add_argument("--beam-size", type=int, default=2)
    parser.add_argument("--inter-threads", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=256)
    args = parser.parse_args()
    model = Path(__file__).resolve().parents[1] / "models" / "numbers-marian"
    sources = [[*str(n), "</s>"] for n in range(args.numbers)]
    rows = []
    with shmengine.Translator(model, inter_threads=args.inter_threads, intra_threads=1) as translator:
        translator.translate_batch(sources[:512], beam_size=args.beam_size, max_batch_size=args.max_batch_size)  # warm-up
        for name, options in (
            ("CTranslate2's rule (early_stopping=True)", dict(beam_size=args.beam_size)),
            ("exact rule (early_stopping='never')", dict(beam_size=args.beam_size, early_stopping="never")),
            ("greedy", dict(beam_size=1)),
        ):
            start = time.perf_counter()
            results = translator.translate_batch(sources, max_batch_size=args.max_batch_size, **options)
            seconds = time.perf_counter() - start
            right = sum(" ".join(r.hypotheses[0]) == number_to_words(n) for n, r in enumerate(results))
            rows.append((name, right, seconds))
    print(f"{args.numbers} numbers, beam {args.beam_size}, {args.inter_threads} workers x 1 intra thread")
    for name, right, seconds in rows:
        print(f"  {name:42s} {right:6d} right  {seconds:7.2f} s")
    print(f"  exact / CTranslate2's rule time: {rows[1][2] / rows[0][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
