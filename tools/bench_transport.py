#!/usr/bin/env python
"""From which tensor size is the shared-memory arena faster than pickling through the socket?

A forked echo child speaks ``shmengine.runtime.transport`` with this process over a socketpair
``Connection`` and two :class:`shmengine.runtime.sharedmem.Arena`\\ s (one per direction), as a pool
worker does. For every size, a float32 array makes the round trip parent -> child -> parent,
alternately

* ``socket``: ``threshold`` larger than any message, so the array is pickled in-band and the
  bytes travel through the socket both ways;
* ``arena``: ``threshold=0``, so the array is copied into the sender's arena and only its
  offset travels through the socket.

As in the real pool, the echo child receives with ``copy=False`` (a read-only view into the
arena, sent straight back) and this process receives the result with ``copy=True``. The table
gives the median round trip of each, their ratio, and the smallest size from which the arena
wins, next to the current ``shmengine.runtime.transport.SHM_THRESHOLD``.

Usage::

    python tools/bench_transport.py            # all sizes, ~1 s per size and mode
    python tools/bench_transport.py --quick    # a CI-sized run (a few seconds)

Measured on 2 cores (Python 3.11, a shared and therefore noisy machine), median round trip::

    size      socket µs   arena µs   socket/arena
    4 KiB          52.1       52.7          0.99x
    16 KiB         61.7       56.1          1.10x
    64 KiB         82.5       67.7          1.22x
    256 KiB       439.5       65.8          6.68x
    1 MiB        1821.7      154.9         11.76x
    64 MiB     289224.5    31938.1          9.06x

The arena was level with the socket at 4 KiB and ahead from 16 KiB on. Through the socket the
cost jumps between 64 KiB and 256 KiB, where a message no longer fits the socket buffer.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from shmengine.runtime.sharedmem import Arena  # noqa: E402
from shmengine.runtime.transport import SHM_THRESHOLD, recv_message, send_message  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
DEFAULT_SIZES = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB]
IN_BAND = 1 << 62  # a threshold no buffer reaches: everything is pickled into the socket
THROUGH_ARENA = 0  # every buffer goes through the arena


def fmt_size(n: int) -> str:
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB} MiB"
    if n >= KIB and n % KIB == 0:
        return f"{n // KIB} KiB"
    return f"{n} B"


def parse_size(text: str) -> int:
    text = text.strip().upper().replace("IB", "").replace("B", "")
    factor = {"K": KIB, "M": MIB, "G": 1024 * MIB}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * factor)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the echo child ---------------------------------------------------------------------------


def echo_child(conn: Connection, arena_in_fd: int, arena_out_fd: int) -> None:
    """Receive (threshold, array) with copy=False and send it straight back with that threshold."""
    arena_in = Arena(arena_in_fd, writable=False)  # written by the parent
    arena_out = Arena(arena_out_fd, writable=True)  # written by us
    while True:
        try:
            message = recv_message(conn, arena_in, copy=False)
        except (EOFError, ConnectionResetError):
            return
        if message is None:
            return
        send_message(conn, message, arena_out, threshold=message[0])
        # The array is a view into arena_in: drop it before the parent writes there again.
        del message


class EchoPeer:
    """This process's end: a forked echo child, a socket and the two arenas."""

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.arena_in = Arena.create("bench-in")  # parent -> child
        self.arena_out = Arena.create("bench-out")  # child -> parent
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                ours.close()
                echo_child(Connection(theirs.detach()), self.arena_in.fd, self.arena_out.fd)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self.conn = Connection(ours.detach())

    def round_trip(self, array: np.ndarray, threshold: int) -> tuple[int, np.ndarray]:
        """One round trip; returns (nanoseconds, the array that came back)."""
        start = time.perf_counter_ns()
        send_message(self.conn, (threshold, array), self.arena_in, threshold=threshold)
        reply = recv_message(self.conn, self.arena_out, copy=True)
        elapsed = time.perf_counter_ns() - start
        return elapsed, reply[1]

    def close(self) -> None:
        try:
            send_message(self.conn, None, None)
        except OSError:
            pass
        self.conn.close()
        _, status = os.waitpid(self.pid, 0)
        self.arena_in.close()
        self.arena_out.close()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the echo child exited with status {os.waitstatus_to_exitcode(status)}")


# -- measuring --------------------------------------------------------------------------------


def measure(peer: EchoPeer, nbytes: int, *, seconds: float, min_repeats: int, max_repeats: int, warmup: int):
    """Median round trip (µs) of ``nbytes`` through the socket and through the arena, interleaved."""
    array = np.random.default_rng(nbytes).standard_normal(nbytes // 4).astype(np.float32)
    for threshold in (IN_BAND, THROUGH_ARENA):
        _, back = peer.round_trip(array, threshold)  # also grows the arenas to this size
        if back.dtype != array.dtype or not np.array_equal(back, array):
            raise AssertionError(f"the echo of {fmt_size(nbytes)} (threshold={threshold}) differs from what was sent")
        # The echo child sends back a read-only view (copy=False), and pickle protocol 5 records
        # read-only buffers (READONLY_BUFFER / bytes): the echo arrives read-only even with
        # copy=True. The copy is made all the same, which is what is timed here.
        for _ in range(warmup):
            peer.round_trip(array, threshold)
    times: dict[int, list[int]] = {IN_BAND: [], THROUGH_ARENA: []}
    deadline = time.perf_counter() + seconds
    n = 0
    while n < max_repeats and (n < min_repeats or time.perf_counter() < deadline):
        # Alternate the two modes so that load from elsewhere hits both alike.
        order = (IN_BAND, THROUGH_ARENA) if n % 2 == 0 else (THROUGH_ARENA, IN_BAND)
        for threshold in order:
            ns, _ = peer.round_trip(array, threshold)
            times[threshold].append(ns)
        n += 1
    socket_us = statistics.median(times[IN_BAND]) / 1e3
    arena_us = statistics.median(times[THROUGH_ARENA]) / 1e3
    return socket_us, arena_us, n


def crossover(results: list[tuple[int, float, float, int]]) -> tuple[int | None, float | None]:
    """The smallest size from which the arena wins at every larger size, and a log-interpolated estimate."""
    wins_from = None
    for i in range(len(results) - 1, -1, -1):
        size, socket_us, arena_us, _ = results[i]
        if arena_us < socket_us:
            wins_from = size
        else:
            break
    estimate = None
    if wins_from is not None:
        index = [r[0] for r in results].index(wins_from)
        if index > 0:
            (s0, so0, ar0, _), (s1, so1, ar1, _) = results[index - 1], results[index]
            r0, r1 = math.log(so0 / ar0), math.log(so1 / ar1)  # <= 0, > 0
            frac = r0 / (r0 - r1) if r0 != r1 else 0.5
            estimate = math.exp(math.log(s0) + frac * (math.log(s1) - math.log(s0)))
    return wins_from, estimate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short CI-sized run (fewer repeats per size)")
    parser.add_argument("--sizes", help="comma-separated sizes, e.g. 4K,64K,1M (default: 4 KiB ... 64 MiB)")
    parser.add_argument(
        "--seconds", type=float, help="time spent per size, both modes together (default 1.0; quick 0.2)"
    )
    parser.add_argument("--min-repeats", type=int, help="round trips per mode at least (default 15; quick 5)")
    parser.add_argument("--max-repeats", type=int, help="round trips per mode at most (default 5000; quick 500)")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")] if args.sizes else DEFAULT_SIZES
    seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 1.0)
    min_repeats = args.min_repeats if args.min_repeats is not None else (5 if args.quick else 15)
    max_repeats = args.max_repeats if args.max_repeats is not None else (500 if args.quick else 5000)
    warmup = 2 if args.quick else 5

    log(
        f"bench_transport: {len(sizes)} sizes, {seconds:g} s per size, {min_repeats}..{max_repeats} round trips per mode"
    )
    results = []
    peer = EchoPeer()
    try:
        for nbytes in sizes:
            socket_us, arena_us, n = measure(
                peer, nbytes, seconds=seconds, min_repeats=min_repeats, max_repeats=max_repeats, warmup=warmup
            )
            results.append((nbytes, socket_us, arena_us, n))
            log(
                f"  {fmt_size(nbytes):>7}: socket {socket_us:10.1f} µs, arena {arena_us:10.1f} µs ({n} round trips each)"
            )
    finally:
        peer.close()

    print()
    print("Round trip of one float32 array parent -> echo child -> parent (median)")
    header = f"{'size':>8} | {'socket µs':>11} | {'arena µs':>11} | {'socket/arena':>12} | {'faster':>6} | {'n':>5}"
    print(header)
    print("-" * len(header))
    for nbytes, socket_us, arena_us, n in results:
        faster = "arena" if arena_us < socket_us else "socket"
        print(
            f"{fmt_size(nbytes):>8} | {socket_us:11.1f} | {arena_us:11.1f} | {socket_us / arena_us:11.2f}x | {faster:>6} | {n:>5}"
        )
    print()
    wins_from, estimate = crossover(results)
    print(f"SHM_THRESHOLD (shmengine/runtime/transport.py) = {fmt_size(SHM_THRESHOLD)}")
    if wins_from is None:
        print("The arena does not win at the largest size measured: no crossover found.")
    else:
        where = f"; log-interpolated crossover ~ {estimate / KIB:.0f} KiB" if estimate else ""
        print(f"The arena wins from {fmt_size(wins_from)} (at that size and every larger one measured){where}.")
        measured = [r[0] for r in results]
        below = [s for s in measured if s < wins_from]
        last_loss = below[-1] if below else None
        if last_loss is not None and last_loss < SHM_THRESHOLD <= wins_from:
            print(
                f"SHM_THRESHOLD lies between the last size where the socket wins ({fmt_size(last_loss)}) and the "
                f"first where the arena wins ({fmt_size(wins_from)}): consistent with this run."
            )
        elif SHM_THRESHOLD > wins_from:
            print(
                f"SHM_THRESHOLD is above the crossover: sizes in [{fmt_size(wins_from)}, {fmt_size(SHM_THRESHOLD)}) "
                "go through the socket although the arena is faster there in this run."
            )
        else:
            print(
                f"SHM_THRESHOLD is below the crossover: sizes in [{fmt_size(SHM_THRESHOLD)}, {fmt_size(wins_from)}) "
                "go through the arena although the socket is faster there in this run."
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
