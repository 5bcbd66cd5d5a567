"""A user's tensor-parallel translation script, as tests/test_tensor_parallel.py runs it under
mpirun (and without tensor parallelism in one plain process, for the reference)."""

from __future__ import annotations

import sys

from tp_common import dump, inputs, settings

import shmengine


def main() -> int:
    model, mode, out = sys.argv[1:4]
    rank = shmengine.MpiInfo.getCurRank()
    sources = inputs([list(n) + ["</s>"] for n in ("1984", "7", "120", "56003", "808")])
    config = settings()
    batching = {"max_batch_size": config["max_batch_size"]}
    with shmengine.Translator(model, tensor_parallel=mode == "tp", intra_threads=1, device=config["device"],
                              inter_threads=config["inter_threads"]) as translator:
        result = {
            "greedy": [r.hypotheses[0] for r in translator.translate_batch(sources, beam_size=1, **batching)],
            "beam": [r.hypotheses for r in translator.translate_batch(sources, beam_size=3, num_hypotheses=2, **batching)],
            "beam_scores": [r.scores for r in translator.translate_batch(sources, beam_size=3, num_hypotheses=2,
                                                                         return_scores=True, **batching)],
            "score": [r.log_probs for r in translator.score_batch(sources, [s[:2] for s in sources], **batching)],
        }
        shmengine.set_random_seed(5)
        result["sample"] = [r.hypotheses[0] for r in translator.translate_batch(sources, beam_size=1, sampling_topk=4,
                                                                                **batching)]
        dump(translator, result, rank, mode, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
