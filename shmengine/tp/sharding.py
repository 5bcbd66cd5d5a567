"""Which part of a layer a rank holds: contiguous blocks of heads and of MLP hidden units."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EmbeddingBlock", "Shard", "split_evenly", "vocab_blocks", "head_block"]


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


def head_block(weight, rank: int, ranks: int):
    """Rank ``rank``'s block of an untied LM head [E, V] (a contiguous copy of its columns, the
    rank's own), the block sizes of every rank and the block's columns. A tied head's block is
    the rank's :class:`EmbeddingBlock` itself."""
    import numpy as np

    sizes = vocab_blocks(weight.shape[1], ranks)
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    return np.ascontiguousarray(weight[:, start:stop]), sizes, range(start, stop)


class EmbeddingBlock:
    """This rank's block of rows of a token embedding [V, E], split by vocabulary as the LM head
    is (``vocab_blocks``): ``lookup`` gives the rows of the ids inside the block and zeros for
    the others, so the sum over the ranks (one all-reduce of [batch, positions, E] per step) is
    the whole lookup. Split rather than replicated because on a small model the embedding is a
    large share of the weights (GPT-2-124M: 154 of 497 MB; replicated, a rank at N = 2 held
    0.62 of the model when its head was not tied), and the all-reduce it costs is one per step
    against two per layer. A tied head's block (``head_rows``) is this block itself."""

    def __init__(self, table, rank: int, ranks: int):
        import numpy as np

        self.vocab = table.shape[0]
        self.sizes = vocab_blocks(self.vocab, ranks)
        self.start = sum(self.sizes[:rank])
        # the rank's own copy: the whole table read from the file can then be freed
        # (np.array copies; ascontiguousarray would hand back a view of a contiguous slice)
        self.rows = np.array(table[self.start : self.start + self.sizes[rank]], dtype=np.float32, order="C")

    def lookup(self, ids):
        """[..., E]: this rank's part of the embedding of ``ids`` (zeros where another rank holds it)."""
        import numpy as np

        ids = np.asarray(ids)
        if ids.size and (ids.min() < -self.vocab or ids.max() >= self.vocab):
            bad = ids[(ids < -self.vocab) | (ids >= self.vocab)]
            raise ValueError(f"token id {int(bad.flat[0])} is outside the vocabulary of {self.vocab} entries")
        # negative ids count from the end, as ONNX's Gather (and the unsplit model) takes them:
        # a padding id of -1 in a config is seen that way
        local = np.where(ids < 0, ids + self.vocab, ids) - self.start
        inside = (local >= 0) & (local < len(self.rows))
        out = self.rows[np.where(inside, local, 0)]
        out[~inside] = 0
        return out
