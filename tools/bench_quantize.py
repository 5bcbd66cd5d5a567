"""Which int8 path of ONNX Runtime is fastest on CPU: a plain ORT greedy loop over each variant.

    python tools/bench_quantize.py [--model DIR] [--batch 8] [--new-tokens 32] [--repeats 2]

DIR is an Optimum decoder export (default: the GPT-2-124M-shaped one tools/bench_generate.py
builds). Variants, each run in one session with intra_op_num_threads=1 and ORT's default
prepacking, interleaved ``--repeats`` times (the machine is shared: compare within one run):

* ``float32``: the export as it is;
* ``ort-dynamic``: ``onnxruntime.quantization.quantize_dynamic`` of the export as it is
  (QInt8, per tensor): it leaves Optimum's Gemm projections in float32;
* ``mmi-tensor`` / ``mmi-channel``: shmengine.model.quantize, MatMulInteger, per tensor / per channel;
* ``nbits8-b32`` / ``nbits8-b128``: shmengine.model.quantize, MatMulNBits 8-bit, accuracy_level 4.

Prints tokens/s, the ratio to float32, the file size, and how many of the greedy tokens equal
float32's (on random-init weights that agreement says little; accuracy is tested on the bundled
trained models in tests/test_compute_types.py).
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
from shmengine.model.graph_edits import LOGIT_POSITIONS  # noqa: E402


def make_variants(model_dir: Path, out: Path) -> dict[str, Path]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from shmengine.model.quantize import QuantizeOptions, quantize_weights

    source = model_dir / "model.onnx"
    variants = {"float32": source}
    path = out / "ort-dynamic.onnx"
    if not path.exists():
        quantize_dynamic(source, path, weight_type=QuantType.QInt8, per_channel=False, use_external_data_format=True)
    variants["ort-dynamic"] = path
    for name, options in {
        "mmi-tensor": QuantizeOptions("matmul_integer_per_tensor"),
        "mmi-channel": QuantizeOptions("matmul_integer_per_channel"),
        "nbits8-b32": QuantizeOptions("matmul_nbits", block_size=32),
        "nbits8-b128": QuantizeOptions("matmul_nbits", block_size=128),
    }.items():
        path = out / f"{name}.onnx"
        if not path.exists():
            model = onnx.load(str(source))
            start = time.perf_counter()
            count = quantize_weights(model, options)
            print(f"{name}: {count} products quantized in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
        variants[name] = path
    return variants


def greedy(session, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float]:
    """A plain ORT greedy loop over an Optimum decoder (or shmengine's edited graph, which takes
    the logit positions as an input): the tokens and the seconds it took (CPU seconds of this
    process with ``CPU_TIME=1``)."""
    clock = time.process_time if os.environ.get("CPU_TIME") else time.perf_counter
    inputs = {i.name: i for i in session.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values")]
    batch, length = prompts.shape
    feeds = {"input_ids": prompts, "attention_mask": np.ones_like(prompts)}
    if "position_ids" in inputs:
        feeds["position_ids"] = np.tile(np.arange(length, dtype=np.int64), (batch, 1))
    if LOGIT_POSITIONS in inputs:
        feeds[LOGIT_POSITIONS] = np.array([length - 1], np.int64)
    for name in past:
        shape = [batch if a == 0 else (0 if a == 2 else d) for a, d in enumerate(inputs[name].shape)]
        feeds[name] = np.zeros(shape, np.float32)
    outputs = [o.name for o in session.get_outputs()]
    tokens = []
    start = clock()
    for step in range(new_tokens):
        values = dict(zip(outputs, session.run(outputs, feeds)))
        nxt = values["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(nxt)
        feeds["input_ids"] = nxt
        feeds["attention_mask"] = np.ones((batch, length + step + 1), np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.full((batch, 1), length + step, np.int64)
        if LOGIT_POSITIONS in inputs:
            feeds[LOGIT_POSITIONS] = np.array([0], np.int64)
        for name in past:
            feeds[name] = values[name.replace("past_key_values", "present")]
    return np.concatenate(tokens, axis=1), clock() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(tempfile.gettempdir(), "shmengine-bench-models", "gpt2", "onnx"))
    parser.add_argument("--out", default=None, help="where the variants are written (default: DIR/../quantized)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    opts = parser.parse_args()
    import onnxruntime as ort

    model_dir = Path(opts.model)
    out = Path(opts.out) if opts.out else model_dir.parent / "quantized"
    out.mkdir(parents=True, exist_ok=True)
    variants = make_variants(model_dir, out)
    if opts.only:
        variants = {k: v for k, v in variants.items() if k in opts.only.split(",") or k == "float32"}
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, 50000, size=(opts.batch, opts.prompt_length)).astype(np.int64)
    sessions = {}
    for name, path in variants.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        greedy(sessions[name], prompts[:, :4], 2)  # warm-up
    times = {name: [] for name in variants}
    tokens = {}
    for _ in range(opts.repeats):
        for name, session in sessions.items():
            tokens[name], elapsed = greedy(session, prompts, opts.new_tokens)
            times[name].append(elapsed)
    base = opts.batch * opts.new_tokens / min(times["float32"])
    print(f"{'variant':<13}{'tok/s':>9}{'vs f32':>8}{'MB':>8}{'same tokens':>13}")
    for name, path in variants.items():
        rate = opts.batch * opts.new_tokens / min(times[name])
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6
        same = float((tokens[name] == tokens["float32"]).mean())
        print(f"{name:<13}{rate:>9.1f}{rate / base:>7.2f}x{size:>8.0f}{same:>12.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
