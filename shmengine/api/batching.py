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

__all__ = ["plan_batches", "split_future", "BatchFuture"]


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


class BatchFuture(Future):
    """A batch's future that starts its examples' futures when the pool starts the batch, so an
    example future is cancellable exactly while its batch waits in the queue."""

    def __init__(self):
        super().__init__()
        self.examples: list[Future] = []

    def set_running_or_notify_cancel(self) -> bool:
        started = super().set_running_or_notify_cancel()
        if started:
            for example in self.examples:
                example.set_running_or_notify_cancel()  # a cancelled example stays cancelled
        return started


def split_future(batch_future: Future, count: int, convert: Callable[[object, int], object]) -> list[Future]:
    """``count`` per-example futures fed by one batch future; ``convert(batch_result, i)`` makes
    example i's result.

    Given a :class:`BatchFuture` that is not yet submitted, the example futures stay pending
    while the batch is queued: ``cancel()`` on one returns True, and once every example of a
    batch is cancelled the batch is cancelled and never runs. Any other future is taken as
    already running (its examples cannot be cancelled)."""
    futures = [Future() for _ in range(count)]
    if isinstance(batch_future, BatchFuture):
        batch_future.examples = futures
    else:
        for f in futures:
            f.set_running_or_notify_cancel()

    def cancel_batch_when_all_cancelled(_example: Future) -> None:
        if all(f.cancelled() for f in futures):
            batch_future.cancel()

    def done(parent: Future) -> None:
        live = [(i, f) for i, f in enumerate(futures) if not f.cancelled()]
        if parent.cancelled():
            for _, f in live:
                if not f.cancel():  # a pending example is cancelled with its batch
                    f.set_exception(RuntimeError("the batch was cancelled"))
            return
        error = parent.exception()
        for i, f in live:
            if error is not None:
                f.set_exception(error)
                continue
            try:
                f.set_result(convert(parent.result(), i))
            except Exception as exc:  # a conversion bug must not leave the caller waiting
                f.set_exception(exc)

    for f in futures:
        f.add_done_callback(cancel_batch_when_all_cancelled)
    batch_future.add_done_callback(done)
    return futures
