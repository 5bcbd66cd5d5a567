"""A user's tensor-parallel translation script, as tests/test_tensor_parallel.py runs it under
mpirun (and without tensor parallelism in one plain process, for the reference)."""

from __future__ import annotations

import json
import os
import sys

import shmengine


def main() -> int:
    model, mode, out = sys.argv[1:4]
    rank = shmengine.MpiInfo.getCurRank()
    if os.environ.get("TP_SCRIPT_PROMPTS"):
        sources = json.loads(open(os.environ["TP_SCRIPT_PROMPTS"]).read())
    else:
        sources = [list(n) + ["</s>"] for n in ("1984", "7", "120", "56003", "808")]
    with shmengine.Translator(model, tensor_parallel=mode == "tp", intra_threads=1) as translator:
        result = {
            "greedy": [r.hypotheses[0] for r in translator.translate_batch(sources, beam_size=1)],
            "beam": [r.hypotheses for r in translator.translate_batch(sources, beam_size=3, num_hypotheses=2)],
            "beam_scores": [r.scores for r in translator.translate_batch(sources, beam_size=3, num_hypotheses=2,
                                                                         return_scores=True)],
            "score": [r.log_probs for r in translator.score_batch(sources, [s[:2] for s in sources])],
        }
        shmengine.set_random_seed(5)
        result["sample"] = [r.hypotheses[0] for r in translator.translate_batch(sources, beam_size=1, sampling_topk=4)]
        result["weights_nbytes"] = translator.weights_nbytes
        result["info"] = translator.parallel_info()
        if rank == 0 or mode == "tp":
            with open(f"{out}.{rank}", "w") as f:
                json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
