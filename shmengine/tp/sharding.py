"""Which part of a layer a rank holds: contiguous blocks of heads and of MLP hidden units."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Shard", "split_evenly", "vocab_blocks", "head_block"]


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


def vocab_blocks(vocab: int, ranks: int) -> tuple[int, ...]:
    """How many vocabulary entries (LM-head rows) each rank computes, in rank order: blocks as
    even as the count allows (50,257 tokens over 2 ranks: 25,129 and 25,128). Unlike heads, a
    vocabulary needs no divisibility: the ranks gather their logits once per step, after the
    head, so a block one entry larger makes no rank wait at an all-reduce."""
    base, extra = divmod(vocab, ranks)
    return tuple(base + (1 if r < extra else 0) for r in range(ranks))


def head_block(weight, rank: int, ranks: int, *, tied: bool):
    """Rank ``rank``'s block of an LM head and the block sizes of every rank: rows of a tied head
    ([V, E], the token embedding itself: a view, no copy), columns of an untied one ([E, V]: a
    contiguous copy of the block, the rank's own)."""
    import numpy as np

    vocab = weight.shape[0] if tied else weight.shape[1]
    sizes = vocab_blocks(vocab, ranks)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    block = weight[start:stop] if tied else np.ascontiguousarray(weight[:, start:stop])
    return block, sizes, range(start, stop)
