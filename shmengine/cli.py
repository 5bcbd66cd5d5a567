"""``shmengine-run``: the launcher.

    shmengine-run translate [MODEL]        translate text (stdin -> stdout, or --input/--output files)
    shmengine-run generate [MODEL]         continue each input line with a decoder-only model
    shmengine-run score [MODEL]            score --source/--target files with a seq2seq model
    shmengine-run info                     parallel settings of this machine and of an engine
    shmengine-run run [MODEL]              run any ONNX model over inputs (an .npz file, or synthetic)
    shmengine-run bench [MODEL]            throughput and latency of one inter x intra split
    shmengine-run tune [MODEL]             sweep every split, plot it, name the best

With no MODEL the bundled models are used: numbers-marian (translate, score), numbers-gpt2
(generate) and the default MLP (run, bench, tune). They write numbers in words:

    echo 1984 | shmengine-run translate        ->  one thousand nine hundred eighty four
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _bundled():
    try:
        import shmengine.models as bundled
    except ImportError:  # running from a source checkout that is not installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import models as bundled
    return bundled


def _default_model() -> Path:
    return _bundled().default_model_path()


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="ONNX file or model directory (default: the bundled model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--device-index", type=int, nargs="+", default=[0], help="GPU ids (cuda only)")
    parser.add_argument("--inter-threads", type=int, default=1, help="worker processes (per GPU)")
    parser.add_argument("--intra-threads", type=int, default=0, help="threads per worker (0 = cores / workers)")
    parser.add_argument("--max-queued-batches", type=int, default=0, help="0 = 4 x workers, -1 = unlimited")
    parser.add_argument("--prepack-weights", action="store_true", help="let ORT prepack weights (private copies)")


def _engine(args, cls=None, default=None):
    from .engine import Engine

    cls = cls or Engine
    return cls(
        args.model or default or _default_model(),
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


class _Progress:
    """``n/N lines, rate`` on stderr, redrawn in place; only when stderr is a terminal."""

    def __init__(self, total: int | None, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < 0.2 and done != self.total):
            return
        self.last_draw = now
        rate = done / max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\r{done}{of} lines, {rate:.1f} lines/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _summary(verb: str, examples: int, tokens: int, seconds: float, model) -> None:
    print(
        f"{verb} {examples} examples, {tokens} tokens in {seconds:.2f} s: {tokens / max(seconds, 1e-9):.1f} tokens/s "
        f"({model.num_workers} workers x {model.intra_threads} intra threads)",
        file=sys.stderr,
    )


def _decoding_kwargs(args) -> dict:
    kwargs = {"beam_size": args.beam_size, "num_hypotheses": 1, "length_penalty": args.length_penalty,
              "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
              "sampling_topk": args.sampling_topk, "sampling_topp": args.sampling_topp,
              "sampling_temperature": args.sampling_temperature}
    if args.seed is not None:
        from .options import set_random_seed

        set_random_seed(args.seed)
    return kwargs


def _cmd_translate(args) -> int:
    from .text import TextCodec
    from .translator import Translator

    model_dir = args.model or _bundled().bundled_model_path("numbers-marian")
    codec = TextCodec(model_dir, args.tokenize)
    options = dict(_decoding_kwargs(args), max_decoding_length=args.max_decoding_length)
    with _engine(args, Translator, model_dir) as translator:
        start = time.perf_counter()
        if args.input:
            progress = _Progress(_count_lines(args.input), True)

            def after_line(done: int) -> None:
                progress(done)
                _interrupts.check()

            stats = translator.translate_file(
                args.input, args.output or "/dev/stdout", max_batch_size=args.max_batch_size,
                source_tokenize_fn=codec.tokenize, target_detokenize_fn=codec.detokenize, progress=after_line, **options,
            )
            progress.close()
            _summary("translated", stats.num_examples, stats.num_tokens, stats.total_time_in_ms / 1000, translator)
            return 0
        interactive = sys.stdin.isatty()
        lines = (line.rstrip("\n") for line in sys.stdin)
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        examples = tokens = 0
        try:
            results = translator.translate_iterable(
                (codec.tokenize(line) for line in lines), max_batch_size=1 if interactive else args.max_batch_size, **options
            )
            for result in results:
                hypothesis = result.hypotheses[0]
                out.write(codec.detokenize(hypothesis) + "\n")
                if interactive:
                    out.flush()
                examples += 1
                tokens += len(hypothesis)
                _interrupts.check()
        finally:
            if out is not sys.stdout:
                out.close()
        _summary("translated", examples, tokens, time.perf_counter() - start, translator)
    return 0


def _cmd_generate(args) -> int:
    from .generator import Generator
    from .text import TextCodec

    model_dir = args.model or _bundled().bundled_model_path("numbers-gpt2")
    codec = TextCodec(model_dir, args.tokenize)
    with _engine(args, Generator, model_dir) as generator:
        bos = generator.model.bos_id
        bos_token = generator.vocabulary.id_to_token[bos] if bos is not None else None

        def prompt(line: str) -> list[str]:
            tokens = codec.tokenize(line)
            # a decoder starts from its bos token; add it where the tokenizer does not
            return tokens if bos_token is None or tokens[:1] == [bos_token] else [bos_token] + tokens

        source = open(args.input, encoding="utf-8") if args.input else sys.stdin
        out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        start = time.perf_counter()
        examples = tokens = 0
        try:
            prompts = (prompt(line.rstrip("\n")) for line in source)
            results = generator.generate_iterable(
                prompts, max_batch_size=args.max_batch_size, max_length=args.max_length,
                include_prompt_in_result=False, **_decoding_kwargs(args),
            )
            for result in results:
                out.write(codec.detokenize(result.sequences[0]) + "\n")
                examples += 1
                tokens += len(result.sequences[0])
                _interrupts.check()
        finally:
            for f in (source, out):
                if f not in (sys.stdin, sys.stdout):
                    f.close()
        _summary("generated for", examples, tokens, time.perf_counter() - start, generator)
    return 0


def _cmd_score(args) -> int:
    from .text import TextCodec
    from .translator import Translator

    model_dir = args.model or _bundled().bundled_model_path("numbers-marian")
    codec = TextCodec(model_dir, args.tokenize)
    with _engine(args, Translator, model_dir) as translator:
        stats = translator.score_file(
            args.source, args.target, args.output or "/dev/stdout", max_batch_size=args.max_batch_size,
            source_tokenize_fn=codec.tokenize, target_tokenize_fn=codec.tokenize,
            # called for each line just before it is written: the one place score_file lets us stop
            target_detokenize_fn=lambda tokens: (_interrupts.check(), codec.detokenize(tokens))[1],
        )
        _summary("scored", stats.num_examples, stats.num_tokens, stats.total_time_in_ms / 1000, translator)
    return 0


def _add_decoding_options(parser: argparse.ArgumentParser, beam_size: int) -> None:
    parser.add_argument("--input", help="input text file (default: stdin)")
    parser.add_argument("--output", help="output text file (default: stdout)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=beam_size)
    parser.add_argument("--length-penalty", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0)
    parser.add_argument("--sampling-topk", type=int, default=1)
    parser.add_argument("--sampling-topp", type=float, default=1.0)
    parser.add_argument("--sampling-temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--tokenize", default="model", choices=["model", "space"],
                        help="'model': the model's tokenizer.json; 'space': text is already space-separated tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shmengine-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", required=True)

    translate = commands.add_parser("translate", help="translate text with a seq2seq model")
    _add_engine_options(translate)
    _add_decoding_options(translate, beam_size=2)
    translate.add_argument("--max-decoding-length", type=int, default=256)
    translate.set_defaults(func=_cmd_translate)

    generate = commands.add_parser("generate", help="continue each input line with a decoder-only model")
    _add_engine_options(generate)
    _add_decoding_options(generate, beam_size=1)
    generate.add_argument("--max-length", type=int, default=64, help="new tokens at most")
    generate.set_defaults(func=_cmd_generate)

    score = commands.add_parser("score", help="score target lines given source lines")
    _add_engine_options(score)
    score.add_argument("--source", required=True)
    score.add_argument("--target", required=True)
    score.add_argument("--output")
    score.add_argument("--max-batch-size", type=int, default=32)
    score.add_argument("--tokenize", default="model", choices=["model", "space"])
    score.set_defaults(func=_cmd_score)

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


class _Interrupts:
    """Ctrl-C and SIGTERM stop a run between two output lines, not wherever the main thread is.

    A KeyboardInterrupt raised by the signal handler itself would land at an arbitrary point:
    inside a Condition wait that is re-taking the engine's queue lock, half-way through a
    submit. So the first signal only asks to stop; the loops call ``check()`` after each line
    they write, which raises KeyboardInterrupt there, with the engine idle and the file holding
    complete lines. A second signal raises at once, for a run stuck waiting on a long batch.
    (``kill -USR1`` prints every thread's stack to stderr, for a run that seems stuck.)
    """

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("shmengine-run: stopping after the current line (signal again to stop at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


_interrupts = _Interrupts()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from .errors import ShmEngineError

    _interrupts.install()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("shmengine-run: interrupted; output holds the lines finished so far", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head)
        sys.stderr.close()
        return 0
    except (ShmEngineError, ValueError, FileNotFoundError) as exc:
        print(f"shmengine-run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
