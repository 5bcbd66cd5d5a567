#!/usr/bin/env python
"""Soak test: the three bundled models under mixed load, every result checked, memory watched.

What it does
------------

It starts the three bundled models side by side, each with ``--inter-threads`` workers of one
intra thread:

* ``models/numbers-marian`` (a :class:`shmengine.Translator`),
* ``models/numbers-gpt2`` (a :class:`shmengine.Generator`),
* ``models/default`` (an :class:`shmengine.Engine`: an MLP, input ``x`` [batch, 256] float32),

and for ``--seconds`` seconds runs, from several caller threads at once:

* ``translate``: ``translate_batch`` of 1-24 numbers, greedy and beam 2 in turn, with
  ``max_batch_size`` 2, 3 or 8, so that most calls are split across the workers;
* ``generate``: ``generate_batch`` (split by ``max_batch_size`` or whole, with and without the
  prompt in the result) in turn with a ``generate_tokens`` stream (one stream in four is closed
  after two tokens, which stops the decoding in the worker);
* ``mlp``: ``run_batch`` with 1 to 5,000 rows (from 16 rows on, tensors go through the
  shared-memory arenas rather than the socket), single batches and lists of batches;
* ``async-1`` ... ``async-N`` (``--async-threads``, default 3): each submits to all three models
  with ``asynchronous=True``, keeps two rounds in flight and checks a round when it completes.

Three things give the load a steady memory footprint, so that growth means a leak: before the
load (and before the first sample that counts) every worker of every model runs the load's
largest request shapes, twice (``prime``: ONNX Runtime sizes a worker's memory for a shape on
its second run of it, and a worker would otherwise meet its largest shape at a random moment of
the mixed load); at most one 5,000-row batch plus 1,000 smaller rows are in flight at a time
(without that bound, the supervisor's heap would grow whenever more big results than ever before
happened to coincide, late in the run as likely as early); and growth only counts where it is
sustained (below).

Every result is checked against a reference that does not use shmengine:

* a number's words come from ``number_to_words`` in ``models/train_numbers.py``. Numbers are
  drawn from 0..999 and the 1,000 held-out numbers of ``models/numbers_heldout.tsv``: the
  training script checked the models on exactly those with transformers and a plain ONNX
  Runtime loop. Beam search runs with ``length_penalty=0``: with CTranslate2's default stopping
  rule (done once ``round(beam_size * patience)`` = 2 hypotheses finished, as in its
  ``src/decoding.cc``) a short hypothesis of the second beam can end the search before the best
  one finishes, and these tiny models then give a wrong number about once in 60 examples. That
  is the search working as specified, not an engine fault; ``length_penalty=0`` makes the search
  stop when its best beam finishes (CTranslate2's early exit).
* the MLP's outputs come from numpy: the weights read with ``onnx.numpy_helper`` from
  ``models/default/model.onnx``, then MatMul + Add + Relu per layer (no Relu on the last), in
  float64, computed once for a pool of input rows; a request takes a slice at a random offset.

Every ``--sample-interval`` seconds (default 1) it samples the VmRSS of the supervisor (this
process), of each model's fork server and of each worker (``model.worker_pids``), and the number
of ``shmengine-*`` entries in ``/dev/shm``.

Reading the output
------------------

Progress lines go to stderr. At the end, stdout gets one table::

    process                       pid   first MiB   last MiB   growth
    supervisor                  24783       142.3      142.9    +0.4%
    marian fork server          24825        65.0       65.0    +0.0%
    marian worker 0             24828        74.3       74.6    +0.4%
    ...
    /dev/shm entries (ours)                     3          3    +0.0%

``first`` is a process's peak RSS over the first quarter of the run after the warm-up (10% of
the run after the prime: allocators, ORT's memory arenas and the transport arenas reach their
working size there), ``half`` its peak over the first half, ``last`` its peak over the last
quarter. ``growth`` is (last - first) / first, ``2nd half`` (last - half) / half. Peaks, not
single samples: workers give freed memory back to the system after a long batch (and run
without ORT's CPU arena), so one sample may fall after a trim and the next at a batch's height
(seen: an MLP worker at 213, then 118 MiB, its neighbour at 120, then 140 MiB, in one minute with
no leak). A leak raises the peak itself, and keeps raising it: a process fails (``GROWS``) when
it grew by ``--max-growth`` % or more over the run *and* by half of that or more over its second
half. A steady leak grows 2/3 as much over the second half as over the run, so it crosses both;
a one-time step (a worker's heap reaching a new high-water mark the first time some mix of
batches coincides, seen: an MLP worker at 111 -> 121 MiB, +8.8%, beside its neighbour flat at
189.5) crosses only the first. ``python tools/catches.py soak-worker-leak`` proves that a leak
of 16 KiB per batch in every worker fails the 60-second soak.

``/dev/shm entries (ours)`` counts the entries that a process of this run has open or mapped (the
weights segment of each model, and files derived from it); other programs on the machine may
create and remove their own ``shmengine-*`` entries at the same time, so the count of all of them
(``all``) is shown for information only. After closing the models, no entry of this run may be
left in ``/dev/shm``.

Below the table: requests (one call of a public method: ``translate_batch``, ``generate_batch``,
one ``generate_tokens`` stream, ``run_batch``) and examples (numbers translated or generated, MLP
rows), in all and per second (the throughput), then per kind; errors (exceptions, timeouts, hung
threads, workers that died and were replaced) and wrong results, with the first messages; then
PASS or FAIL with the reasons.

Exit code: 0 on PASS; 1 if any result was wrong, any error happened, any process grew as a leak
grows (by ``--max-growth`` percent, default 5, or more over the run, and by half of that over its
second half), the count of our ``/dev/shm`` entries grew, or an entry was left after closing. ``--json FILE`` writes the same figures, and every sample, as JSON.

Usage::

    python tools/soak.py --seconds 60 [--inter-threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import shmengine  # noqa: E402
from models.train_numbers import number_to_words  # noqa: E402

MARIAN = REPO / "models" / "numbers-marian"
GPT2 = REPO / "models" / "numbers-gpt2"
MLP = REPO / "models" / "default"
HELDOUT = REPO / "models" / "numbers_heldout.tsv"
SHM_DIR = "/dev/shm"
SHM_PREFIX = "shmengine-"
EOS = "<|endoftext|>"

MLP_POOL_ROWS = 8192  # input rows with a precomputed reference; requests take slices of them
MLP_SIZES = (1, 5, 16, 64, 300, 1000, 5000)  # 16 rows = 16 KiB: from there on, through the arenas
BIG_ROWS = 5000
# MLP rows in flight at once, over all caller threads: one big batch and some small ones.
# Without a bound, the supervisor's memory high-water mark would be set by how many 5,000-row
# results happen to coincide (and how they fragment its heap), which can first happen late in
# the run and look like growth; with it, the load reaches its peak early and stays there.
MLP_ROWS_IN_FLIGHT = BIG_ROWS + 1000
CHECK_ROWS = 512  # rows compared at a time (keeps the check's own temporaries small)
WARMUP_FRACTION = 0.1  # of the run; the first sample compared is the first one after it
RESULT_TIMEOUT = 120.0  # a future that takes longer than this counts as a hang
JOIN_TIMEOUT = 120.0  # how long the end of the run waits for a caller thread's last request
MAX_MESSAGES = 20  # error and wrong-result messages kept for the report


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- references -----------------------------------------------------------------------------


class References:
    """The expected results, computed without shmengine."""

    def __init__(self, seed: int):
        heldout = [int(line.split("\t")[0]) for line in HELDOUT.read_text().splitlines() if line.strip()]
        self.numbers = sorted(set(range(1000)) | set(heldout))
        self.words = {n: number_to_words(n).split() for n in self.numbers}
        self.mlp_layers = load_mlp_layers(MLP / "model.onnx")
        rng = np.random.default_rng(seed)
        self.mlp_inputs = rng.standard_normal((MLP_POOL_ROWS, 256)).astype(np.float32)
        self.mlp_outputs = mlp_reference(self.mlp_inputs, self.mlp_layers)

    def mlp_rows(self, rng: random.Random, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` consecutive input rows at a random offset, and their expected outputs."""
        start = rng.randrange(0, MLP_POOL_ROWS - rows + 1)
        return self.mlp_inputs[start : start + rows], self.mlp_outputs[start : start + rows]


def load_mlp_layers(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) per layer of the default MLP, read with onnx.numpy_helper, in graph order."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        if node.op_type == "MatMul":
            weight = tensors[node.input[1]]
        elif node.op_type == "Add":
            layers.append((weight.astype(np.float64), tensors[node.input[1]].astype(np.float64)))
    return layers


def mlp_reference(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """MatMul + Add + Relu per layer, no Relu on the last; float64 inside, float32 out."""
    h = x.astype(np.float64)
    for i, (weight, bias) in enumerate(layers):
        h = h @ weight + bias
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h.astype(np.float32)


def digits(n: int) -> list[str]:
    return list(str(n))


# -- bookkeeping ------------------------------------------------------------------------------


class Stats:
    """Counters shared by the caller threads (O(1) memory: a soak must not grow by itself)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()
        self.examples: collections.Counter = collections.Counter()
        self.errors = 0
        self.wrong = 0
        self.messages: list[str] = []

    def done(self, kind: str, examples: int) -> None:
        with self._lock:
            self.requests[kind] += 1
            self.examples[kind] += examples

    def error(self, kind: str, what: str) -> None:
        with self._lock:
            self.errors += 1
            self._keep(f"error in {kind}: {what}")

    def mismatch(self, kind: str, what: str) -> None:
        with self._lock:
            self.wrong += 1
            self._keep(f"wrong result in {kind}: {what}")

    def _keep(self, message: str) -> None:
        log(message)
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)


def expect(stats: Stats, kind: str, ok: bool, what: str) -> None:
    if not ok:
        stats.mismatch(kind, what)


# -- checks ------------------------------------------------------------------------------------


def check_translations(stats, kind, refs, numbers, results) -> None:
    for n, result in zip(numbers, results):
        got = result.hypotheses[0] if result.hypotheses else None
        expect(stats, kind, got == refs.words[n], f"{n} -> {got}, expected {refs.words[n]}")


def check_generations(stats, kind, refs, numbers, results, with_prompt: bool) -> None:
    for n, result in zip(numbers, results):
        want = (digits(n) + ["="] if with_prompt else []) + refs.words[n]
        got = result.sequences[0] if result.sequences else None
        expect(stats, kind, got == want, f"{n} -> {got}, expected {want}")


def check_mlp(stats, kind, expected: np.ndarray, out: dict) -> None:
    y = out.get("y")
    if y is None or y.shape != expected.shape:
        stats.mismatch(kind, f"{len(expected)} rows: " + ("no output 'y'" if y is None else f"shape {y.shape}"))
        return
    for start in range(0, len(y), CHECK_ROWS):
        got, want = y[start : start + CHECK_ROWS], expected[start : start + CHECK_ROWS]
        if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
            error = float(np.abs(got - want).max())
            stats.mismatch(kind, f"{len(expected)} rows: rows {start}.. differ by up to {error:.3g}")
            return


class RowBudget:
    """At most ``limit`` MLP rows in flight. Fair: while a caller waits, nobody jumps the queue
    (else the blocking caller would starve behind the non-blocking ones)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._waiting: collections.deque[int] = collections.deque()

    def acquire(self, rows: int, blocking: bool = True) -> bool:
        if rows > self.limit:
            raise ValueError(f"{rows} rows is more than the budget of {self.limit}")
        with self._cond:
            if not blocking:
                if self._waiting or self.in_use + rows > self.limit:
                    return False
            else:
                ticket = next(self._tickets)
                self._waiting.append(ticket)
                while self._waiting[0] != ticket or self.in_use + rows > self.limit:
                    self._cond.wait()
                self._waiting.popleft()
                self._cond.notify_all()
            self.in_use += rows
            return True

    def release(self, rows: int) -> None:
        with self._cond:
            self.in_use -= rows
            self._cond.notify_all()


# -- workloads: each function makes one request and checks it ---------------------------------


@dataclass
class Models:
    translator: shmengine.Translator
    generator: shmengine.Generator
    engine: shmengine.Engine

    def named(self) -> dict[str, shmengine.PooledModel]:
        return {"marian": self.translator, "gpt2": self.generator, "mlp": self.engine}

    def close(self) -> None:
        for model in self.named().values():
            model.close()


@dataclass
class Load:
    """What every caller thread shares."""

    models: Models
    refs: References
    stats: Stats
    deadline: float  # time.monotonic() at the end of the run
    budget: RowBudget = field(default_factory=lambda: RowBudget(MLP_ROWS_IN_FLIGHT))


def translate_once(load: Load, rng: random.Random, turn: int) -> None:
    """translate_batch of 1-24 numbers, greedy and beam 2 in turn, split by max_batch_size."""
    numbers = rng.choices(load.refs.numbers, k=rng.randint(1, 24))
    beam = 1 if turn % 2 == 0 else 2
    results = load.models.translator.translate_batch(
        [digits(n) + ["</s>"] for n in numbers], beam_size=beam, length_penalty=0, max_batch_size=rng.choice((2, 3, 8))
    )
    check_translations(load.stats, f"translate beam {beam}", load.refs, numbers, results)
    load.stats.done("translate_batch", len(numbers))


def generate_once(load: Load, rng: random.Random, turn: int) -> None:
    """generate_batch of 1-16 prompts and a generate_tokens stream, in turn."""
    if turn % 2:
        stream_once(load, rng, turn // 2)
        return
    numbers = rng.choices(load.refs.numbers, k=rng.randint(1, 16))
    with_prompt = turn % 4 == 0
    results = load.models.generator.generate_batch(
        [[EOS, *digits(n), "="] for n in numbers],
        max_length=64,
        max_batch_size=rng.choice((0, 4)),
        include_prompt_in_result=with_prompt,
    )
    check_generations(load.stats, "generate_batch", load.refs, numbers, results, with_prompt)
    load.stats.done("generate_batch", len(numbers))


def stream_once(load: Load, rng: random.Random, turn: int) -> None:
    """One generate_tokens stream; one in four is closed after two tokens."""
    n = rng.choice(load.refs.numbers)
    want = load.refs.words[n]
    early = turn % 4 == 3 and len(want) > 2
    tokens, steps = [], []
    stream = load.models.generator.generate_tokens([EOS, *digits(n), "="], max_length=64)
    for step in stream:
        steps.append(step.step)
        if not (step.is_last and step.token == EOS):
            tokens.append(step.token)
        if early and len(tokens) == 2:
            break
    stream.close()
    stats = load.stats
    if early:
        expect(stats, "generate_tokens (closed early)", tokens == want[:2], f"{n} -> {tokens}, expected {want[:2]}")
    else:
        expect(stats, "generate_tokens", tokens == want, f"{n} -> {tokens}, expected {want}")
    expect(stats, "generate_tokens", steps == list(range(len(steps))), f"{n}: steps {steps}")
    stats.done("generate_tokens", 1)


def plan_mlp_sync(rng: random.Random, turn: int) -> list[int]:
    """Row counts for one run_batch call: a single batch (cycling through MLP_SIZES) or, every
    third turn, a list of one big batch and small ones."""
    if turn % 3 == 2:
        return [BIG_ROWS] + [rng.choice(MLP_SIZES[:4]) for _ in range(rng.randint(1, 3))]
    return [MLP_SIZES[turn % len(MLP_SIZES)]]


def mlp_once(load: Load, rng: random.Random, turn: int) -> None:
    """One run_batch call (one batch, or a list of them that runs in parallel), checked."""
    sizes = plan_mlp_sync(rng, turn)
    pairs = [load.refs.mlp_rows(rng, rows) for rows in sizes]
    engine = load.models.engine
    load.budget.acquire(sum(sizes))
    try:
        if len(pairs) == 1:
            outputs = [engine.run_batch({"x": pairs[0][0]})]
        else:
            outputs = engine.run_batch([{"x": x} for x, _ in pairs])
        for (_, expected), out in zip(pairs, outputs):
            check_mlp(load.stats, "run_batch", expected, out)
        del outputs
    finally:
        load.budget.release(sum(sizes))
    load.stats.done("run_batch", sum(sizes))


@dataclass
class Round:
    """One asynchronous submission to each model, waiting to be checked."""

    numbers: list[int]
    translations: list[Future]
    prompts: list[int]
    generations: list[Future]
    expected: list[np.ndarray]
    mlp: list[Future]
    beam: int
    rows: int  # MLP rows taken from the budget


def plan_mlp_round(rng: random.Random, turn: int) -> list[int]:
    """Row counts of a round's MLP batches: a big one every fourth round, and a small one."""
    return [BIG_ROWS if turn % 4 == 0 else rng.choice(MLP_SIZES)] + [rng.choice(MLP_SIZES[:4])]


def submit_round(load: Load, rng: random.Random, turn: int, sizes: list[int]) -> Round:
    """Submit one round; its MLP rows (``sizes``) were taken from the budget by the caller."""
    models, refs = load.models, load.refs
    numbers = rng.choices(refs.numbers, k=rng.randint(1, 12))
    beam = 1 + turn % 2
    translations = models.translator.translate_batch(
        [digits(n) + ["</s>"] for n in numbers], beam_size=beam, length_penalty=0,
        max_batch_size=rng.choice((0, 4)), asynchronous=True,
    )
    prompts = rng.choices(refs.numbers, k=rng.randint(1, 8))
    generations = models.generator.generate_batch(
        [[EOS, *digits(n), "="] for n in prompts], max_length=64, max_batch_size=rng.choice((0, 3)),
        include_prompt_in_result=False, asynchronous=True,
    )
    pairs = [refs.mlp_rows(rng, rows) for rows in sizes]
    mlp = models.engine.run_batch([{"x": x} for x, _ in pairs], asynchronous=True)
    return Round(numbers, translations, prompts, generations, [e for _, e in pairs], mlp, beam, sum(sizes))


def check_round(load: Load, r: Round) -> None:
    """Wait for every future of a round (at most RESULT_TIMEOUT each), check the results and
    give the round's MLP rows back to the budget."""
    stats, refs = load.stats, load.refs
    try:
        translations = [f.result(RESULT_TIMEOUT) for f in r.translations]
        check_translations(stats, f"async translate beam {r.beam}", refs, r.numbers, translations)
        generations = [f.result(RESULT_TIMEOUT) for f in r.generations]
        check_generations(stats, "async generate_batch", refs, r.prompts, generations, False)
        for expected, future in zip(r.expected, r.mlp):
            check_mlp(stats, "async run_batch", expected, future.result(RESULT_TIMEOUT))
    finally:
        r.mlp.clear()
        load.budget.release(r.rows)
    stats.done("async translate_batch", len(r.numbers))
    stats.done("async generate_batch", len(r.prompts))
    stats.done("async run_batch", r.rows)


# -- caller threads --------------------------------------------------------------------------


def run_sync_caller(load: Load, kind: str, request, seed: int) -> None:
    """Make requests of one kind back to back until the deadline; count failures, never stop."""
    rng = random.Random(seed)
    turn = 0
    while time.monotonic() < load.deadline:
        try:
            request(load, rng, turn)
        except Exception as exc:
            load.stats.error(kind, f"{type(exc).__name__}: {exc}")
        turn += 1


def run_async_caller(load: Load, kind: str, seed: int) -> None:
    """Keep up to two rounds of asynchronous submissions in flight; check each as it completes.

    A round is only submitted when the budget has room for its MLP rows; while this thread holds
    rows of an unchecked round it never waits for the budget (that could deadlock the callers).
    """
    rng = random.Random(seed)
    in_flight: collections.deque[Round] = collections.deque()
    turn = 0
    sizes = plan_mlp_round(rng, turn)
    while time.monotonic() < load.deadline or in_flight:
        try:
            submitting = time.monotonic() < load.deadline and len(in_flight) < 2
            if submitting and load.budget.acquire(sum(sizes), blocking=not in_flight):
                try:
                    in_flight.append(submit_round(load, rng, turn, sizes))
                except BaseException:
                    load.budget.release(sum(sizes))
                    raise
                turn += 1
                sizes = plan_mlp_round(rng, turn)
                continue
            check_round(load, in_flight.popleft())
        except Exception as exc:
            load.stats.error(kind, f"{type(exc).__name__}: {exc}")


def _longest(refs: References, count: int) -> list[int]:
    """The ``count`` numbers with the longest words (the longest decodes of the mixed load)."""
    return sorted(refs.numbers, key=lambda n: (-len(refs.words[n]), n))[:count]


def prime(load: Load, rounds: int = 2) -> None:
    """Make every worker of every model run the load's largest request shapes, twice, before
    the first sample that counts.

    A worker's memory steps up the first time it runs its largest shape (ONNX Runtime plans a
    shape's memory on its first run and allocates the planned block, here 20 MiB more for the
    MLP, from the second on; the heap keeps its high-water mark). Under the mixed load a worker
    meets its largest shape at some random moment, which can come after the first window (seen:
    an MLP worker at 111 -> 121 MiB, +8.8%, beside its neighbour flat at 189.5 MiB that had met
    it early). So each round submits, at once, one such request per worker: a lone batch goes
    to the first idle worker, and ``workers`` of them at once give each worker one. The shapes:
    the MLP's 5,000-row batch; ``translate_batch`` of 8 of the longest numbers (its largest
    sub-batch) in beam 2 and greedy; ``generate_batch`` of 16 of the longest prompts unsplit
    (``max_batch_size=0``), with the prompt in the result and without. Results are checked like
    any other."""
    models, refs, stats = load.models, load.refs, load.stats
    rng = random.Random(-1)
    longest = _longest(refs, 16)
    for _ in range(rounds):
        try:
            workers = models.engine.num_workers
            pairs = [refs.mlp_rows(rng, BIG_ROWS) for _ in range(workers)]
            futures = models.engine.run_batch([{"x": x} for x, _ in pairs], asynchronous=True)
            for (_, expected), future in zip(pairs, futures):
                check_mlp(stats, "run_batch (prime)", expected, future.result(RESULT_TIMEOUT))
            stats.done("run_batch", workers * BIG_ROWS)
            for beam in (2, 1):
                numbers = longest[:8] * models.translator.num_workers
                futures = models.translator.translate_batch(
                    [digits(n) + ["</s>"] for n in numbers], beam_size=beam, length_penalty=0, max_batch_size=8,
                    asynchronous=True,
                )
                check_translations(stats, f"translate beam {beam} (prime)", refs, numbers,
                                   [f.result(RESULT_TIMEOUT) for f in futures])
                stats.done("translate_batch", len(numbers))
            for with_prompt in (True, False):
                calls = [
                    models.generator.generate_batch(
                        [[EOS, *digits(n), "="] for n in longest], max_length=64, include_prompt_in_result=with_prompt,
                        asynchronous=True,
                    )
                    for _ in range(models.generator.num_workers)
                ]
                for futures in calls:
                    check_generations(stats, "generate_batch (prime)", refs, longest,
                                      [f.result(RESULT_TIMEOUT) for f in futures], with_prompt)
                    stats.done("generate_batch", len(longest))
        except Exception as exc:
            stats.error("prime", f"{type(exc).__name__}: {exc}")


def start_callers(load: Load, async_threads: int, seed: int) -> list[threading.Thread]:
    """Start the three synchronous callers (one per model) and ``async_threads`` asynchronous ones."""
    sync = {"translate": translate_once, "generate": generate_once, "mlp": mlp_once}
    threads = [
        threading.Thread(target=run_sync_caller, args=(load, kind, request, seed + i), name=kind, daemon=True)
        for i, (kind, request) in enumerate(sync.items())
    ]
    threads += [
        threading.Thread(target=run_async_caller, args=(load, f"async-{i + 1}", seed + 100 + i), name=f"async-{i + 1}", daemon=True)
        for i in range(async_threads)
    ]
    for thread in threads:
        thread.start()
    return threads


# -- sampling ----------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the load started
    rss_kb: dict[str, int]  # process label -> VmRSS in KiB (missing: the process is gone)
    rss_parts_kb: dict[str, dict[str, int]]  # process label -> RssAnon, RssFile, RssShmem in KiB
    pids: dict[str, int]
    shm_ours: int
    shm_all: int
    workers_replaced: list[str] = field(default_factory=list)


def read_memory_kb(pid: int) -> dict[str, int] | None:
    """VmRSS and its parts (RssAnon, RssFile, RssShmem) of ``pid`` in KiB; None if it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    fields[name] = int(value.split()[0])
    except (OSError, ValueError):
        return None
    return fields if "VmRSS" in fields else None


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def shm_entries() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except OSError:
        return set()


def shm_names_held(pid: int) -> set[str]:
    """``shmengine-*`` names in /dev/shm that ``pid`` has open or mapped."""
    names = set()
    prefix = f"{SHM_DIR}/{SHM_PREFIX}"
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                names.add(target[len(SHM_DIR) + 1 :].removesuffix(" (deleted)"))
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                path = parts[5] if len(parts) == 6 else ""
                if path.startswith(prefix):
                    names.add(path[len(SHM_DIR) + 1 :].removesuffix(" (deleted)"))
    except OSError:
        pass
    return names


class Monitor:
    """Knows the processes of the run, and takes samples of their memory and of /dev/shm."""

    def __init__(self, models: Models):
        self.models = models
        self.initial_pids = {name: list(m.worker_pids) for name, m in models.named().items()}
        self.processes = {"supervisor": os.getpid()}
        for name, pids in self.initial_pids.items():
            fork_server = parent_pid(pids[0]) if pids else None
            if fork_server:
                self.processes[f"{name} fork server"] = fork_server
            for i, pid in enumerate(pids):
                self.processes[f"{name} worker {i}"] = pid
        self.seen_ours: set[str] = set()

    def ours(self) -> set[str]:
        """Entries of /dev/shm held by a process of this run, and those derived from them."""
        held = set()
        for pid in set(self.processes.values()):
            held |= shm_names_held(pid)
        present = shm_entries()
        return {n for n in present if any(n == h or n.startswith(h + "-") for h in held)}

    def sample(self, t: float) -> Sample:
        replaced = [
            f"{name}: workers {pids} became {list(model.worker_pids)}"
            for (name, pids), model in zip(self.initial_pids.items(), self.models.named().values())
            if sorted(model.worker_pids) != sorted(pids)
        ]
        rss, parts = {}, {}
        for label, pid in self.processes.items():
            memory = read_memory_kb(pid)
            if memory is not None:
                rss[label] = memory.pop("VmRSS")
                parts[label] = memory
        ours = self.ours()
        self.seen_ours |= ours
        return Sample(round(t, 2), rss, parts, dict(self.processes), len(ours), len(shm_entries()), replaced)


class SampleLog:
    """Samples kept on disk, one JSON line each, until the report reads them back.

    Kept in a list, they were the supervisor's own steady growth: about 5.5 KB a sample, so
    4.2 MiB of the 4.9 MiB (+3.7%) that the supervisor grew in a 30-minute run.
    """

    def __init__(self):
        self._file = tempfile.TemporaryFile("w+", encoding="utf-8")

    def append(self, sample: Sample) -> None:
        self._file.write(json.dumps(asdict(sample)) + "\n")
        self._file.flush()

    def read(self) -> list[Sample]:
        self._file.seek(0)
        samples = [Sample(**json.loads(line)) for line in self._file]
        self._file.close()
        return samples


def run_sampler(monitor: Monitor, samples: SampleLog, start: float, deadline: float, interval: float) -> None:
    """Sample every ``interval`` seconds until the deadline, then once more at the deadline."""
    next_at = start
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_at:
            samples.append(monitor.sample(now - start))
            next_at += interval
        time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
    samples.append(monitor.sample(time.monotonic() - start))


# -- report ------------------------------------------------------------------------------------


def growth_pct(first: float, last: float) -> float:
    if first == 0:
        return 0.0 if last == 0 else float("inf")
    return 100.0 * (last - first) / first


def grows(growth: float | None, second_half: float | None, limit: float) -> bool:
    """Whether a process's memory grew as a leak grows: by ``limit`` % or more over the run
    (first-quarter peak to last-quarter peak) *and* still by half of that over its second half
    (first-half peak to last-quarter peak).

    A leak of rate r lifts the peaks with time: over the run by 0.75 rT (from the end of the
    first quarter to the end), over the second half by 0.5 rT, 2/3 of it, so a leak that
    crosses ``limit`` also crosses ``limit / 2`` there. A one-time step (a worker's first run
    of its largest shape, a new heap high-water mark) lifts the peaks once and stays: it
    counts over the run but not over the second half, unless it comes that late (the prime
    makes that unlikely)."""
    if growth is None or second_half is None:
        return False
    return growth >= limit and second_half >= limit / 2


def build_report(args, samples: list[Sample], stats: Stats, load_seconds: float, hung: list[str], left: list[str], shm_before: int, shm_after: int, primed_at: float = 0.0) -> dict:
    warmup = primed_at + WARMUP_FRACTION * args.seconds
    first = next((s for s in samples if s.t >= warmup), samples[-1])
    last = samples[-1]
    after = [s for s in samples if s.t >= first.t]
    quarter = max(1, len(after) // 4)
    early, late, first_half = after[:quarter], after[-quarter:], after[: max(1, len(after) // 2)]

    def peak(window: list[Sample], label: str):
        values = [s.rss_kb[label] for s in window if label in s.rss_kb]
        return max(values) if values else None

    processes = {}
    for label, pid in last.pids.items():
        a, b, h = peak(early, label), peak(late, label), peak(first_half, label)
        growth = None if a is None or b is None else round(growth_pct(a, b), 3)
        second_half = None if h is None or b is None else round(growth_pct(h, b), 3)
        processes[label] = {
            "pid": pid,
            "first_kb": a,
            "last_kb": b,
            "first_half_kb": h,
            "growth_pct": growth,
            "second_half_pct": second_half,
            "grows": grows(growth, second_half, args.max_growth),
        }
    requests = sum(stats.requests.values())
    examples = sum(stats.examples.values())
    replaced = sorted({r for s in samples for r in s.workers_replaced})
    errors = stats.errors + len(hung) + len(replaced)
    report = {
        "seconds": args.seconds,
        "load_seconds": round(load_seconds, 2),
        "inter_threads": args.inter_threads,
        "async_threads": args.async_threads,
        "warmup_seconds": round(warmup, 2),
        "primed_seconds": round(primed_at, 2),
        "first_sample_t": first.t,
        "last_sample_t": last.t,
        "requests": requests,
        "examples": examples,
        "requests_by_kind": dict(stats.requests),
        "examples_by_kind": dict(stats.examples),
        "requests_per_s": round(requests / load_seconds, 2) if load_seconds else 0.0,
        "examples_per_s": round(examples / load_seconds, 2) if load_seconds else 0.0,
        "errors": errors,
        "wrong_results": stats.wrong,
        "messages": stats.messages + hung + replaced,
        "processes": processes,
        "shm": {
            "first": first.shm_ours,
            "last": last.shm_ours,
            "growth_pct": round(growth_pct(first.shm_ours, last.shm_ours), 3),
            "all_first": first.shm_all,
            "all_last": last.shm_all,
            "all_before_start": shm_before,
            "all_after_close": shm_after,
            "left_after_close": left,
        },
        "max_growth_pct": args.max_growth,
        "samples": [asdict(s) for s in samples],
    }
    report["failures"] = failures(report)
    report["passed"] = not report["failures"]
    return report


def failures(report: dict) -> list[str]:
    limit = report["max_growth_pct"]
    found = []
    if report["wrong_results"]:
        found.append(f"{report['wrong_results']} wrong result(s)")
    if report["errors"]:
        found.append(f"{report['errors']} error(s)")
    for label, p in report["processes"].items():
        if p["growth_pct"] is None:
            found.append(f"{label} (pid {p['pid']}) was not sampled at both ends (it died?)")
        elif p["grows"]:
            found.append(f"{label} grew {p['growth_pct']:+.1f}% over the run (limit {limit}%), "
                         f"{p['second_half_pct']:+.1f}% over its second half (limit {limit / 2:g}%)")
    shm = report["shm"]
    if shm["last"] > shm["first"] or shm["growth_pct"] >= limit:
        found.append(f"/dev/shm entries of this run went from {shm['first']} to {shm['last']}")
    if shm["left_after_close"]:
        found.append(f"left in /dev/shm after close: {', '.join(shm['left_after_close'])}")
    return found


def print_report(report: dict) -> None:
    mib = 1024.0
    print()
    print(f"soak: {report['load_seconds']:.0f} s of load, {report['inter_threads']} workers per model, "
          f"{report['async_threads']} async callers; first sample at {report['first_sample_t']:.1f} s "
          f"(after {report['warmup_seconds']:.1f} s warm-up), last at {report['last_sample_t']:.1f} s")
    print(f"{'process':<24} {'pid':>8} {'first MiB':>11} {'half MiB':>10} {'last MiB':>10} {'growth':>8} {'2nd half':>9}")
    for label, p in report["processes"].items():
        first = "-" if p["first_kb"] is None else f"{p['first_kb'] / mib:.1f}"
        half = "-" if p["first_half_kb"] is None else f"{p['first_half_kb'] / mib:.1f}"
        last = "-" if p["last_kb"] is None else f"{p['last_kb'] / mib:.1f}"
        growth = "-" if p["growth_pct"] is None else f"{p['growth_pct']:+.1f}%"
        second = "-" if p["second_half_pct"] is None else f"{p['second_half_pct']:+.1f}%"
        print(f"{label:<24} {p['pid']:>8} {first:>11} {half:>10} {last:>10} {growth:>8} {second:>9}" + ("  GROWS" if p["grows"] else ""))
    shm = report["shm"]
    print(f"{'/dev/shm entries (ours)':<24} {'':>8} {shm['first']:>11} {'':>10} {shm['last']:>10} {shm['growth_pct']:>+7.1f}%")
    print(f"{'/dev/shm entries (all)':<24} {'':>8} {shm['all_first']:>11} {'':>10} {shm['all_last']:>10} {'(info)':>8}")
    print()
    seconds = report["load_seconds"] or 1.0
    print(f"requests: {report['requests']} ({report['requests_per_s']:.1f}/s), "
          f"examples: {report['examples']} ({report['examples_per_s']:.1f}/s)")
    for kind, count in sorted(report["requests_by_kind"].items()):
        print(f"  {kind:<24} {count:>7} requests {report['examples_by_kind'][kind]:>9} examples {count / seconds:>8.1f} req/s")
    print(f"errors: {report['errors']}, wrong results: {report['wrong_results']}")
    for message in report["messages"]:
        print(f"  {message}")
    print(f"/dev/shm after close: {shm['all_after_close']} shmengine-* entries in all "
          f"({shm['all_before_start']} before start), {len(shm['left_after_close'])} of this run")
    if report["passed"]:
        print("PASS")
    else:
        print("FAIL: " + "; ".join(report["failures"]))


# -- main --------------------------------------------------------------------------------------


def start_models(inter_threads: int) -> Models:
    options = {"inter_threads": inter_threads, "intra_threads": 1}
    translator = shmengine.Translator(MARIAN, **options)
    try:
        generator = shmengine.Generator(GPT2, **options)
        try:
            engine = shmengine.Engine(MLP, **options)
        except BaseException:
            generator.close()
            raise
    except BaseException:
        translator.close()
        raise
    return Models(translator, generator, engine)


def leftover_entries(ours: set[str], timeout: float = 5.0) -> list[str]:
    """Entries of this run still in /dev/shm after close (waiting up to ``timeout`` for them to go)."""

    def left() -> list[str]:
        return sorted(n for n in shm_entries() if any(n == o or n.startswith(o + "-") for o in ours))

    end = time.monotonic() + timeout
    while left() and time.monotonic() < end:
        time.sleep(0.05)
    return left()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run the load (default 60)")
    parser.add_argument("--inter-threads", type=int, default=2, help="workers per model (default 2)")
    parser.add_argument("--async-threads", type=int, default=3, help="caller threads submitting asynchronously (default 3)")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("--max-growth", type=float, default=5.0, help="fail at this growth in %% or more (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.inter_threads < 1 or args.async_threads < 0 or args.sample_interval <= 0:
        parser.error("--seconds and --sample-interval must be > 0, --inter-threads >= 1, --async-threads >= 0")
    return args


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that the models are closed and their segments leave
    /dev/shm even when the whole process group is terminated: the fork servers, which remove
    the segments when the supervisor dies, then die at once themselves and leave them behind."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    refs = References(args.seed)
    shm_before = len(shm_entries())
    log(f"starting 3 models x {args.inter_threads} workers")
    models = start_models(args.inter_threads)
    stats = Stats()
    samples = SampleLog()
    hung: list[str] = []
    monitor: Monitor | None = None
    load: Load | None = None
    try:
        monitor = Monitor(models)
        log(f"running {args.seconds:g} s of load: translate, generate, mlp and {args.async_threads} async callers")
        start = time.monotonic()
        deadline = start + args.seconds
        load = Load(models, refs, stats, deadline=deadline)
        prime(load)
        primed_at = time.monotonic() - start
        log(f"primed every worker with the largest shapes in {primed_at:.1f} s")
        callers = start_callers(load, args.async_threads, args.seed)
        run_sampler(monitor, samples, start, deadline, args.sample_interval)
        for thread in callers:
            thread.join(max(0.0, deadline + JOIN_TIMEOUT - time.monotonic()))
            if thread.is_alive():
                hung.append(f"caller thread {thread.name} still waiting {JOIN_TIMEOUT:.0f} s after the end of the run (hang)")
        load_seconds = time.monotonic() - start
    finally:
        if load is not None:
            load.deadline = 0.0  # callers still running (after a hang or a SIGTERM) stop here
        models.close()
    left = leftover_entries(monitor.seen_ours)
    report = build_report(args, samples.read(), stats, load_seconds, hung, left, shm_before, len(shm_entries()), primed_at)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
