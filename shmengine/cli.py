"""``shmengine-run``: the launcher.

    shmengine-run info                     parallel settings of this machine and of an engine
    shmengine-run run [MODEL]              run a model over inputs (an .npz file, or synthetic)
    shmengine-run bench [MODEL]            throughput and latency of one inter x intra split
    shmengine-run tune [MODEL]             sweep every split, plot it, name the best

With no MODEL the bundled default model is used.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _default_model() -> Path:
    try:
        from shmengine.models import default_model_path
    except ImportError:  # running from a source checkout that is not installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from models import default_model_path
    return default_model_path()


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="ONNX file or model directory (default: the bundled model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--device-index", type=int, nargs="+", default=[0], help="GPU ids (cuda only)")
    parser.add_argument("--inter-threads", type=int, default=1, help="worker processes (per GPU)")
    parser.add_argument("--intra-threads", type=int, default=0, help="threads per worker (0 = cores / workers)")
    parser.add_argument("--max-queued-batches", type=int, default=0, help="0 = 4 x workers, -1 = unlimited")
    parser.add_argument("--prepack-weights", action="store_true", help="let ORT prepack weights (private copies)")


def _engine(args):
    from .engine import Engine

    return Engine(
        args.model or _default_model(),
        args.device,
        device_index=args.device_index if len(args.device_index) > 1 else args.device_index[0],
        inter_threads=args.inter_threads,
        intra_threads=args.intra_threads,
        max_queued_batches=args.max_queued_batches,
        prepack_weights=args.prepack_weights,
    )


def _cmd_info(args) -> int:
    from .threads import parallel_info

    if args.no_engine:
        print(parallel_info())
        return 0
    with _engine(args) as engine:
        print(engine.parallel_info())
        print(f"Model: {args.model or _default_model()}, {engine.weights_nbytes / 2**20:.1f} MiB of shared weights")
    return 0


def _split_rows(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1:
        raise SystemExit(f"error: the input arrays disagree on their number of rows: {sorted(rows)}")
    n = rows.pop()
    return [{k: a[i : i + batch_size] for k, a in arrays.items()} for i in range(0, n, batch_size)]


def _cmd_run(args) -> int:
    from .tuning import synthetic_feeds

    with _engine(args) as engine:
        if args.input:
            with np.load(args.input) as data:
                arrays = {k: data[k] for k in data.files}
        else:
            arrays = synthetic_feeds(engine.inputs, args.examples, seed=args.seed)
        batches = _split_rows(arrays, args.batch_size)
        start = time.perf_counter()
        futures = engine.run_batch(batches, asynchronous=True)
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - start
        outputs = {name: np.concatenate([r[name] for r in results]) for name in results[0]} if results else {}
        if args.output:
            np.savez(args.output, **outputs)
        examples = sum(len(next(iter(b.values()))) for b in batches)
        for name, value in outputs.items():
            print(f"{name}: shape {value.shape}, dtype {value.dtype}, mean {float(np.mean(value)):.6g}")
        print(
            f"{examples} examples in {len(batches)} batches, {elapsed:.3f} s, {examples / elapsed:.1f} examples/s "
            f"({engine.num_workers} workers x {engine.intra_threads} intra threads)",
            file=sys.stderr,
        )
    return 0


def _cmd_bench(args) -> int:
    from .tuning import measure, synthetic_feeds

    with _engine(args) as engine:
        feeds = synthetic_feeds(engine.inputs, args.batch_size)
        rate, latencies = measure(engine, feeds, batches=args.batches, latency_runs=args.latency_runs)
        print(
            f"{engine.num_workers} workers x {engine.intra_threads} intra threads, batch size {args.batch_size}: "
            f"{rate:.1f} batches/s ({rate * args.batch_size:.1f} examples/s); latency median "
            f"{np.median(latencies) * 1e3:.2f} ms, p95 {np.percentile(latencies, 95) * 1e3:.2f} ms"
        )
    return 0


def _cmd_tune(args) -> int:
    from . import tuning

    model = args.model or _default_model()
    results = tuning.sweep(
        model,
        batch_size=args.batch_size,
        batches=args.batches,
        latency_runs=args.latency_runs,
        progress=lambda r: print(
            f"  {r.inter_threads}x{r.intra_threads}: {r.batches_per_s:.1f} batches/s, "
            f"p50 {r.latency_median_ms:.2f} ms",
            file=sys.stderr,
        ),
    )
    print(tuning.format_table(results))
    if args.plot and tuning.plot(results, args.plot, title=f"shmengine thread sweep: {Path(model).name}"):
        print(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shmengine-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parallel settings of this machine and of an engine's workers")
    _add_engine_options(info)
    info.add_argument("--no-engine", action="store_true", help="only the machine, start no workers")
    info.set_defaults(func=_cmd_info)

    run = commands.add_parser("run", help="run a model over inputs")
    _add_engine_options(run)
    run.add_argument("--input", help=".npz file of input arrays (rows are examples); default: synthetic")
    run.add_argument("--output", help=".npz file to write the outputs to")
    run.add_argument("--examples", type=int, default=4096, help="synthetic examples when no --input")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=_cmd_run)

    bench = commands.add_parser("bench", help="throughput and latency of one split")
    _add_engine_options(bench)
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--batches", type=int, default=200)
    bench.add_argument("--latency-runs", type=int, default=50)
    bench.set_defaults(func=_cmd_bench)

    tune = commands.add_parser("tune", help="sweep inter x intra splits and name the best")
    tune.add_argument("model", nargs="?", help="ONNX file or model directory (default: the bundled model)")
    tune.add_argument("--batch-size", type=int, default=8)
    tune.add_argument("--batches", type=int, default=100)
    tune.add_argument("--latency-runs", type=int, default=30)
    tune.add_argument("--plot", default="shmengine-tune.png", help="PNG to write ('' for none)")
    tune.set_defaults(func=_cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from .errors import ShmEngineError

    try:
        return args.func(args)
    except (ShmEngineError, ValueError, FileNotFoundError) as exc:
        print(f"shmengine-run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
