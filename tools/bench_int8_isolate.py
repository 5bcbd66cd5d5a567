"""Where shmengine's CPU int8 time goes: the same greedy loop over each layer, one run, side by side.

    python tools/bench_int8_isolate.py [--model DIR] [--batch 8] [--new-tokens 32] [--repeats 3]

DIR is a bench_generate.py build of the GPT-2-124M shape (default /tmp/shmengine-bench-models/gpt2:
``onnx/`` for ORT, ``ct2/`` for CTranslate2). Every variant runs intra_op_num_threads=1, one
process, interleaved ``--repeats`` times (the machine is shared: compare within one run; the
median is printed). Layers, from the bottom up:

(a) the graph: a plain ``InferenceSession`` and a python greedy loop (numpy KV cache) over
    shmengine's cached int8 file (the one ``compute_type="int8"`` makes) and over
    ``onnxruntime.quantization.quantize_dynamic`` of the export;
(b) the session: the same int8 graph through ``shmengine.runtime.sessions.create_session``
    (weights given with ``add_initializer`` from the shared segment; prepacking off, on, and
    through the prepacked model file every worker maps);
(c) the engine: ``shmengine.Generator(compute_type="int8", inter_threads=1)`` and
    ``ctranslate2.Generator(compute_type="int8", inter_threads=1)``, same prompts.

``--ops`` also prints the op types of each session's *optimized* graph (what ORT fused).
``CPU_TIME=1`` times the in-process loops (a, b) in this process's CPU time instead of wall
time: on a machine other jobs load, that compares the work, not the share of the CPU left.

First run (GPT-2-124M shape, batch 8, 32 new tokens, wall, median of 3, before the key-scale
and unflattened-Gemm edits): quantize_dynamic plain 152, ours plain 178, ours plain without
prepacking 79, shm session without prepacking 83, shm ``add_initializer`` + prepacking 187,
shm prepacked file 183, shmengine.Generator 155, CTranslate2 int8 191.5 tok/s. ORT fused
``DynamicQuantizeMatMul`` (49) in every variant: shared initializers do not block the fusion.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_quantize import greedy  # noqa: E402  (the same plain ORT loop as the quantization bench)


def plain_options(prepack: bool = True, arena: bool = True, optimized: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    if optimized:
        so.optimized_model_filepath = optimized
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    os.path.basename(optimized) + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return so


def op_counts(path: str) -> collections.Counter:
    import onnx

    model = onnx.load(path, load_external_data=False)
    counts = collections.Counter()

    def walk(graph):
        for n in graph.node:
            counts[n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(model.graph)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(tempfile.gettempdir(), "shmengine-bench-models", "gpt2"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", action="store_true", help="print the optimized graphs' op types")
    parser.add_argument("--skip", default="", help="comma-separated variant names to leave out")
    opts = parser.parse_args()
    import onnxruntime as ort

    import shmengine
    from shmengine.model.transforms import prepare_models
    from shmengine.model.weights import WeightStore
    from shmengine.runtime.sessions import SessionSettings, create_session

    root = Path(opts.model)
    export = root / "onnx" / "model.onnx"
    work = Path(tempfile.mkdtemp(prefix="int8-isolate-"))
    skip = set(filter(None, opts.skip.split(",")))

    prepared = prepare_models({"model": export}, {"model": "decoder"}, "cpu", "int8")
    ours = Path(prepared.models["model"].path)
    print(f"shmengine int8 file: {ours} ({prepared.applied['model']})", file=sys.stderr)
    qdyn = root / "quantized" / "ort-dynamic.onnx"
    if not qdyn.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qdyn.parent.mkdir(exist_ok=True)
        quantize_dynamic(export, qdyn, weight_type=QuantType.QInt8, per_channel=False, use_external_data_format=True)

    sessions: dict[str, object] = {}
    optimized: dict[str, str] = {}

    def add(name, make):
        if name in skip:
            return
        start = time.perf_counter()
        sessions[name] = make(str(work / f"{name}-opt.onnx") if opts.ops else None)
        if opts.ops:
            optimized[name] = str(work / f"{name}-opt.onnx")
        print(f"{name}: session in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    # (a) plain sessions over the files
    add("a.qdyn-plain", lambda o: ort.InferenceSession(str(qdyn), plain_options(optimized=o), providers=["CPUExecutionProvider"]))
    add("a.ours-plain", lambda o: ort.InferenceSession(str(ours), plain_options(optimized=o), providers=["CPUExecutionProvider"]))
    add("a.ours-plain-nopp", lambda o: ort.InferenceSession(str(ours), plain_options(prepack=False, optimized=o),
                                                            providers=["CPUExecutionProvider"]))
    # (b) shmengine's shared-weights sessions over the same file
    store = WeightStore.load(prepared.models)
    entry = store.catalog["model"]
    buffer = store.segment.buffer

    import shmengine.runtime.sessions as sessions_module

    base_options = sessions_module._base_options

    def shm(settings, save=None):
        def make(o):
            def options_with_dump(s):
                so = base_options(s)
                if o:
                    so.optimized_model_filepath = o
                    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                os.path.basename(o) + ".data")
                    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
                return so

            sessions_module._base_options = options_with_dump
            try:
                if save:
                    create_session(entry, buffer, settings, save_prepacked_to=save)
                    settings2 = SessionSettings(prepack_weights=True, prepacked_models={"model": save})
                    sessions_module._base_options = base_options
                    return create_session(entry, buffer, settings2)
                return create_session(entry, buffer, settings)
            finally:
                sessions_module._base_options = base_options

        return make

    add("b.shm-nopp", shm(SessionSettings(prepack_weights=False)))
    add("b.shm-pp-flag", shm(SessionSettings(prepack_weights=True)))
    add("b.shm-pp-file", shm(SessionSettings(prepack_weights=True), save=str(Path("/dev/shm") / f"int8iso-{os.getpid()}.onnx")))

    if opts.ops:
        names = list(optimized)
        counts = {n: op_counts(optimized[n]) for n in names if os.path.exists(optimized[n])}
        ops = sorted({op for c in counts.values() for op in c})
        print(f"{'op':<28}" + "".join(f"{n[:16]:>17}" for n in counts))
        for op in ops:
            print(f"{op:<28}" + "".join(f"{counts[n].get(op, 0):>17}" for n in counts))

    rng = np.random.default_rng(0)
    prompts = rng.integers(2, 50000, size=(opts.batch, opts.prompt_length)).astype(np.int64)
    prompts[:, 0] = 0  # <|endoftext|> first, as bench_generate's prompts
    for s in sessions.values():
        greedy(s, prompts[:, :4], 2)  # warm-up

    # (b') shmengine's decoding loop in this process, over the prepacked-file session
    decoders = {}
    if "b.shm-pp-file" in sessions and "b.decode-pp-file" not in skip:
        from shmengine.decode.decoding import DecodingOptions, decode
        from shmengine.decode.steppers import DecoderOnlyStepper

        session = sessions["b.shm-pp-file"]

        def run_decode(prompts_, new_tokens):
            options = DecodingOptions(max_new_tokens=new_tokens, end_ids=(0,), min_new_tokens=new_tokens)
            start = time.perf_counter()
            results = decode(DecoderOnlyStepper(session, 0), prompts_.tolist(), options)
            return np.array([r.ids[0] for r in results]), time.perf_counter() - start

        decoders["b.decode-pp-file"] = run_decode

    # (c) engines, same prompts as token strings
    engines = {}
    if "c.shm-gen" not in skip:
        engines["c.shm-gen"] = shmengine.Generator(root / "onnx", device="cpu", inter_threads=1, intra_threads=1,
                                                   compute_type="int8")
    if "c.shm-gen-nopp" not in skip:
        engines["c.shm-gen-nopp"] = shmengine.Generator(root / "onnx", device="cpu", inter_threads=1, intra_threads=1,
                                                        compute_type="int8", prepack_weights=False)
    if "c.ct2" not in skip:
        import ctranslate2

        engines["c.ct2"] = ctranslate2.Generator(str(root / "ct2"), device="cpu", inter_threads=1, intra_threads=1,
                                                 compute_type="int8")
    words = [["<|endoftext|>"] + [f"t{int(t)}" for t in row[1:]] for row in prompts]

    def run_engine(model):
        start = time.perf_counter()
        results = model.generate_batch(words, max_batch_size=opts.batch, beam_size=1, max_length=opts.new_tokens,
                                       min_length=opts.new_tokens, include_prompt_in_result=False)
        elapsed = time.perf_counter() - start
        return np.array([r.sequences_ids[0] for r in results]), elapsed

    for m in engines.values():
        run_engine(m)

    times = collections.defaultdict(list)
    tokens = {}
    for _ in range(opts.repeats):
        for name, s in sessions.items():
            tokens[name], t = greedy(s, prompts, opts.new_tokens)
            times[name].append(t)
        for name, d in decoders.items():
            tokens[name], t = d(prompts, opts.new_tokens)
            times[name].append(t)
        for name, m in engines.items():
            tokens[name], t = run_engine(m)
            times[name].append(t)
    n = opts.batch * opts.new_tokens
    ref_name = "c.ct2" if "c.ct2" in times else next(iter(times))
    ref = n / statistics.median(times[ref_name])
    ours_ref = tokens.get("a.ours-plain")
    print(f"\nbatch {opts.batch}, prompt {opts.prompt_length}, {opts.new_tokens} new tokens, intra 1, "
          f"median of {opts.repeats}")
    print(f"{'variant':<18}{'tok/s':>9}{'/' + ref_name:>10}{'same tokens as a.ours-plain':>30}")
    for name in times:
        rate = n / statistics.median(times[name])
        same = "-" if ours_ref is None or tokens[name].shape != ours_ref.shape else f"{(tokens[name] == ours_ref).mean():.0%}"
        print(f"{name:<18}{rate:>9.1f}{rate / ref:>9.2f}x{same:>30}")
    for m in engines.values():
        close = getattr(m, "close", None)
        if close:
            close()
    store.close()
    for p in Path("/dev/shm").glob(f"int8iso-{os.getpid()}.onnx*"):
        p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
