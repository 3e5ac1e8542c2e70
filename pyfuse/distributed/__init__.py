"""Running pyfuse on several processes or Macs under MLX's own launcher.

``mlx.launch --hostfile hosts.json -- pyfuse eval mc ...`` starts the same
command once per rank; MLX's ``mx.distributed`` (ring backend over TCP or
Thunderbolt, MPI, JACCL) connects them. This package is the one place that
knows about it:

- :mod:`.group`: the group this process belongs to. Without a launcher
  (no ``MLX_RANK`` / MPI rank in the environment) it is one process of size
  1 and nothing here touches ``mx.distributed``: every caller behaves
  exactly as a single process.
- :mod:`.shard`: which items a rank evaluates (whole batches of the
  single-process batch composition, round-robin), so that every item is
  decoded in exactly the batch it would be decoded in by one process.
- :mod:`.collect`: per-item results gathered to every rank as bytes, and
  failures agreed on (a rank that fails or dies is a clear error on the
  others, never a hang in a collective the failed rank never reaches).
- :mod:`.console`: only rank 0 prints; the others stay quiet.
- :mod:`.training`: data-parallel training (each rank a share of every
  batch, the token-weighted gradient summed over the ranks).
- :mod:`.fuse`: ``pyfuse fuse`` across ranks (each rank a share of the
  modules, rank 0 writes the model).
- :mod:`.experiment`: ``pyfuse experiment run`` across ranks: rank 0 runs
  the plan and writes every output, the others join its evaluation and
  fuse steps.
- :mod:`.local`: N ranks on this machine (tests, benches, trying it out).

Only rank 0 writes outputs (:func:`writes`).
"""

from .collect import RankError, all_gather_bytes, broadcast_json, map_shard, together
from .group import Group, alone, current, launched, writes
from .shard import Shard, shard_batches

__all__ = ["Group", "RankError", "Shard", "all_gather_bytes", "alone", "broadcast_json", "current", "launched",
           "map_shard", "shard_batches", "together", "writes"]
