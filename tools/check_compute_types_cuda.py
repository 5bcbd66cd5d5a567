"""compute_type on CUDA: each type's accuracy on the bundled models and its speed on GPT-2-124M.

    python tools/check_compute_types_cuda.py [--model-124m DIR] [--types float32,float16,...]

Accuracy: the bundled numbers models (Generator and Translator, greedy) on the 1000 held-out
numbers of models/numbers_heldout.tsv (expected words from the reference ``number_to_words``),
per compute type, with device="cuda". Speed: ``--model-124m`` (an Optimum GPT-2 export; on the
device machine a random fill of ``strip_weights.py``), one worker, 16-token prompts, 32 new
tokens, greedy, batch 1 / 8 / 32, every type against float32 in the same run. Exit status 1 if a
type the registry lists for CUDA fails to load or falls under 99% exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shmengine  # noqa: E402


def heldout() -> list[tuple[str, str]]:
    with open(ROOT / "models" / "numbers_heldout.tsv", encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


def accuracy(compute_type: str) -> tuple[str, float, float]:
    pairs = heldout()
    with shmengine.Translator(ROOT / "models" / "numbers-marian", device="cuda", compute_type=compute_type) as t:
        resolved = t.compute_type
        out = t.translate_batch([list(n) + ["</s>"] for n, _ in pairs], beam_size=1, max_batch_size=64)
        marian = sum(" ".join(r.hypotheses[0]) == w for r, (_, w) in zip(out, pairs)) / len(pairs)
    with shmengine.Generator(ROOT / "models" / "numbers-gpt2", device="cuda", compute_type=compute_type) as g:
        bos = g.vocabulary.id_to_token[g.model.bos_id]
        out = g.generate_batch([[bos, *n, "="] for n, _ in pairs], max_batch_size=64, max_length=24,
                               include_prompt_in_result=False)
        gpt2 = sum(" ".join(r.sequences[0]) == w for r, (_, w) in zip(out, pairs)) / len(pairs)
    return resolved, marian, gpt2


def speed(model_dir: Path, compute_type: str, batches: list[int]) -> dict[int, float]:
    rng = np.random.default_rng(0)
    vocab = len(__import__("json").load(open(model_dir / "tokenizer.json"))["model"]["vocab"])
    rates = {}
    with shmengine.Generator(model_dir, device="cuda", compute_type=compute_type) as g:
        for batch in batches:
            prompts = [[int(t) for t in rng.integers(1, vocab - 1, size=17)] for _ in range(batch)]
            g.generate_batch(prompts[:batch], max_length=4, min_length=4, include_prompt_in_result=False)
            start = time.perf_counter()
            out = g.generate_batch(prompts, max_length=32, min_length=32, include_prompt_in_result=False)
            rates[batch] = sum(len(r.sequences_ids[0]) for r in out) / (time.perf_counter() - start)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="float32,float16,bfloat16,int8_float16,int8,auto")
    parser.add_argument("--model-124m", default=None)
    parser.add_argument("--batches", default="1,8,32")
    opts = parser.parse_args()
    os.environ.setdefault("SHMENGINE_CACHE_DIR", tempfile.mkdtemp(prefix="shmengine-cache-"))
    print("supported on cuda:", sorted(shmengine.get_supported_compute_types("cuda")), flush=True)
    failed = False
    rows = []
    for ct in opts.types.split(","):
        try:
            resolved, marian, gpt2 = accuracy(ct)
            rows.append(f"{ct:<14}{resolved:<14}{marian:>8.1%}{gpt2:>8.1%}")
            failed |= min(marian, gpt2) < 0.99
        except Exception as exc:  # report every type, then fail
            rows.append(f"{ct:<14}FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            failed = True
        print(rows[-1], flush=True)
    print(f"\n{'requested':<14}{'runs as':<14}{'marian':>8}{'gpt2':>8}")
    print("\n".join(rows))
    if opts.model_124m:
        batches = [int(b) for b in opts.batches.split(",")]
        table = {}
        for ct in ("float32", "float16", "bfloat16", "int8_float16"):
            try:
                table[ct] = speed(Path(opts.model_124m), ct, batches)
            except Exception as exc:
                print(f"speed {ct}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            else:
                print(f"speed {ct}: {table[ct]}", flush=True)
        print(f"\n{'type':<14}" + "".join(f"{f'b{b} tok/s':>12}{'vs f32':>8}" for b in batches))
        for ct, rates in table.items():
            base = table.get("float32", rates)
            print(f"{ct:<14}" + "".join(f"{rates[b]:>12.1f}{rates[b] / base[b]:>7.2f}x" for b in batches))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
