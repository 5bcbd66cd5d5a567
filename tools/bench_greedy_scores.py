#!/usr/bin/env python3
"""Greedy with and without the per-step log-normaliser (``DecodingOptions.need_scores``), in one
process on one ONNX Runtime session, interleaved rounds, medians.

    python3 tools/bench_greedy_scores.py --model DIR [--batch 8] [--tokens 24] [--rounds 7] [--runner host|bound]

``DIR`` is an Optimum decoder export (e.g. ``/work/cache/gpt2/onnx``, GPT-2-124M: 50,257 logits a
row). "scores" is what ``return_scores=True`` (or a callback) runs; "no scores" is the default
``generate_batch``, which since this change skips the pass over the vocabulary. Both must give the
same tokens; the script exits 1 if not.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shmengine.decode.decoding import DecodingOptions, decode  # noqa: E402
from shmengine.decode.runners import BoundRunner, HostRunner  # noqa: E402
from shmengine.decode.steppers import DecoderOnlyStepper  # noqa: E402
from shmengine.runtime.target import WorkerTarget  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runner", choices=("host", "bound"), default="host")
    args = parser.parse_args()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(args.model / "model.onnx"), options, providers=["CPUExecutionProvider"])
    runner = HostRunner() if args.runner == "host" else BoundRunner(WorkerTarget(device="cpu", runner="bound"),
                                                                   [("CPUExecutionProvider", {})])
    prompts = np.random.default_rng(0).integers(1, 50000, size=(args.batch, 16)).tolist()
    base = DecodingOptions(max_new_tokens=args.tokens, min_new_tokens=0, end_ids=(-1,))
    variants = {"scores": base, "no scores": dataclasses.replace(base, need_scores=False)}
    tokens, times = {}, {name: [] for name in variants}
    for name, opts in variants.items():  # warm-up
        tokens[name] = [h.ids for h in decode(DecoderOnlyStepper(session, 0, runner), prompts, opts, None)]
    for _ in range(args.rounds):
        for name, opts in variants.items():
            start = time.process_time()
            decode(DecoderOnlyStepper(session, 0, runner), prompts, opts, None)
            times[name].append(time.process_time() - start)
    same = tokens["scores"] == tokens["no scores"]
    print(f"GPT-2 export {args.model}, batch {args.batch}, {args.tokens} tokens, {args.runner} runner, "
          f"CPU seconds per generation (median of {args.rounds} interleaved rounds)")
    for name, t in times.items():
        print(f"  {name:10s} {statistics.median(t):.3f} s")
    ratios = [a / b for a, b in zip(times["scores"], times["no scores"])]
    print(f"  scores / no scores: {statistics.median(ratios):.3f} (median of per-round ratios); same tokens: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
