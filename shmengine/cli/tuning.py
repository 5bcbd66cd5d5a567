"""Thread tuning: sweep inter x intra splits on a model and workload, as PyTorch's CPU threading
guide tunes threads for a matmul, and say which split is best for throughput and for latency.

For each split that fits the usable cores (``inter * intra <= cores``) an engine is started and
measured twice:

* **throughput**: every batch submitted at once (asynchronous), batches per second;
* **latency**: one batch at a time, median and p95 of the round trip.

More workers win throughput (batches run side by side); more intra threads win the latency of
one batch. The sweep shows where that trade sits on this machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shmengine.api.engine import Engine
from shmengine.model.weights import TensorSpec

__all__ = ["SplitResult", "candidate_splits", "sweep", "synthetic_feeds", "format_table", "plot"]

logger = logging.getLogger("shmengine")


@dataclass
class SplitResult:
    inter_threads: int
    intra_threads: int
    batches_per_s: float
    examples_per_s: float
    latency_median_ms: float
    latency_p95_ms: float


def candidate_splits(cores: int) -> list[tuple[int, int]]:
    """Every (inter, intra) split that fits the cores: inter * intra <= cores."""
    return [(inter, intra) for inter in range(1, cores + 1) for intra in range(1, cores // inter + 1)]


def synthetic_feeds(inputs: Sequence[TensorSpec], batch_size: int, *, seed: int = 0, other_dims: int = 16) -> dict:
    """Random inputs matching the model's specs: the first symbolic dim is the batch size."""
    rng = np.random.default_rng(seed)
    feeds = {}
    # A symbolic dim means the same size wherever it appears, and Optimum's exports spell sums
    # ("past_sequence_length + sequence_length" for a KV-cached attention mask): an attention
    # mask that disagreed with the cache it masks made ORT index out of bounds.
    sizes: dict[str, int] = {}

    def size(axis: int, d) -> int:
        if isinstance(d, int) and d > 0:
            return d
        if isinstance(d, str) and "+" in d:
            return sum(size(1, part.strip()) for part in d.split("+"))
        if not isinstance(d, str) or not d:
            return batch_size if axis == 0 else other_dims
        return sizes.setdefault(d, batch_size if axis == 0 else other_dims)

    for spec in inputs:
        if spec.optional:
            continue
        dims = spec.shape or (batch_size,)
        shape = [size(axis, d) for axis, d in enumerate(dims)]
        dtype = spec.dtype
        if dtype is None or dtype == np.dtype(object):
            raise ValueError(f"cannot make synthetic data for input {spec.name!r} of type {spec.type_name}")
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def measure(engine: Engine, feeds: dict, *, batches: int, latency_runs: int) -> tuple[float, list[float]]:
    """(batches per second with all submitted at once, list of one-at-a-time latencies in s)."""
    engine.run_batch([feeds] * engine.num_workers)  # warm-up: every worker runs once
    start = time.perf_counter()
    for future in engine.run_batch([feeds] * batches, asynchronous=True):
        future.result()
    rate = batches / (time.perf_counter() - start)
    latencies = []
    for _ in range(latency_runs):
        t0 = time.perf_counter()
        engine.run_batch(feeds)
        latencies.append(time.perf_counter() - t0)
    return rate, latencies


def sweep(
    model_path,
    *,
    batch_size: int = 8,
    batches: int = 64,
    latency_runs: int = 30,
    splits: Sequence[tuple[int, int]] | None = None,
    cores: int | None = None,
    progress=None,
) -> list[SplitResult]:
    """Measure every split; ``progress(result)`` is called after each one."""
    from shmengine.runtime.threads import usable_cores

    cores = cores or usable_cores()
    results = []
    for inter, intra in splits or candidate_splits(cores):
        with Engine(model_path, inter_threads=inter, intra_threads=intra, max_queued_batches=-1) as engine:
            feeds = synthetic_feeds(engine.inputs, batch_size)
            rate, latencies = measure(engine, feeds, batches=batches, latency_runs=latency_runs)
        result = SplitResult(
            inter,
            intra,
            rate,
            rate * batch_size,
            float(np.median(latencies) * 1e3),
            float(np.percentile(latencies, 95) * 1e3),
        )
        results.append(result)
        if progress:
            progress(result)
    return results


def best(results: Sequence[SplitResult]) -> tuple[SplitResult, SplitResult]:
    """(best for throughput, best for latency)."""
    return max(results, key=lambda r: r.batches_per_s), min(results, key=lambda r: r.latency_median_ms)


def format_table(results: Sequence[SplitResult]) -> str:
    lines = [f"{'inter':>5} {'intra':>5} {'batches/s':>10} {'examples/s':>11} {'p50 ms':>8} {'p95 ms':>8}"]
    for r in results:
        lines.append(
            f"{r.inter_threads:>5} {r.intra_threads:>5} {r.batches_per_s:>10.1f} {r.examples_per_s:>11.1f} "
            f"{r.latency_median_ms:>8.2f} {r.latency_p95_ms:>8.2f}"
        )
    fastest, quickest = best(results)
    lines.append(
        f"best for throughput: inter_threads={fastest.inter_threads} intra_threads={fastest.intra_threads} "
        f"({fastest.batches_per_s:.1f} batches/s)"
    )
    lines.append(
        f"best for latency:    inter_threads={quickest.inter_threads} intra_threads={quickest.intra_threads} "
        f"(median {quickest.latency_median_ms:.2f} ms)"
    )
    return "\n".join(lines)


def plot(results: Sequence[SplitResult], path, title: str = "shmengine thread sweep") -> bool:
    """Write a PNG: throughput bars and latency markers per split. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'shmengine[tune]'); no plot written")
        return False
    labels = [f"{r.inter_threads}x{r.intra_threads}" for r in results]
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(results)), 4))
    ax.bar(x, [r.batches_per_s for r in results], color="tab:blue", label="throughput (batches/s)")
    ax.set_xticks(x, labels)
    ax.set_xlabel("inter_threads x intra_threads")
    ax.set_ylabel("batches/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.errorbar(
        x,
        [r.latency_median_ms for r in results],
        yerr=[[0] * len(results), [r.latency_p95_ms - r.latency_median_ms for r in results]],
        fmt="o",
        color="tab:red",
        capsize=4,
        label="latency median (bar to p95)",
    )
    ax2.set_ylabel("latency ms", color="tab:red")
    ax2.set_ylim(bottom=0)
    ax.set_title(title)
    fig.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
