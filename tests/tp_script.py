"""A user's tensor-parallel script, as tests/test_tensor_parallel.py runs it under mpirun (and
without tensor parallelism in one plain process, for the reference)."""

from __future__ import annotations

import os
import sys
import time

from tp_common import dump, inputs, settings

import shmengine

DEFAULT = [["<|endoftext|>", "1", "2"], ["<|endoftext|>", "7"], ["<|endoftext|>", "3", "4", "5"], ["<|endoftext|>"]]


def main() -> int:
    model, mode, case, out = sys.argv[1:5]
    rank = shmengine.MpiInfo.getCurRank()
    config = settings()
    batching = {"max_batch_size": config["max_batch_size"]}
    with shmengine.Generator(model, tensor_parallel=mode == "tp", intra_threads=1, device=config["device"],
                             inter_threads=config["inter_threads"]) as generator:
        batch = inputs(DEFAULT)
        if case == "mismatch" and rank == 1:
            batch[1] = ["<|endoftext|>", "8"]
        if case == "loop":  # generate until killed; rank 1 says who it is first
            open(f"{out}.pid.{rank}", "w").write(str(os.getpid()))
            while True:
                generator.generate_batch(batch * 8, max_length=40)
                open(f"{out}.progress.{rank}", "w").write(str(time.time()))
        if case == "bad-option" and rank == 1:  # fails on this rank only, before anything runs
            generator.generate_batch(batch, max_length=16, beam_size=-1)
        result = {
            "greedy": [r.sequences_ids[0] for r in generator.generate_batch(batch, max_length=16, **batching)],
            "greedy_scores": [r.scores[0] for r in generator.generate_batch(batch, max_length=16, return_scores=True,
                                                                            **batching)],
            "beam": [r.sequences_ids for r in generator.generate_batch(batch, max_length=16, beam_size=3,
                                                                       num_hypotheses=2, **batching)],
            "score": [r.log_probs for r in generator.score_batch([p + p[1:2] * 2 for p in batch], **batching)],
        }
        shmengine.set_random_seed(11)
        result["sample"] = [r.sequences_ids[0] for r in generator.generate_batch(batch, max_length=16, sampling_topk=8,
                                                                                 **batching)]
        dump(generator, result, rank, mode, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
