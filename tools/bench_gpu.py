#!/usr/bin/env python3
"""GPU generation: shmengine ``device="cuda"`` against a plain ONNX Runtime IOBinding loop and
transformers ``generate`` on the same export, in one run, with a correctness gate.

    python3 tools/bench_gpu.py --model DIR [--bundled] [--sections correct,reduce,strategies,speed,memory,share,faults]
                                [--strategies graph,helper,...] [--out OUT]

``DIR`` is an Optimum decoder export (``model.onnx`` + json files; on the device machine, one
filled by ``shared/device/strip_weights.py``). Sections:

* ``correct``: shmengine's greedy tokens on CUDA equal the plain loop's on the same weights
  (batch 8, 32 new tokens); with ``--bundled``, the bundled number models give the same tokens
  and scores on CUDA as on CPU (Generator and Translator; greedy, beam 4, sampling with a seed,
  scoring). Any mismatch makes the script exit 1.
* ``speed``: tokens/s at batch 1 / 8 / 32, greedy and beam 4, 16-token prompts, 32 new tokens:
  the plain loop (greedy), transformers fp32 / fp16 (both searches), shmengine with 1 and 2
  workers on one GPU; the ratios are printed last.
* ``reduce``: per-call cost of the logits' trip to the host against the runner's device-side
  ArgMax / TopK reductions, at batch 32.
* ``memory``: GPU memory of the worker processes (nvidia-smi, per pid) with 1, 2 and 3 workers
  after a batch-32 generation, against the target one worker + (N - 1) x (one worker - weights).
* ``faults``: on a GPU shared by 2 workers: no CUDA in the supervisor or the fork servers, each
  worker sees only its GPU, a worker and the weight holder killed mid-run give the same tokens,
  an out-of-memory batch fails with DeviceOutOfMemoryError and the pool serves on.
* ``share``: whether ONNX Runtime uses device memory handed to ``SessionOptions.add_initializer``
  (an OrtValue from ``OrtValue.from_dlpack`` over a cupy array) in place, measured as the
  device memory a session takes at creation, against the same session over host weights.

Every figure comes from this run; nothing is compared across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_LEN, NEW_TOKENS = 16, 32
FAILURES: list[str] = []


def prompts_for(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab, size=(batch, PROMPT_LEN)).tolist()


# -- the baseline: a plain ONNX Runtime loop with the KV cache bound on the device ----------------


class PlainLoop:
    """What a user writes by hand: the Optimum export, IOBinding, greedy argmax in numpy."""

    def __init__(self, model_dir: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CUDAExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values")]

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        ids = np.array(prompts, dtype=np.int64)
        batch, length = ids.shape
        mask = np.ones((batch, length), dtype=np.int64)
        positions = np.arange(length, dtype=np.int64)[None].repeat(batch, 0)
        cache = {}
        for name in self.past:
            shape = [batch if i == 0 else (0 if i == 2 else d) for i, d in enumerate(self.inputs[name].shape)]
            cache[name] = np.zeros(shape, dtype=np.float32)
        out: list[list[int]] = [[] for _ in range(batch)]
        for _ in range(new_tokens):
            binding = self.session.io_binding()
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("attention_mask", mask)
            if "position_ids" in self.inputs:
                binding.bind_cpu_input("position_ids", positions)
            for name, value in cache.items():
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(name, value)
                else:
                    binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits", "cpu")
            presents = ["present" + n[len("past_key_values") :] for n in self.past]
            for name in presents:
                binding.bind_output(name, "cuda", 0)
            self.session.run_with_iobinding(binding)
            values = binding.get_outputs()
            logits = values[0].numpy()[:, -1, :]
            cache = dict(zip(self.past, values[1:]))
            token = np.argmax(logits, axis=-1)
            for row, t in enumerate(token.tolist()):
                out[row].append(t)
            ids = token[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        return out


# -- helpers ----------------------------------------------------------------------------------------


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB of device memory per process, as nvidia-smi reports it."""
    text = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False,
    ).stdout
    usage = {}
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            usage[int(parts[0])] = int(parts[1])
    return usage


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: arena growth, cuDNN/cuBLAS plans
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def race(contenders: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each contender, timed in interleaved rounds (A B C A B C ...)
    after one warm-up call each, so that a drift of the machine (clocks, another process) falls
    on every contender alike rather than on whichever ran last."""
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def shm_generate(gen, prompts, beam: int, copies: int = 1) -> int:
    """Submit ``copies`` batches at once (so several workers can share them); returns tokens decoded."""
    futures = []
    for _ in range(copies):
        futures += gen.generate_batch(
            prompts, max_length=NEW_TOKENS, beam_size=beam, include_prompt_in_result=False, asynchronous=True
        )
    return sum(len(f.result().sequences_ids[0]) for f in futures)


# -- sections ---------------------------------------------------------------------------------------


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def section_correct(model_dir: Path, bundled: bool) -> None:
    import shmengine

    print("correctness", flush=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = prompts_for(8, vocab, seed=1)
    plain = PlainLoop(model_dir).generate(prompts, NEW_TOKENS)
    for workers in (1, 2):  # 2 workers on one GPU map one device copy of the weights
        with shmengine.Generator(str(model_dir), device="cuda", inter_threads=workers) as gen:
            futures = gen.generate_batch(
                prompts * workers, max_length=NEW_TOKENS, include_prompt_in_result=False, max_batch_size=8, asynchronous=True
            )
            ours = [f.result().sequences_ids[0] for f in futures]
        same = sum(a == b for a, b in zip(ours, plain * workers))
        check(f"greedy tokens, shmengine cuda ({workers} worker(s)) == plain IOBinding loop (batch 8)", same == len(ours),
              f"{same}/{len(ours)} rows")
    if not bundled:
        return
    with open(ROOT / "models" / "numbers_heldout.tsv", encoding="utf-8") as f:
        numbers = [line.split("\t")[0] for line in f if line.strip()][:96]
    for kind in ("gpt2", "marian"):
        results = {}
        for device in ("cpu", "cuda"):
            if kind == "gpt2":
                with shmengine.Generator(str(ROOT / "models/numbers-gpt2"), device=device) as model:
                    bos = model.vocabulary.id_to_token[model.model.bos_id]
                    starts = [[bos, *n, "="] for n in numbers]

                    def run(model=model, starts=starts, **kw):
                        found = model.generate_batch(starts, max_length=24, include_prompt_in_result=False, **kw)
                        return [r.sequences[0] for r in found]

                    results[device] = {
                        "greedy": run(),
                        "beam 4": run(beam_size=4),
                        "sampling (seed 7)": _seeded(lambda run=run: run(sampling_topk=5, sampling_temperature=0.8)),
                        "scores": [r.log_probs for r in model.score_batch(starts)],
                    }
            else:
                with shmengine.Translator(str(ROOT / "models/numbers-marian"), device=device) as model:
                    sources = [[*n, "</s>"] for n in numbers]

                    def run(model=model, sources=sources, **kw):
                        return [r.hypotheses[0] for r in model.translate_batch(sources, **kw)]

                    greedy = run(beam_size=1)
                    results[device] = {
                        "greedy": greedy,
                        "beam 4": run(beam_size=4),
                        "scores": [r.log_probs for r in model.score_batch(sources, greedy)],
                    }
        for search in ("greedy", "beam 4", "sampling (seed 7)"):
            a, b = results["cpu"].get(search), results["cuda"].get(search)
            if a is None:
                continue
            check(f"{kind} {search}: cuda tokens == cpu tokens", a == b, f"{sum(x == y for x, y in zip(a, b))}/{len(a)} rows")
        # ORT's CUDA EP runs float32 MatMuls in TF32 by default (10-bit mantissa, ~1e-3 relative),
        # as a plain ORT user gets it: log-probabilities agree to about 1e-2, not to 1e-5.
        diffs = [abs(x - y) for sa, sb in zip(results["cpu"]["scores"], results["cuda"]["scores"]) for x, y in zip(sa, sb)]
        check(f"{kind} scores: cuda within 1e-2 of cpu (TF32)", max(diffs) < 1e-2, f"max |diff| {max(diffs):.2e}")


def _seeded(fn):
    import shmengine

    shmengine.set_random_seed(7)
    return fn()


def section_speed(model_dir: Path, rows: list[dict]) -> None:
    import shmengine

    print("speed", flush=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    plain = PlainLoop(model_dir)
    hf = {}
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir))
        for dtype_name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            torch.manual_seed(0)
            hf[dtype_name] = AutoModelForCausalLM.from_config(config).to("cuda", dtype).eval()
    except Exception as exc:  # the baseline is optional; say why it is missing
        print(f"  transformers baseline unavailable: {exc}", flush=True)

    def hf_generate(model, prompts, beam):
        import torch

        ids = torch.tensor(prompts, device="cuda")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, num_beams=beam, pad_token_id=0)
        torch.cuda.synchronize()
        return out

    gens = {n: shmengine.Generator(str(model_dir), device="cuda", inter_threads=n) for n in (1, 2)}
    try:
        gens["1-fp16"] = shmengine.Generator(str(model_dir), device="cuda", compute_type="float16")
    except Exception as exc:
        print(f"  float16 unavailable: {exc}", flush=True)
    try:
        for beam in (1, 4):
            for batch in (1, 8, 32):
                prompts = prompts_for(batch, vocab)
                row = {"batch": batch, "search": "greedy" if beam == 1 else "beam 4"}
                contenders, tokens = {}, {}
                if beam == 1:
                    contenders["plain"] = lambda p=prompts: plain.generate(p, NEW_TOKENS)
                    tokens["plain"] = batch * NEW_TOKENS
                for name, model in hf.items():
                    contenders[f"hf-{name}"] = lambda m=model, p=prompts, b=beam: hf_generate(m, p, b)
                    tokens[f"hf-{name}"] = batch * NEW_TOKENS
                boxes = {}
                for name, gen in gens.items():
                    box = boxes[f"shm{name}"] = {}
                    copies = 2 * gen.num_workers

                    def go(g=gen, box=box, p=prompts, b=beam, copies=copies):
                        box["tokens"] = shm_generate(g, p, b, copies=copies)

                    contenders[f"shm{name}"] = go
                    tokens[f"shm{name}"] = copies * batch * NEW_TOKENS
                seconds = race(contenders, rounds=7 if batch < 32 else 5)
                for name, t in seconds.items():
                    row[name] = tokens[name] / t
                    if name in boxes and boxes[name]["tokens"] != tokens[name]:
                        print(f"  note: {name} decoded {boxes[name]['tokens']} tokens, not {tokens[name]} (an end token)")
                rows.append(row)
                print("  " + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    finally:
        for gen in gens.values():
            gen.close()


# name -> the environment the workers of that Generator get (read when they start)
STRATEGIES = {
    "graph": {},  # the default: the step's top-k in the model's own run (step_top), a CUDA stream per session
    "shared-stream": {"SHMENGINE_CUDA_STREAM": "shared"},  # one stream per worker, device-only runs unsynced
    "host": {"SHMENGINE_DEVICE_REDUCE": "host"},  # the step's logits to the host, reduced by numpy
    # the step's top-k by the helper graph, a second ORT run, as before the model's graph
    # computed it itself (graph_edits.expose_step_top)
    "helper": {"SHMENGINE_DEVICE_REDUCE": "helper"},
    # the default with 4 intra-op threads per worker instead of 1 (the plain loop runs ORT's
    # default pool: whether the CPU-side nodes of a CUDA step gain from threads)
    "intra-4": {},
}
# name -> Generator arguments of that strategy beyond device="cuda"
STRATEGY_OPTIONS = {"intra-4": {"intra_threads": 4}}


def section_strategies(model_dir: Path, rows: list[dict], names: list[str]) -> None:
    """shmengine, 1 worker, in each of the STRATEGIES ``names``, against the plain loop: the
    comparison that picks the bound runner's defaults."""
    import shmengine

    print("strategies", flush=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    plain = PlainLoop(model_dir)
    gens = {}
    for strategy in names:
        env = STRATEGIES[strategy]
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # read by the workers this Generator forks
        try:
            gens[strategy] = shmengine.Generator(str(model_dir), device="cuda", **STRATEGY_OPTIONS.get(strategy, {}))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
    try:
        for beam in (1, 4):
            for batch in (1, 8, 32):
                prompts = prompts_for(batch, vocab)
                row = {"batch": batch, "search": "greedy" if beam == 1 else "beam 4"}
                if beam != 1 and batch == 1:
                    continue  # a beam at batch 1 is dominated by the step itself
                contenders = {}
                if beam == 1:
                    contenders["plain"] = lambda p=prompts: plain.generate(p, NEW_TOKENS)
                for strategy, gen in gens.items():
                    contenders[f"shm-{strategy}"] = lambda g=gen, p=prompts, b=beam: shm_generate(g, p, b, copies=2)
                for name, t in race(contenders, rounds=9).items():
                    row[name] = (batch if name == "plain" else 2 * batch) * NEW_TOKENS / t
                rows.append(row)
                print("  " + json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    finally:
        for gen in gens.values():
            gen.close()


def section_memory(model_dir: Path, out: list[str]) -> None:
    import shmengine

    print("memory", flush=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = prompts_for(32, vocab)
    measured = {}
    weights_mib = 0.0
    for n in (1, 2, 3):
        with shmengine.Generator(str(model_dir), device="cuda", inter_threads=n) as gen:
            weights_mib = gen.weights_nbytes / 2**20
            shm_generate(gen, prompts, 1, copies=n)
            usage = gpu_memory_by_pid()
            measured[n] = sum(usage.get(pid, 0) for pid in gen.worker_pids)
    one = measured[1]
    for n, mib in measured.items():
        target = one + (n - 1) * (one - weights_mib)
        line = f"{n} worker(s): {mib} MiB on the GPU (weights {weights_mib:.0f} MiB; target <= {target:.0f} MiB)"
        out.append(line)
        print("  " + line, flush=True)


_SHARE_CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
mode, model_dir = sys.argv[2], sys.argv[3]
import onnxruntime as ort
from shmengine.model.weights import WeightStore, storage_dtype
from shmengine.runtime.sessions import SessionSettings, _base_options
store = WeightStore.load({"model": model_dir + "/model.onnx"})
entry = store.catalog["model"]
import cupy as cp
cp.cuda.Device(0).use()
def free():
    cp.cuda.runtime.deviceSynchronize()
    return cp.cuda.runtime.memGetInfo()[0]
keep = []
options = _base_options(SessionSettings())
arrays = []
for t in entry.tensors:
    dt = storage_dtype(t.elem_type)
    a = np.frombuffer(store.segment.buffer, dtype=dt, count=t.nbytes // dt.itemsize, offset=t.offset).reshape(t.shape)
    arrays.append((t.name, a))
if mode == "device":
    device_arrays = [(n, cp.asarray(a)) for n, a in arrays]
    keep.append(device_arrays)
before = free()
for n, a in (device_arrays if mode == "device" else arrays):
    v = ort.OrtValue.from_dlpack(a) if mode == "device" else ort.OrtValue.ortvalue_from_numpy(a)
    options.add_initializer(n, v); keep.append(v)
s = ort.InferenceSession(entry.skeleton, options, providers=[("CUDAExecutionProvider", {"device_id": "0"})])
after = free()
print(json.dumps({"mode": mode, "session_mib": (before - after) / 2**20, "weights_mib": store.nbytes / 2**20}))
"""


def section_share(model_dir: Path, out: list[str]) -> None:
    print("share", flush=True)
    for mode in ("host", "device"):
        proc = subprocess.run([sys.executable, "-c", _SHARE_CHILD, str(ROOT), mode, str(model_dir)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            line = f"{mode}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        else:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            line = (f"add_initializer over {mode} weights: session creation took {r['session_mib']:.0f} MiB of device memory "
                    f"(weights {r['weights_mib']:.0f} MiB)")
        out.append(line)
        print("  " + line, flush=True)


def section_reduce(model_dir: Path, notes: list[str]) -> None:
    """Per-call cost of what crosses to the host after a step at batch 32: the full logits, or
    the runner's device-side reductions (ArgMax for greedy, TopK for beam candidates)."""
    import onnxruntime as ort

    from shmengine.decode.runners import BoundRunner
    from shmengine.runtime.target import WorkerTarget

    print("reduce", flush=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    runner = BoundRunner(WorkerTarget(device="cuda"), (("CUDAExecutionProvider", {"device_id": "0"}),))
    host = np.random.default_rng(0).standard_normal((32, 1, vocab)).astype(np.float32)
    logits = ort.OrtValue.ortvalue_from_numpy(host, "cuda", 0)
    for name, fn in (
        ("logits to host (numpy)", lambda: logits.numpy()),
        ("argmax + normaliser on device (k=1)", lambda: runner.top(logits, 1)),
        ("top-8 + normaliser on device (TopK)", lambda: runner.top(logits, 8)),
    ):
        seconds = timed(fn, 50)
        line = f"batch 32 x {vocab}: {name}: {seconds * 1e3:.3f} ms per call"
        notes.append(line)
        print("  " + line, flush=True)
    # One op at a time, each its own graph run to the end (outputs to the host, so the run's
    # time includes the GPU's): which reduction costs the milliseconds.
    from onnx import TensorProto, helper

    from shmengine.decode.runners import _model

    def single(op_nodes, out_type, out_shape, extra_inits=()):
        head = [
            helper.make_node("Constant", [], ["axis1"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
            helper.make_node("Squeeze", ["logits", "axis1"], ["x"]),
        ]
        graph_in = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", 1, "vocab"])]
        model = _model(head + list(extra_inits) + op_nodes, graph_in, [helper.make_tensor_value_info("y", out_type, out_shape)])
        return ort.InferenceSession(model.SerializeToString(), providers=[("CUDAExecutionProvider", {"device_id": "0"})])

    ones = helper.make_node("Constant", [], ["ones"], value=helper.make_tensor("o", TensorProto.FLOAT, [vocab, 1], [1.0] * vocab))
    m1 = helper.make_node("Constant", [], ["m1"], value=helper.make_tensor("m1v", TensorProto.INT64, [1], [-1]))
    k8 = helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k8", TensorProto.INT64, [1], [8]))
    variants = {
        "ReduceMax": ([helper.make_node("ReduceMax", ["x"], ["y"], axes=[-1], keepdims=1)], TensorProto.FLOAT, None, ()),
        "ReduceSum": ([helper.make_node("ReduceSum", ["x", "m1"], ["y"], keepdims=1)], TensorProto.FLOAT, None, (m1,)),
        "ArgMax": ([helper.make_node("ArgMax", ["x"], ["y"], axis=-1, keepdims=1)], TensorProto.INT64, None, ()),
        "TopK 8 (ids)": ([helper.make_node("TopK", ["x", "k"], ["v", "y"], axis=-1)], TensorProto.INT64, None, (k8,)),
        "ReduceLogSumExp": ([helper.make_node("ReduceLogSumExp", ["x"], ["y"], axes=[-1], keepdims=1)], TensorProto.FLOAT, None, ()),
        "Exp + MatMul(ones)": ([helper.make_node("Exp", ["x"], ["e"]), helper.make_node("MatMul", ["e", "ones"], ["y"])],
                               TensorProto.FLOAT, None, (ones,)),
    }
    for name, (op_nodes, out_type, shape, inits) in variants.items():
        try:
            session = single(op_nodes, out_type, shape, inits)

            def go(session=session):
                binding = session.io_binding()
                binding.bind_ortvalue_input("logits", logits)
                binding.bind_output("y", "cpu")
                session.run_with_iobinding(binding)
                return binding.get_outputs()[0].numpy()

            line = f"batch 32 x {vocab}: {name} alone: {timed(go, 30) * 1e3:.3f} ms per run"
        except Exception as exc:
            line = f"{name}: failed: {str(exc).splitlines()[0][:160]}"
        notes.append(line)
        print("  " + line, flush=True)
    # Where the helper graph's time goes: ORT's own profiler, node by node, with the provider
    # each node ran on.
    from shmengine.decode.runners import _top_graph

    for argmax in (True, False):
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.log_severity_level = 3
        session = ort.InferenceSession(_top_graph("tensor(float)", argmax).SerializeToString(), options,
                                       providers=[("CUDAExecutionProvider", {"device_id": "0"})])
        for _ in range(30):
            binding = session.io_binding()
            binding.bind_ortvalue_input("logits", logits)
            if not argmax:
                binding.bind_cpu_input("k", np.array([8], dtype=np.int64))
            for out_name in ("values", "ids", "normalizer"):
                binding.bind_output(out_name, "cpu")
            session.run_with_iobinding(binding)
        events = json.loads(Path(session.end_profiling()).read_text())
        per_node: dict[str, list] = {}
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                key = f"{event['args'].get('op_name')}@{event['args'].get('provider', '?').replace('ExecutionProvider', '')}"
                per_node.setdefault(key, []).append(event["dur"])
            elif event.get("cat") == "Session" and event["name"] == "model_run":
                per_node.setdefault("model_run (whole)", []).append(event["dur"])
        summary = ", ".join(f"{k} {np.median(v):.0f}us" for k, v in per_node.items())
        line = f"profile of the {'argmax' if argmax else 'top-8'} graph (median per run): {summary}"
        notes.append(line)
        print("  " + line, flush=True)


def section_faults(model_dir: Path, notes: list[str]) -> None:
    """What must hold when things go wrong on a GPU (2 workers sharing one device copy):
    CUDA is never initialised in the supervisor or the fork servers; each worker sees only its
    GPU; a worker killed mid-batch and the weight holder killed mid-run both give the same
    tokens; a CUDA out-of-memory fails that batch naming the device and the rows, and the pool
    serves on. Run it in a process of its own (``--sections faults``): the CUDA-free check needs
    a supervisor that has not used the GPU itself, as the other sections do."""
    import signal

    import shmengine
    from shmengine.runtime.placement import cuda_visible_devices

    print("faults", flush=True)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = prompts_for(8, vocab, seed=3)

    def run(gen, batch, asynchronous=False):
        return gen.generate_batch(batch, max_length=NEW_TOKENS, include_prompt_in_result=False, max_batch_size=8,
                                  asynchronous=asynchronous)

    def tokens(results):
        return [(r.result(timeout=300) if hasattr(r, "result") else r).sequences_ids[0] for r in results]

    with shmengine.Generator(str(model_dir), device="cuda", inter_threads=2) as gen:
        want = tokens(run(gen, prompts))
        pool, holders = gen._pool, gen._weight_holders
        check("the two workers share one device copy (a weight holder runs)", len(holders) == 1)
        usage = gpu_memory_by_pid()
        cuda_free = {os.getpid(), pool._fork_server.process.pid, *(h._fork_server.process.pid for h in holders)}
        check("no CUDA context in the supervisor or the fork servers", not cuda_free & set(usage),
              f"GPU processes {sorted(usage)}, supervisor and fork servers {sorted(cuda_free)}")
        seen = [pool.worker_info(slot)["environment"].get("CUDA_VISIBLE_DEVICES") for slot in range(pool.size)]
        check("each worker sees only its GPU", seen == [cuda_visible_devices(0)] * pool.size, str(seen))

        def kill_mid_run(pid_of, what):
            futures = run(gen, prompts * 4, asynchronous=True)
            time.sleep(0.3)
            pid = pid_of()
            os.kill(pid, signal.SIGKILL)
            got = tokens(futures)
            check(f"{what} killed mid-run (pid {pid}): the same tokens", got == want * 4)

        kill_mid_run(lambda: pool.worker_pids()[0], "a GPU worker")
        kill_mid_run(lambda: holders[0].worker_pids()[0], "the weight holder")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (len(pool.worker_pids()) == 2 and holders[0].worker_pids()):
            time.sleep(0.2)
        check("after the holder's death: the same tokens again", tokens(run(gen, prompts)) == want)
        usage = gpu_memory_by_pid()
        mib = {pid: usage.get(pid) for pid in pool.worker_pids() + holders[0].worker_pids()}
        notes.append(f"faults: GPU MiB per process after the holder's restart (workers, then holder): {mib}")

        # Fill the GPU from this process (the CUDA-free check is done) but for ~3 GiB: a batch of
        # 512 x 900 tokens then needs more than is left. (A batch big enough to exhaust 139 GiB on
        # its own trips ORT's 2^31-element limits first, which is another error.)
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
        hog = cupy.empty(max(free - (3 << 30), 0), dtype=cupy.uint8)
        rows, length = 512, 900
        try:
            gen.generate_batch([[1] * length] * rows, max_length=1, max_batch_size=rows, include_prompt_in_result=False)
            check("a CUDA out-of-memory is a DeviceOutOfMemoryError", False, f"{rows} x {length} ran")
        except shmengine.DeviceOutOfMemoryError as exc:
            check("a CUDA out-of-memory is a DeviceOutOfMemoryError naming the device and the rows",
                  "CUDA device 0" in str(exc) and f"{rows} rows" in str(exc), str(exc)[:300])
        except Exception as exc:
            check("a CUDA out-of-memory is a DeviceOutOfMemoryError", False, f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            del hog
            cupy.get_default_memory_pool().free_all_blocks()
        check("the pool serves after the out-of-memory: the same tokens", tokens(run(gen, prompts)) == want)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--bundled", action="store_true", help="also check the bundled models on CUDA against CPU")
    parser.add_argument("--sections", default="correct,reduce,speed,memory,share")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"of {', '.join(STRATEGIES)}")
    args = parser.parse_args()
    sections = args.sections.split(",")
    rows: list[dict] = []
    notes: list[str] = []
    if "correct" in sections:
        section_correct(args.model, args.bundled)
    if "reduce" in sections:
        section_reduce(args.model, notes)
    if "share" in sections:
        section_share(args.model, notes)
    if "memory" in sections:
        section_memory(args.model, notes)
    strategy_rows: list[dict] = []
    if "strategies" in sections:
        strategies = args.strategies.split(",")
        unknown = [n for n in strategies if n not in STRATEGIES]
        if unknown:
            parser.error(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
        section_strategies(args.model, strategy_rows, strategies)
    if "speed" in sections:
        section_speed(args.model, rows)
    if "faults" in sections:
        section_faults(args.model, notes)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_gpu.json").write_text(
            json.dumps({"rows": rows, "strategy_rows": strategy_rows, "notes": notes, "failures": FAILURES}, indent=1)
        )
    if rows:
        print("\n| batch | search | plain loop | hf fp32 | hf fp16 | shm 1w | shm 2w | shm 1w fp16 | shm1/plain | shm1/hf32 "
              "| 2w/1w | fp16/fp32 |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            def f(key, r=r):
                return f"{r[key]:.0f}" if key in r else "-"

            def ratio(a, b, r=r):
                return f"{r[a] / r[b]:.2f}" if a in r and b in r else "-"

            print(f"| {r['batch']} | {r['search']} | {f('plain')} | {f('hf-fp32')} | {f('hf-fp16')} | {f('shm1')} | {f('shm2')} "
                  f"| {f('shm1-fp16')} | {ratio('shm1', 'plain')} | {ratio('shm1', 'hf-fp32')} | {ratio('shm2', 'shm1')} "
                  f"| {ratio('shm1-fp16', 'shm1')} |")
    if strategy_rows:
        ran = [s for s in STRATEGIES if f"shm-{s}" in strategy_rows[0]]
        print("\n| batch | search | plain loop | " + " | ".join(f"shm {s}" for s in ran) + " | "
              + " | ".join(f"{s}/plain" for s in ran) + " |")
        print("|" + " --- |" * (3 + 2 * len(ran)))
        for r in strategy_rows:
            plain_rate = r.get("plain")
            rates = " | ".join(f"{r[f'shm-{s}']:.0f}" for s in ran)
            ratios = " | ".join(f"{r[f'shm-{s}'] / plain_rate:.2f}" if plain_rate else "-" for s in ran)
            print(f"| {r['batch']} | {r['search']} | {plain_rate or 0:.0f} | {rates} | {ratios} |")
    for line in notes:
        print(line)
    if FAILURES:
        print(f"FAILED: {', '.join(FAILURES)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
