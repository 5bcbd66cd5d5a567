"""Splitting a call's examples into batches, and putting results back in input order.

As CTranslate2 does with ``max_batch_size``: examples are sorted by length so that each batch
holds examples of similar length (little padding), cut into chunks of ``max_batch_size``
examples (``batch_type="examples"``) or of at most ``max_batch_size`` padded tokens
(``"tokens"``). The chunks run in parallel on the workers; each example's future completes when
its chunk does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future

__all__ = ["plan_batches", "split_future"]


def plan_batches(lengths: Sequence[int], max_batch_size: int, batch_type: str) -> list[list[int]]:
    """Index lists, one per batch; every index appears once."""
    if batch_type not in ("examples", "tokens"):
        raise ValueError(f"batch_type must be 'examples' or 'tokens', got {batch_type!r}")
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0 (0 = one batch), got {max_batch_size}")
    indices = list(range(len(lengths)))
    if max_batch_size == 0 or not indices:
        return [indices] if indices else []
    indices.sort(key=lambda i: -lengths[i])
    batches, current, longest = [], [], 0
    for i in indices:
        if current:
            size = len(current) + 1 if batch_type == "examples" else max(longest, lengths[i], 1) * (len(current) + 1)
            if size > max_batch_size:
                batches.append(current)
                current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    batches.append(current)
    return batches


def split_future(batch_future: Future, count: int, convert: Callable[[object, int], object]) -> list[Future]:
    """``count`` per-example futures fed by one batch future; ``convert(batch_result, i)`` makes
    example i's result. Cancelling every example future cancels the batch if it has not started."""
    futures = [Future() for _ in range(count)]
    for f in futures:
        f.set_running_or_notify_cancel()

    def done(parent: Future) -> None:
        if parent.cancelled():
            for f in futures:
                f.set_exception(RuntimeError("the batch was cancelled"))
            return
        error = parent.exception()
        for i, f in enumerate(futures):
            if error is not None:
                f.set_exception(error)
                continue
            try:
                f.set_result(convert(parent.result(), i))
            except Exception as exc:  # a conversion bug must not leave the caller waiting
                f.set_exception(exc)

    batch_future.add_done_callback(done)
    return futures
