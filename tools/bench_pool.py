#!/usr/bin/env python
"""shmengine's worker pool against plain multiprocessing, side by side, in one run.

Four measures, each next to its baseline or target; one table on stdout at the end, progress
on stderr as it goes:

a. **empty round trip**: ``engine.ping().result()`` in a loop (median and p95), next to the
   same no-op round trip through ``concurrent.futures.ProcessPoolExecutor(max_workers=1)`` and
   ``multiprocessing.Pool(1).apply``. Target: median <= 200 µs.
b. **start-up** of an MLP with >= 400 MiB of float32 weights: ``Engine(path, inter_threads=1,
   intra_threads=1)`` against ``inter_threads=4`` (median of the repeats, constructor until the
   workers are ready). Target: 4 workers <= 1.5 x one. A plain ``onnxruntime.InferenceSession``
   load (one intra-op thread as ours, after an untimed first load) is given for context.
c. **memory**: total PSS (``/proc/PID/smaps_rollup``) of supervisor + fork server + N workers
   after a batch ran on each worker, against a fork ``multiprocessing.Pool(N)`` whose workers
   each load the model into their own ``InferenceSession`` (parent + workers). One batch per
   worker is proven on both sides: a barrier in the baseline, each worker's CPU time in ours.
   Target: ours <= 1.1 x weights + N x 100 MiB.
d. **throughput** of a compute-bound MLP (1024 wide, 8 layers, 64 rows per batch), every batch
   submitted asynchronously: ``inter_threads=2`` against ``inter_threads=1`` (intra_threads=1
   each; target >= 1.8x on 2 cores), and a ``multiprocessing.Pool(2)`` that loads the model in
   each worker and gets the same batches.

Usage::

    python tools/bench_pool.py             # full run, < 4 minutes on 2 cores
    python tools/bench_pool.py --quick     # CI-sized run (a small model, fewer repeats)

Models are built with ``models.builders.mlp_model`` into a temporary directory, removed at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shmengine import Engine  # noqa: E402
from shmengine.runtime.threads import usable_cores  # noqa: E402

MIB = 1 << 20
FORK = multiprocessing.get_context("fork")
DEFAULT_MODEL = REPO / "models" / "default" / "model.onnx"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    measure: str
    ours: str
    reference: str = ""
    ratio: str = ""


# -- helpers run in child processes (module level: they travel by reference) -----------------------


def _noop(x=None):
    return x


def _build_model(widths: list[int], directory: str) -> None:
    from models.builders import mlp_model, save_model

    model, params = mlp_model(widths, seed=7, name=f"bench-mlp-{widths[0]}x{len(widths) - 1}")
    del params
    save_model(model, directory, external_data=True)


def _one_thread_options():
    """Session options as our workers get them here (intra_threads=1): one intra-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


def _plain_load_seconds(path: str) -> float:
    import onnxruntime as ort

    options = _one_thread_options()
    start = time.perf_counter()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    elapsed = time.perf_counter() - start
    del session
    return elapsed


_session = None
_barrier = None


def _pool_init(path: str, barrier=None) -> None:
    """multiprocessing.Pool initializer: this worker's own InferenceSession, one intra-op thread."""
    global _session, _barrier
    import onnxruntime as ort

    _session = ort.InferenceSession(path, _one_thread_options(), providers=["CPUExecutionProvider"])
    _barrier = barrier


def _pool_run(feeds: dict) -> np.ndarray:
    return _session.run(None, feeds)[0]


def _pool_run_once_each(feeds: dict) -> int:
    """Run one batch, then wait until every worker has one: each worker takes exactly one."""
    _session.run(None, feeds)
    _barrier.wait(timeout=600)
    return os.getpid()


# -- measuring ------------------------------------------------------------------------------


def time_calls(call, n: int, warmup: int) -> tuple[float, float]:
    """Median and p95 (µs) of ``n`` sequential calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    samples = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(n):
        start = clock()
        call()
        samples[i] = clock() - start
    return float(np.median(samples)) / 1e3, float(np.percentile(samples, 95)) / 1e3


def build_model(widths: list[int], directory: Path) -> Path:
    """Build in a child process so that this process's memory stays as small as it would be."""
    start = time.perf_counter()
    process = FORK.Process(target=_build_model, args=(widths, str(directory)))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"building the model {widths} failed (exit code {process.exitcode})")
    path = directory / "model.onnx"
    size = sum(f.stat().st_size for f in directory.iterdir())
    log(f"built {path} ({size / MIB:.0f} MiB on disk) in {time.perf_counter() - start:.1f} s")
    return path


def _stat(pid: int) -> tuple[int, str] | None:
    """(ppid, comm) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    comm = data[data.index("(") + 1 : data.rindex(")")]
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[1]), comm


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[0] == pid:
                found.append(int(entry))
    return sorted(found)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's threads, to the nanosecond (/proc/PID/task/*/schedstat; stat's
    utime counts 10 ms ticks, too coarse for a small batch)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return total / 1e9


def smaps_rollup(pid: int) -> dict[str, int]:
    """The 'Pss*' lines of /proc/PID/smaps_rollup, in KiB."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith("Pss") or key == "Rss":
                values[key] = int(rest.split()[0])
    return values


def total_pss(roles: dict[int, str]) -> float:
    """Sum of the PSS of ``roles`` (pid -> role), in MiB; logs each process's share."""
    total = 0
    for pid, role in roles.items():
        values = smaps_rollup(pid)
        total += values["Pss"]
        log(
            f"    {role:<12} pid {pid:>7}: Pss {values['Pss'] / 1024:7.1f} MiB "
            f"(anon {values.get('Pss_Anon', 0) / 1024:6.1f}, file {values.get('Pss_File', 0) / 1024:6.1f}, "
            f"shmem {values.get('Pss_Shmem', 0) / 1024:6.1f}; Rss {values['Rss'] / 1024:7.1f})"
        )
    return total / 1024


def wait_all(futures) -> None:
    for future in futures:
        future.result()


# -- the four measures ------------------------------------------------------------------------


def bench_ping(args) -> list[Row]:
    n, warmup = args.ping_n, args.ping_warmup
    log(f"a. empty round trip: {n} sequential calls each after {warmup} warm-up calls")
    with Engine(DEFAULT_MODEL, inter_threads=1, intra_threads=1) as engine:
        ours = time_calls(lambda: engine.ping().result(), n, warmup)
    log(f"   engine.ping(): median {ours[0]:.1f} µs, p95 {ours[1]:.1f} µs")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=FORK) as executor:
        ppe = time_calls(lambda: executor.submit(_noop).result(), n, warmup)
    log(f"   ProcessPoolExecutor: median {ppe[0]:.1f} µs, p95 {ppe[1]:.1f} µs")
    with FORK.Pool(1) as pool:
        mpp = time_calls(lambda: pool.apply(_noop), n, warmup)
    log(f"   multiprocessing.Pool.apply: median {mpp[0]:.1f} µs, p95 {mpp[1]:.1f} µs")
    target = args.ping_target_us
    return [
        Row(
            "a. ping round trip, median (µs)",
            f"{ours[0]:.1f}",
            f"target <= {target:g}",
            f"{ours[0] / target:.2f} of target {'ok' if ours[0] <= target else 'MISSED'}",
        ),
        Row("a. ping round trip, p95 (µs)", f"{ours[1]:.1f}"),
        Row(
            "a. vs ProcessPoolExecutor(1) no-op, median (p95) µs",
            f"{ours[0]:.1f} ({ours[1]:.1f})",
            f"{ppe[0]:.1f} ({ppe[1]:.1f})",
            f"baseline/ours {ppe[0] / ours[0]:.2f}x (median)",
        ),
        Row(
            "a. vs multiprocessing.Pool(1).apply no-op, median (p95) µs",
            f"{ours[0]:.1f} ({ours[1]:.1f})",
            f"{mpp[0]:.1f} ({mpp[1]:.1f})",
            f"baseline/ours {mpp[0] / ours[0]:.2f}x (median)",
        ),
    ]


def bench_startup(args, path: Path, weights_mib: float) -> list[Row]:
    repeats = args.repeats
    log(f"b. start-up of a {weights_mib:.0f} MiB model, {repeats} repeat(s) each, inter_threads=1 and 4 interleaved")
    times: dict[int, list[float]] = {1: [], 4: []}
    for rep in range(repeats):
        for inter in (1, 4):
            start = time.perf_counter()
            with Engine(path, inter_threads=inter, intra_threads=1) as engine:
                elapsed = time.perf_counter() - start
                assert engine.num_workers == inter
            times[inter].append(elapsed)
            log(f"   repeat {rep + 1}: inter_threads={inter}: {elapsed:.2f} s")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=FORK) as executor:
        # one untimed load first: the import of onnxruntime and its environment's creation would
        # otherwise land in the first repeat only
        warm = executor.submit(_plain_load_seconds, str(path)).result()
        plain = [executor.submit(_plain_load_seconds, str(path)).result() for _ in range(repeats)]
    log(f"   plain onnxruntime.InferenceSession(path), 1 intra thread: {', '.join(f'{t:.2f}' for t in plain)} s "
        f"(untimed first load {warm:.2f} s)")
    t1, t4, tp = statistics.median(times[1]), statistics.median(times[4]), statistics.median(plain)
    ratio = t4 / t1
    return [
        Row(
            f"b. start-up inter=1, {weights_mib:.0f} MiB model (s, median of {repeats})",
            f"{t1:.2f}",
            f"plain ort.InferenceSession {tp:.2f}",
            f"{t1 / tp:.2f}x the plain load",
        ),
        Row(
            f"b. start-up inter=4 (s, median of {repeats})",
            f"{t4:.2f}",
            f"target <= {args.startup_target:g} x inter=1",
            f"{ratio:.2f}x inter=1 {'ok' if ratio <= args.startup_target else 'MISSED'}",
        ),
    ]


def engine_processes(engine: Engine) -> dict[int, str]:
    """pid -> role for the supervisor (this process), its fork server and the fork server's workers."""
    me = os.getpid()
    servers = [pid for pid in children_of(me) if "shmengine.runtime.zygote" in cmdline(pid)]
    if len(servers) != 1:
        raise RuntimeError(f"expected one fork server among the children of {me}, found {servers}")
    workers = children_of(servers[0])
    if sorted(workers) != sorted(engine.worker_pids):
        raise RuntimeError(f"the fork server's children {workers} are not engine.worker_pids {engine.worker_pids}")
    roles = {me: "supervisor", servers[0]: "fork server"}
    roles.update({pid: f"worker {i}" for i, pid in enumerate(workers)})
    return roles


def bench_memory(args, path: Path, width: int, weights_mib: float) -> list[Row]:
    rows = []
    feeds = {"x": np.random.default_rng(1).standard_normal((args.mem_rows, width)).astype(np.float32)}
    for n in args.mem_workers:
        log(f"c. memory with {n} workers ({weights_mib:.0f} MiB of weights)")
        with Engine(path, inter_threads=n, intra_threads=1) as engine:
            engine_weights = engine.weights_nbytes / MIB
            # n batches submitted at once with n idle workers. That each worker ran one (as the
            # baseline's barrier proves for it) is checked by the CPU time each worker burned.
            roles = engine_processes(engine)
            workers = [pid for pid, role in roles.items() if role.startswith("worker")]
            before = {pid: cpu_seconds(pid) for pid in workers}
            start = time.perf_counter()
            wait_all(engine.run_batch([feeds] * n, asynchronous=True))
            elapsed = time.perf_counter() - start
            burned = {pid: cpu_seconds(pid) - before[pid] for pid in workers}
            log(f"   ours: {n} batches in {elapsed:.2f} s; CPU ms per worker: {', '.join(f'{b * 1e3:.1f}' for b in burned.values())}")
            if min(burned.values()) < 0.25 * max(burned.values()):
                raise RuntimeError(f"the {n} batches did not run one per worker (CPU seconds per worker {burned})")
            ours = total_pss(roles)
        barrier = FORK.Barrier(n)
        with FORK.Pool(n, initializer=_pool_init, initargs=(str(path), barrier)) as pool:
            pids = pool.map(_pool_run_once_each, [feeds] * n, chunksize=1)
            if len(set(pids)) != n:
                raise RuntimeError(f"the {n} batches ran on {len(set(pids))} pool workers, expected {n}")
            me = os.getpid()
            children = children_of(me)
            if sorted(children) != sorted(pids):
                raise RuntimeError(f"children of {me} are {children}, but the pool workers are {pids}")
            log("   baseline multiprocessing.Pool:")
            roles = {me: "parent"}
            roles.update({pid: f"pool worker {i}" for i, pid in enumerate(sorted(pids))})
            baseline = total_pss(roles)
        bound = 1.1 * engine_weights + n * args.mem_per_worker
        log(f"   total PSS: ours {ours:.0f} MiB, baseline {baseline:.0f} MiB, bound {bound:.0f} MiB")
        rows += [
            Row(
                f"c. memory N={n}: total PSS (MiB), weights {engine_weights:.0f} MiB",
                f"{ours:.0f}",
                f"mp.Pool({n}) {baseline:.0f}",
                f"baseline/ours {baseline / ours:.2f}x",
            ),
            Row(
                f"c. memory N={n}: vs 1.1 x weights + {n} x {args.mem_per_worker:g} MiB",
                f"{ours:.0f}",
                f"bound {bound:.0f}",
                f"{ours / bound:.2f} of bound {'ok' if ours <= bound else 'MISSED'}",
            ),
        ]
    return rows


def run_engine_batches(path: Path, inter: int, batches: list[dict], warmup: int) -> float:
    """Batches per second of ``batches`` all submitted asynchronously to a fresh engine."""
    with Engine(path, inter_threads=inter, intra_threads=1) as engine:
        wait_all(engine.run_batch(batches[:warmup], asynchronous=True))
        start, cpu = time.perf_counter(), time.process_time()
        futures = engine.run_batch(batches, asynchronous=True)
        wait_all(futures)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    rate = len(batches) / elapsed
    # On 2 cores, what the supervisor (caller + manager thread) burns is taken from the workers.
    log(
        f"   inter_threads={inter}: {rate:.1f} batches/s; supervisor CPU {cpu:.2f} s over {elapsed:.2f} s "
        f"({100 * cpu / elapsed:.0f}% of a core, {1e6 * cpu / len(batches):.0f} µs per batch)"
    )
    return rate


def bench_throughput(args, path: Path) -> list[Row]:
    width, rows_per_batch = args.tp_width, args.tp_rows
    rng = np.random.default_rng(2)
    distinct = [{"x": rng.standard_normal((rows_per_batch, width)).astype(np.float32)} for _ in range(8)]
    # Calibrate: how many batches make inter_threads=1 run for about --tp-seconds.
    with Engine(path, inter_threads=1, intra_threads=1) as engine:
        engine.run_batch(distinct)
        start = time.perf_counter()
        engine.run_batch(distinct * 2)
        per_batch = (time.perf_counter() - start) / (2 * len(distinct))
    count = max(4 * len(distinct), int(round(args.tp_seconds / per_batch)))
    batches = [distinct[i % len(distinct)] for i in range(count)]
    warmup = 2 * len(distinct)
    log(f"d. throughput: {count} batches of {rows_per_batch} x {width} (~{per_batch * 1e3:.1f} ms each on one worker)")
    rate1 = run_engine_batches(path, 1, batches, warmup)
    rate2 = run_engine_batches(path, 2, batches, warmup)
    with FORK.Pool(2, initializer=_pool_init, initargs=(str(path),)) as pool:
        pool.map(_pool_run, batches[:warmup], chunksize=1)
        start = time.perf_counter()
        for _ in pool.imap_unordered(_pool_run, batches, chunksize=1):
            pass
        pool_rate = count / (time.perf_counter() - start)
    log(f"   multiprocessing.Pool(2): {pool_rate:.1f} batches/s")
    ratio = rate2 / rate1
    return [
        Row(f"d. throughput inter=1, {width}x{args.tp_layers} MLP, {rows_per_batch} rows (batches/s)", f"{rate1:.1f}"),
        Row(
            "d. throughput inter=2 (batches/s)",
            f"{rate2:.1f}",
            f"target >= {args.tp_target:g} x inter=1",
            f"{ratio:.2f}x inter=1 {'ok' if ratio >= args.tp_target else 'MISSED'}",
        ),
        Row(
            "d. throughput inter=2 vs mp.Pool(2) (batches/s)",
            f"{rate2:.1f}",
            f"mp.Pool(2) {pool_rate:.1f}",
            f"ours/baseline {rate2 / pool_rate:.2f}x",
        ),
    ]


# -- main ---------------------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    headers = ("measure", "ours", "baseline / target", "ratio")
    cells = [headers] + [(r.measure, r.ours, r.reference, r.ratio) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    line = " | ".join(f"{h:<{w}}" for h, w in zip(headers, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for c in cells[1:]:
        print(
            " | ".join([f"{c[0]:<{widths[0]}}", f"{c[1]:>{widths[1]}}", f"{c[2]:<{widths[2]}}", f"{c[3]:<{widths[3]}}"])
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized run: small model, fewer calls, one repeat")
    parser.add_argument(
        "--sections",
        default="ping,startup,memory,throughput",
        help="comma-separated subset of ping,startup,memory,throughput (default: all)",
    )
    group = parser.add_argument_group("a. empty round trip")
    group.add_argument("--ping-n", type=int, help="timed calls (default 3000; quick 500)")
    group.add_argument("--ping-warmup", type=int, help="untimed calls first (default 300; quick 50)")
    group.add_argument("--ping-target-us", type=float, default=200.0)
    group = parser.add_argument_group("b./c. the large model")
    group.add_argument("--width", type=int, help="MLP width (default 4096: 7 layers = 448 MiB; quick 1024)")
    group.add_argument("--layers", type=int, default=7, help="MLP layers (default 7)")
    group.add_argument("--repeats", type=int, help="start-up repeats per setting (default 3; quick 1)")
    group.add_argument("--startup-target", type=float, default=1.5)
    group.add_argument("--mem-workers", help="comma-separated worker counts (default 2,4; quick 2)")
    group.add_argument("--mem-rows", type=int, default=16, help="rows of the batch run before measuring")
    group.add_argument("--mem-per-worker", type=float, default=100.0, help="MiB allowed per worker in the bound")
    group = parser.add_argument_group("d. throughput")
    group.add_argument("--tp-width", type=int, default=1024)
    group.add_argument("--tp-layers", type=int, default=8)
    group.add_argument("--tp-rows", type=int, default=64, help="rows per batch")
    group.add_argument("--tp-seconds", type=float, help="seconds of work at inter_threads=1 (default 10; quick 2)")
    group.add_argument("--tp-target", type=float, default=1.8)
    args = parser.parse_args(argv)
    quick = args.quick
    args.ping_n = args.ping_n or (500 if quick else 3000)
    args.ping_warmup = args.ping_warmup if args.ping_warmup is not None else (50 if quick else 300)
    args.width = args.width or (1024 if quick else 4096)
    args.repeats = args.repeats or (1 if quick else 3)
    args.mem_workers = [int(n) for n in (args.mem_workers or ("2" if quick else "2,4")).split(",")]
    args.tp_seconds = args.tp_seconds or (2.0 if quick else 10.0)
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = args.sections - {"ping", "startup", "memory", "throughput"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    log(
        f"bench_pool: sections {','.join(sorted(args.sections))}, {usable_cores()} usable cores, pid {os.getpid()}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="shmengine-bench-pool-"))
    rows: list[Row] = []
    try:
        if "ping" in args.sections:
            rows += bench_ping(args)
        if args.sections & {"startup", "memory"}:
            widths = [args.width] * (args.layers + 1)
            big = build_model(widths, tmp / "big")
            weights_mib = args.layers * (args.width * args.width + args.width) * 4 / MIB
            if "startup" in args.sections:
                rows += bench_startup(args, big, weights_mib)
            if "memory" in args.sections:
                rows += bench_memory(args, big, args.width, weights_mib)
            shutil.rmtree(tmp / "big")
        if "throughput" in args.sections:
            small = build_model([args.tp_width] * (args.tp_layers + 1), tmp / "throughput")
            rows += bench_throughput(args, small)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"done in {time.perf_counter() - started:.0f} s")
    print()
    print(
        f"shmengine pool benchmark ({'quick' if args.quick else 'full'} run, {usable_cores()} usable cores)"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
