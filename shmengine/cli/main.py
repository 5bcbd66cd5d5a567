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
    echo 1984= | shmengine-run generate        ->  one thousand nine hundred eighty four

Decoding options left out come from the model's generation_config.json; see each command's --help.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import logging
import os
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
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: shmengine/cli/main.py
        import models as bundled
    return bundled


def _version() -> str:
    from shmengine import __version__

    return __version__


def _default_model() -> Path:
    return _bundled().default_model_path()


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="ONNX file or model directory (default: the bundled model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--device-index", type=int, nargs="+", default=[0], help="GPU ids (cuda only) (default: 0)")
    parser.add_argument("--inter-threads", type=int, default=1, help="worker processes (per GPU)")
    parser.add_argument("--intra-threads", type=int, default=0, help="threads per worker (0 = cores / workers)")
    parser.add_argument("--max-queued-batches", type=int, default=0, help="0 = 4 x workers, -1 = unlimited")
    parser.add_argument("--prepack-weights", action="store_true", default=None,
                        help="let ORT prepack weights, once, shared (default: on for an int8 compute type)")
    parser.add_argument("--compute-type", default="default",
                        help="CTranslate2's compute_type: default, auto, float32, int8 (CPU: quantized once, cached), "
                             "int8_float32, int8_float16, int8_bfloat16, int16, float16, bfloat16")


def _engine(args, cls=None, default=None):
    from shmengine.api.engine import Engine
    from shmengine.cli.data_parallel import attach

    cls = cls or Engine
    notice = _slow_start_notice(args)
    try:
        model = _construct(cls, args, default)
    finally:
        notice.cancel()
    return attach(model)  # under mpirun: rank 0 spreads its batches over the ranks, the others serve them


def _slow_start_notice(args):
    """Many workers take a while to start (18 s for 200 here): once the start has taken long
    enough to be noticed, say what is going on rather than sit silent."""
    import threading

    workers = args.inter_threads * (len(args.device_index) if args.device != "cpu" else 1)
    delay = float(os.environ.get("SHMENGINE_RUN_NOTICE_AFTER", "2"))
    notice = threading.Timer(delay, lambda: print(
        f"shmengine-run: starting {workers} worker process{'' if workers == 1 else 'es'} and loading the model...",
        file=sys.stderr, flush=True,
    ))
    notice.daemon = True
    notice.start()
    return notice


def _construct(cls, args, default):
    return cls(
        args.model or default or _default_model(),
        args.device,
        device_index=args.device_index if len(args.device_index) > 1 else args.device_index[0],
        inter_threads=args.inter_threads,
        intra_threads=args.intra_threads,
        max_queued_batches=args.max_queued_batches,
        prepack_weights=args.prepack_weights,
        compute_type=args.compute_type,
    )


def _model_class(model):
    """Translator for a seq2seq export directory (two graphs, which Engine will not guess
    between), else Engine: what ``info`` starts to show the workers' settings."""
    path = Path(model)
    if path.is_dir() and (path / "encoder_model.onnx").is_file():
        from shmengine.api.translator import Translator

        return Translator
    return None


def _cmd_info(args) -> int:
    from shmengine.runtime.threads import parallel_info

    if args.no_engine:
        print(parallel_info())
        return 0
    with _engine(args, _model_class(args.model or _default_model())) as engine:
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
    from shmengine.cli.tuning import synthetic_feeds

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
    from shmengine.cli.tuning import measure, synthetic_feeds

    with _engine(args) as engine:
        feeds = synthetic_feeds(engine.inputs, args.batch_size)
        rate, latencies = measure(engine, feeds, batches=args.batches, latency_runs=args.latency_runs)
        print(
            f"{_plural(engine.num_workers, 'worker')} x {_plural(engine.intra_threads, 'intra thread')}, "
            f"batch size {args.batch_size}: "
            f"{rate:.1f} batches/s ({rate * args.batch_size:.1f} examples/s); latency median "
            f"{np.median(latencies) * 1e3:.2f} ms, p95 {np.percentile(latencies, 95) * 1e3:.2f} ms"
        )
    return 0


def _cmd_tune(args) -> int:
    from shmengine.cli import tuning

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
        f"{verb} {_plural(examples, 'example')}, {_plural(tokens, 'token')} in {seconds:.2f} s: "
        f"{tokens / max(seconds, 1e-9):.1f} tokens/s "
        f"({_plural(model.num_workers, 'worker')} x {_plural(model.intra_threads, 'intra thread')})",
        file=sys.stderr,
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# -- decoding defaults: the command line, else the model's generation_config.json ---------------

# What the launcher uses where neither the user nor the model's generation_config.json says.
# A generation_config.json that leaves a key out means transformers' default for it (save_pretrained
# omits keys equal to the defaults), so num_beams=1 then, as `model.generate()` would do.
_FALLBACKS = {
    "translate": {"beam_size": 2, "max_decoding_length": 256},
    "generate": {"beam_size": 1, "max_length": 64},
}
_DECODING_DEFAULTS = {
    "length_penalty": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "sampling_topk": 1, "sampling_topp": 1.0, "sampling_temperature": 1.0, "early_stopping": "never",
}


def _model_dir(args) -> Path:
    """The model directory of a text command: the one named, else the bundled one for it."""
    if args.model is None:
        return _bundled().bundled_model_path("numbers-gpt2" if args.command == "generate" else "numbers-marian")
    path = Path(args.model)
    if not path.exists():
        from shmengine.errors import ModelLoadError

        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    return path


def _generation_config(model_dir: Path) -> dict | None:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return None
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        from shmengine.errors import ModelLoadError

        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from None


def resolve_decoding_defaults(args) -> dict:
    """Fill every decoding option the user left out (None) from the model's
    ``generation_config.json``, as a Hugging Face user expects, then from the launcher's own
    defaults. Returns where each filled value came from (for ``--verbose``)."""
    if args.command not in _FALLBACKS:
        return {}
    config = _generation_config(_model_dir(args))
    model: dict = {}
    if config is not None:
        model["beam_size"] = int(config.get("num_beams", 1))
        for ours, theirs in (("length_penalty", "length_penalty"), ("repetition_penalty", "repetition_penalty"),
                             ("no_repeat_ngram_size", "no_repeat_ngram_size")):
            if theirs in config:
                model[ours] = config[theirs]
        if config.get("do_sample"):
            model["sampling_topk"] = int(config.get("top_k", 50))  # transformers' default top_k
            model["sampling_topp"] = float(config.get("top_p", 1.0))
            model["sampling_temperature"] = float(config.get("temperature", 1.0))
        if config.get("early_stopping") is True:
            model["early_stopping"] = "true"  # stop once num_beams hypotheses finished: CTranslate2's rule
        # transformers' max_length counts what the decoder holds: the decoder start token of a
        # seq2seq model (so one token fewer is generated), the prompt of a decoder-only model
        # (which the launcher cannot know per line: it is the cap on new tokens here)
        new_tokens = config.get("max_new_tokens")
        if args.command == "translate":
            if new_tokens is None and config.get("max_length") is not None:
                new_tokens = int(config["max_length"]) - 1
            if new_tokens is not None:
                model["max_decoding_length"] = int(new_tokens)
        else:
            new_tokens = new_tokens if new_tokens is not None else config.get("max_length")
            if new_tokens is not None:
                model["max_length"] = int(new_tokens)
    sources = {}
    for name, fallback in {**_DECODING_DEFAULTS, **_FALLBACKS[args.command]}.items():
        if getattr(args, name, None) is not None:
            sources[name] = "command line"
        elif name in model:
            setattr(args, name, model[name])
            sources[name] = "generation_config.json"
        else:
            setattr(args, name, fallback)
            sources[name] = "launcher default"
    return sources


def _decoding_kwargs(args) -> dict:
    kwargs = {"beam_size": args.beam_size, "num_hypotheses": 1, "length_penalty": args.length_penalty,
              "repetition_penalty": args.repetition_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
              "sampling_topk": args.sampling_topk, "sampling_topp": args.sampling_topp,
              "sampling_temperature": args.sampling_temperature,
              "early_stopping": True if args.early_stopping == "true" else "never"}
    if args.seed is not None:
        from shmengine.api.options import set_random_seed

        set_random_seed(args.seed)
    return kwargs


class _Output:
    """Where output lines go: the named file, or the stdout this process inherited.

    Never ``open("/dev/stdout", "w")``: that reopens the file behind stdout and truncates it, so
    ``>> log`` lost the log and ``{ shmengine-run ...; echo done; } > out`` overwrote what came
    before. With ``flush_each`` every line is flushed as it is written (a person is reading).

    ``inputs`` are the files the command reads: an output naming one of them is refused before
    it is opened, since opening it for writing would empty the input before a line is read."""

    def __init__(self, path: str | None, flush_each: bool = False, inputs=()):
        if path and os.path.exists(path):
            for source in inputs:
                if source and os.path.exists(source) and os.path.samefile(source, path):
                    from shmengine.errors import InvalidInputError

                    raise InvalidInputError(
                        f"--output {path} is the input file {source}: writing it would empty the input; "
                        "write to another file"
                    )
        self.file = open(path, "w", encoding="utf-8") if path else sys.stdout
        self.flush_each = flush_each or self.file.isatty()

    def write(self, line: str) -> None:
        self.file.write(line + "\n")
        if self.flush_each:
            self.file.flush()

    def close(self) -> None:
        if self.file is not sys.stdout:
            self.file.close()
        else:
            self.file.flush()


def _input_limit(args, model) -> int:
    """--max-input-length, or the model's positions when it was not given (0 = no truncation)."""
    if args.max_input_length is not None:
        return args.max_input_length
    return min(1024, model.max_positions or 1024)


def _checked(tokens: list[str], where: str, limit: int, model, flag: str) -> list[str]:
    """Say which line is longer than the model takes, before anything is queued: truncated (with a
    warning) under ``limit``, or an error naming the line when truncation is off."""
    if limit and len(tokens) > limit:
        print(f"shmengine-run: warning: {where}: {len(tokens)} tokens, truncated to {limit} ({flag})", file=sys.stderr)
    elif not limit and model.max_positions and len(tokens) > model.max_positions:
        from shmengine.errors import InvalidInputError

        raise InvalidInputError(
            f"{where}: {len(tokens)} tokens, more than the model's {model.max_positions} positions; "
            f"pass {flag} {model.max_positions} to truncate such lines"
        )
    return tokens


def _cmd_translate(args) -> int:
    from shmengine.api.translator import Translator
    from shmengine.cli.text import TextCodec, read_lines

    model_dir = _model_dir(args)
    codec = TextCodec(model_dir, args.tokenize)
    options = dict(_decoding_kwargs(args), max_decoding_length=args.max_decoding_length)
    with _engine(args, Translator, model_dir) as translator:
        limit = _input_limit(args, translator.model)
        options["max_input_length"] = limit
        interactive = args.input is None and sys.stdin.isatty()
        progress = _Progress(_count_lines(args.input) if args.input and os.path.isfile(args.input) else None, True)
        sources = (
            _checked(codec.tokenize(line), where, limit, translator.model, "--max-input-length")
            for where, line in read_lines(args.input)
        )
        out = _Output(args.output, flush_each=interactive, inputs=[args.input])
        start = time.perf_counter()
        examples = tokens = 0
        try:
            if interactive:
                # one line at a time, each answered as soon as it is typed (translate_iterable reads
                # ahead several lines before it submits, which would wait for Ctrl-D)
                results = (translator.translate_batch([tokens], **options)[0] for tokens in sources)
            else:
                results = translator.translate_iterable(sources, max_batch_size=args.max_batch_size, **options)
            for result in results:
                hypothesis = result.hypotheses[0]
                out.write(codec.detokenize(hypothesis))
                examples += 1
                tokens += len(hypothesis)
                progress(examples)
                _interrupts.check()
        finally:
            progress.close()
            out.close()
        _summary("translated", examples, tokens, time.perf_counter() - start, translator)
    return 0


def _cmd_generate(args) -> int:
    from shmengine.api.generator import Generator
    from shmengine.cli.text import TextCodec, read_lines

    model_dir = _model_dir(args)
    codec = TextCodec(model_dir, args.tokenize)
    with _engine(args, Generator, model_dir) as generator:
        bos = generator.model.bos_id
        bos_token = generator.vocabulary.id_to_token[bos] if bos is not None else None
        limit = generator.model.max_positions or 0

        def prompt(where: str, line: str) -> list[str]:
            tokens = codec.tokenize(line)
            # a decoder starts from its bos token; add it where the tokenizer does not
            tokens = tokens if bos_token is None or tokens[:1] == [bos_token] else [bos_token] + tokens
            if limit and len(tokens) >= limit:
                from shmengine.errors import InvalidInputError

                raise InvalidInputError(
                    f"{where}: the prompt has {len(tokens)} tokens; the model holds {limit} positions, "
                    "prompt and generated tokens together"
                )
            return tokens

        interactive = args.input is None and sys.stdin.isatty()
        out = _Output(args.output, flush_each=interactive, inputs=[args.input])
        start = time.perf_counter()
        examples = tokens = 0
        options = dict(max_length=args.max_length, include_prompt_in_result=False, **_decoding_kwargs(args))
        try:
            prompts = (prompt(where, line) for where, line in read_lines(args.input))
            if interactive:
                results = (generator.generate_batch([p], **options)[0] for p in prompts)
            else:
                results = generator.generate_iterable(prompts, max_batch_size=args.max_batch_size, **options)
            for result in results:
                out.write(codec.detokenize(result.sequences[0]))
                examples += 1
                tokens += len(result.sequences[0])
                _interrupts.check()
        finally:
            out.close()
        _summary("generated for", examples, tokens, time.perf_counter() - start, generator)
    return 0


def _cmd_score(args) -> int:
    from shmengine.api.generator import _iterate_in_chunks
    from shmengine.api.translator import Translator
    from shmengine.cli.text import TextCodec, read_lines
    from shmengine.errors import InvalidInputError

    model_dir = _model_dir(args)
    codec = TextCodec(model_dir, args.tokenize)
    # CTranslate2 refuses files of different lengths; check before a worker starts or a line is written
    counts = {flag: _count_lines(path) for flag, path in (("--source", args.source), ("--target", args.target))
              if os.path.isfile(path)}
    if len(set(counts.values())) > 1:
        raise InvalidInputError(
            f"--source has {counts['--source']} lines and --target {counts['--target']}: "
            "each source line needs its target line"
        )
    with _engine(args, Translator, model_dir) as translator:
        limit = _input_limit(args, translator.model)

        def pairs():
            sources, targets = read_lines(args.source), read_lines(args.target)
            while True:
                source, target = next(sources, None), next(targets, None)
                if source is None and target is None:
                    return
                if source is None or target is None:  # stdin or a pipe: not counted beforehand
                    longer, where = ("--target", target[0]) if source is None else ("--source", source[0])
                    raise InvalidInputError(f"{longer} has more lines than the other file: {where} has no partner")
                yield (
                    _checked(codec.tokenize(source[1]), source[0], limit, translator.model, "--max-input-length"),
                    # scoring appends the end token itself (as CTranslate2 does): a target
                    # tokenized with the model's specials would end with two of them
                    codec.tokenize(target[1], special_tokens=False),
                )

        def submit(chunk):
            sources, targets = zip(*chunk)
            return translator.score_batch(list(sources), list(targets), max_batch_size=args.max_batch_size,
                                          max_input_length=limit, asynchronous=True)

        out = _Output(args.output, inputs=[args.source, args.target])
        start = time.perf_counter()
        examples = tokens = 0
        try:
            for result in _iterate_in_chunks(pairs(), args.max_batch_size, submit):
                mean = sum(result.log_probs) / max(1, len(result.log_probs))
                out.write(f"{mean:.6f} ||| {codec.detokenize(result.tokens[:-1])}")
                examples += 1
                tokens += len(result.tokens)
                _interrupts.check()
        finally:
            out.close()
        _summary("scored", examples, tokens, time.perf_counter() - start, translator)
    return 0


_FROM_MODEL = "default: the model's generation_config.json, else %s"


def _add_decoding_options(parser: argparse.ArgumentParser, command: str) -> None:
    fallback = _FALLBACKS[command]
    parser.add_argument("--input", help="input text file, UTF-8, one example per line (default: stdin)")
    parser.add_argument("--output", help="output text file (default: stdout)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="examples per batch sent to a worker (default: 32)")
    parser.add_argument("--beam-size", type=int, help=f"1 = greedy search ({_FROM_MODEL % fallback['beam_size']}: num_beams)")
    parser.add_argument(
        "--early-stopping", choices=["never", "true"],
        help="beam search stop rule: 'never' = exact, stop only once no live beam can beat the finished hypotheses; "
        "'true' = CTranslate2's rule, stop once beam-size hypotheses finished, even while a live beam would "
        "score higher (default: 'true' where generation_config.json sets early_stopping: true, else 'never')",
    )
    parser.add_argument("--length-penalty", type=float, help=_FROM_MODEL % 1.0)
    parser.add_argument("--repetition-penalty", type=float, help=f"1 = none ({_FROM_MODEL % 1.0})")
    parser.add_argument("--no-repeat-ngram-size", type=int, help=f"0 = none ({_FROM_MODEL % 0})")
    parser.add_argument("--sampling-topk", type=int,
                        help="sample from the K most likely tokens; 1 = argmax, 0 = all "
                        "(default: generation_config.json's top_k when it sets do_sample, else 1)")
    parser.add_argument("--sampling-topp", type=float, help="nucleus sampling mass (default: top_p, else 1.0)")
    parser.add_argument("--sampling-temperature", type=float, help="(default: temperature, else 1.0)")
    parser.add_argument("--seed", type=int, help="random seed for sampling (default: a fresh one each run)")
    parser.add_argument("--tokenize", default="model", choices=["model", "space"],
                        help="'model' (default): the model's tokenizer.json; 'space': text is already space-separated tokens")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the help already says it (the decoding
    options, whose default comes from the model, say where from)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and "default" not in text and not unset:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shmengine-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    parser.add_argument("--version", action="version", version=f"shmengine-run {_version()}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter)
    )

    translate = commands.add_parser("translate", help="translate text with a seq2seq model")
    _add_engine_options(translate)
    _add_decoding_options(translate, "translate")
    translate.add_argument("--max-decoding-length", type=int,
                           help="tokens generated at most (default: generation_config.json's max_new_tokens, "
                           "or its max_length less the decoder start token, else 256)")
    translate.add_argument("--max-input-length", type=int,
                           help="truncate longer source lines to this many tokens, keeping the end token, with a "
                           "warning naming the line; 0 = never (a longer line is then an error) "
                           "(default: the model's positions, at most 1024)")
    translate.set_defaults(func=_cmd_translate)

    generate = commands.add_parser(
        "generate", help="continue each input line with a decoder-only model",
        description="Continue each input line with a decoder-only model. The bundled numbers-gpt2 continues a "
        "prompt of digits and '=': echo '1984=' | shmengine-run generate  ->  one thousand nine hundred eighty four",
    )
    _add_engine_options(generate)
    _add_decoding_options(generate, "generate")
    generate.add_argument("--max-length", type=int,
                          help="new tokens at most (default: generation_config.json's max_new_tokens, else its "
                          "max_length, else 64)")
    generate.set_defaults(func=_cmd_generate)

    score = commands.add_parser("score", help="score target lines given source lines")
    _add_engine_options(score)
    score.add_argument("--source", required=True, help="source text file, one example per line")
    score.add_argument("--target", required=True, help="target text file, the same number of lines")
    score.add_argument("--output", help="'mean log-prob ||| target' per line (default: stdout)")
    score.add_argument("--max-batch-size", type=int, default=32, help="pairs per batch sent to a worker (default: 32)")
    score.add_argument("--max-input-length", type=int,
                       help="truncate longer source lines, keeping the end token; 0 = never "
                       "(default: the model's positions, at most 1024)")
    score.add_argument("--tokenize", default="model", choices=["model", "space"],
                       help="'model' (default): the model's tokenizer.json; 'space': pre-tokenized text")
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
    run.add_argument("--batch-size", type=int, default=64, help="rows per batch sent to a worker")
    run.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    run.set_defaults(func=_cmd_run)

    bench = commands.add_parser("bench", help="throughput and latency of one split")
    _add_engine_options(bench)
    bench.add_argument("--batch-size", type=int, default=8, help="rows per synthetic batch")
    bench.add_argument("--batches", type=int, default=200, help="batches submitted at once for the throughput")
    bench.add_argument("--latency-runs", type=int, default=50, help="batches run one at a time for the latency")
    bench.set_defaults(func=_cmd_bench)

    tune = commands.add_parser("tune", help="sweep inter x intra splits and name the best")
    tune.add_argument("model", nargs="?", help="ONNX file or model directory (default: the bundled model)")
    tune.add_argument("--batch-size", type=int, default=8, help="rows per synthetic batch")
    tune.add_argument("--batches", type=int, default=100, help="batches per split for the throughput")
    tune.add_argument("--latency-runs", type=int, default=30, help="batches per split run one at a time for the latency")
    tune.add_argument("--plot", default="shmengine-tune.png",
                      help="PNG to write, '' for none (default: shmengine-tune.png; needs matplotlib: "
                      "pip install 'shmengine[tune]')")
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


def _run(args) -> int:
    for name, source in resolve_decoding_defaults(args).items():
        logging.getLogger("shmengine.cli.main").info("%s = %r (%s)", name, getattr(args, name), source)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from shmengine.errors import ShmEngineError

    _interrupts.install()
    try:
        from shmengine.cli import data_parallel as distributed

        if distributed.is_distributed(args):  # one of several MPI ranks: data parallel over the lines
            return distributed.run(args, _run, _interrupts.check)
        return _run(args)
    except KeyboardInterrupt:
        print("shmengine-run: interrupted; output holds the lines finished so far", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head)
        sys.stderr.close()
        return 0
    except (ShmEngineError, ValueError, OSError) as exc:
        print(f"shmengine-run: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
