"""Which part of a layer a rank holds: contiguous blocks of heads and of MLP hidden units."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Shard", "split_evenly"]


def split_evenly(count: int, ranks: int, rank: int, what: str) -> range:
    """Rank ``rank``'s contiguous block of ``count`` items. ``count`` must be a multiple of
    ``ranks``: uneven blocks would make the ranks wait for the largest one at every all-reduce,
    and attention heads cannot be cut in pieces."""
    if count % ranks:
        raise ValueError(
            f"the model has {count} {what}, which {ranks} MPI ranks cannot share evenly: run with a number of ranks "
            f"that divides {count} (tensor parallelism splits {what} across ranks)"
        )
    size = count // ranks
    return range(rank * size, (rank + 1) * size)


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``ranks``: its query heads, key/value heads and MLP hidden units."""

    rank: int
    ranks: int
    heads: range
    kv_heads: range
    hidden: range

    @classmethod
    def of(cls, rank: int, ranks: int, *, heads: int, kv_heads: int, hidden: int) -> Shard:
        kv = split_evenly(kv_heads, ranks, rank, "key/value heads")
        q = split_evenly(heads, ranks, rank, "attention heads")
        return cls(rank, ranks, q, kv, split_evenly(hidden, ranks, rank, "MLP hidden units"))

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.ranks}: heads {self.heads.start}-{self.heads.stop - 1}, "
            f"kv heads {self.kv_heads.start}-{self.kv_heads.stop - 1}, MLP units {self.hidden.start}-{self.hidden.stop - 1}"
        )
