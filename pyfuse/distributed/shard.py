"""Which items a rank evaluates.

One process evaluates ``n`` items in batches of ``batch_size`` consecutive
items (batch ``k`` = items ``k*B .. k*B+B-1``; the last may be shorter).
Rank ``r`` of ``s`` takes the batches ``r, r+s, r+2s, ...`` whole (round-
robin spreads slow and fast parts of a file over every rank). Its items,
concatenated, are whole batches except possibly the last global batch,
which is then last: batching them again by ``batch_size`` gives exactly
the same groups, so every item is decoded in the same batch as by one
process; local batch ``j`` is global batch ``batches[j]``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Shard", "shard_batches"]


@dataclass(frozen=True)
class Shard:
    n: int                 # items in all
    batch_size: int
    items: tuple[int, ...]    # this rank's item indices, ascending
    batches: tuple[int, ...]  # this rank's batch indices, ascending

    def global_batch(self, local_batch: int) -> int:
        """The global index of this rank's ``local_batch``-th batch."""
        return self.batches[local_batch]


def shard_batches(n: int, batch_size: int, rank: int = 0, size: int = 1) -> Shard:
    """Rank ``rank`` of ``size``'s share of ``n`` items (see the module doc)."""
    if n < 0 or batch_size < 1 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad shard request: n={n}, batch_size={batch_size}, rank={rank}, size={size}")
    n_batches = -(-n // batch_size)
    mine = tuple(range(rank, n_batches, size))
    items = tuple(i for k in mine for i in range(k * batch_size, min((k + 1) * batch_size, n)))
    return Shard(n=n, batch_size=batch_size, items=items, batches=mine)
