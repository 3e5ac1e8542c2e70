"""Data-parallel training under a launcher (``mlx.launch -n N``): every rank
takes ``1/N`` of each batch's rows, and the gradient is the single-process
gradient, summed over ranks.

One process minimises, per batch, the token-weighted mean loss
``L = sum_t ce_t / W`` (``W`` the batch's tokens; pairs for DPO). Rank
``r`` holds the rows ``ids[r::N]`` of the batch (mlx-lm's interleaving:
the rows are sorted by length, so every rank gets a share of each length)
and computes its own mean ``L_r`` over its ``W_r`` tokens. Then

    L = sum_r W_r L_r / W        dL/dθ = sum_r W_r dL_r/dθ / W,   W = sum_r W_r

one ``all_sum`` per minibatch of the concatenated ``(W_r dL_r/dθ, W_r L_r,
W_r, W_r m_r)``. (mlx-lm's trainer averages the ranks' gradients
unweighted, which differs from one process when the ranks' token counts
differ.) Every rank receives the same sums, so every rank applies the same
update and holds the same weights (checked at the end,
:meth:`DataParallel.check_same`); the partial sums of a gradient
accumulation are the global ones, so a checkpoint is the same whichever
rank writes it and whatever the number of ranks that resumes it.

Not bit-identical to one process: the gradient of a LoRA matrix is a sum
over every token of the batch; one process sums them in one matrix
product (BLAS's blocked order), N ranks sum their own tokens and then add
the N partial sums, and float addition is not associative. The difference
is a few float32 roundings per step (relative 1e-7 per operation), which
Adam's normalisation carries into the weights: tested to 1e-5 against one
process (tests/e2e/test_distributed_train.py).

Validation and the test loss: each rank evaluates its share of the
batches, and the sums are added over the ranks: every rank gets the same
validation loss, so the same best step and the same early stop.

Dropout: each rank draws its masks from its own key (split from the
shared key each step), so the ranks do not reuse one mask on different
rows; the shared key advances identically on every rank (checkpoints stay
rank-independent). With dropout > 0 the masks differ from one process's:
the adapter is then a different draw, not a float-level difference.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from .collect import all_gather_bytes, together
from .group import current

__all__ = ["DataParallel", "data_parallel", "follower_paths"]


class DataParallel:
    """This rank's part of a data-parallel run (only built with N > 1 ranks)."""

    def __init__(self, rank: int, size: int, handle):
        self.rank, self.size, self.handle = rank, size, handle

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, ids: list[int]) -> list[int]:
        """This rank's rows of a batch (mlx-lm's interleaving)."""
        return ids[self.rank::self.size]

    def weighted_loss(self, loss):
        """``loss`` returning ``(W_r L_r, W_r, W_r m_r...)``: what the ranks sum
        (differentiated through its first output)."""
        import mlx.core as mx

        def local(model, *batch):
            lvalue, weight, *metrics = loss(model, *batch)
            w = mx.stop_gradient(weight.astype(mx.float32))
            return (lvalue * w, w, *[m * w for m in metrics])

        return local

    def reduce(self, lsum, weight, metric_sums, grad):
        """The sums over every rank (one ``all_sum``), divided by the total
        weight: ``(loss, weight, metrics, grad)`` of the whole batch."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        flat = tree_flatten(grad)
        scalars = [lsum, weight, *metric_sums]
        parts = [g.astype(mx.float32).reshape(-1) for _, g in flat] + [s.astype(mx.float32).reshape(1)
                                                                        for s in scalars]
        total = mx.distributed.all_sum(mx.concatenate(parts), group=self.handle)
        sums = total[total.size - len(scalars):]
        total_weight = sums[1]
        out, start = [], 0
        for key, g in flat:
            out.append((key, (total[start:start + g.size].reshape(g.shape) / total_weight).astype(g.dtype)))
            start += g.size
        metrics = [sums[2 + j] / total_weight for j in range(len(metric_sums))]
        return sums[0] / total_weight, total_weight, metrics, tree_unflatten(out)

    def sum_over_ranks(self, values: list) -> list:
        """Each of ``values`` (scalars) summed over the ranks (one ``all_sum``)."""
        import mlx.core as mx

        total = mx.distributed.all_sum(mx.stack([v.astype(mx.float32) for v in values]), group=self.handle)
        return [total[j] for j in range(len(values))]

    @contextmanager
    def own_random_key(self):
        """MLX's key, for one step, this rank's (split from the shared key);
        afterwards the shared key's successor, the same on every rank."""
        import mlx.core as mx

        shared, step = mx.random.split(mx.random.state[0])
        _set_key(mx.random.split(step, self.size)[self.rank])
        try:
            yield
        finally:
            _set_key(shared)

    def check_same(self, weights: dict) -> None:
        """Every rank holds the same weights (a digest of their bytes compared across ranks)."""
        import mlx.core as mx
        import numpy as np

        h = hashlib.sha256()
        for k in sorted(weights):
            h.update(k.encode())
            h.update(np.array(weights[k].view(mx.uint8)).tobytes())  # any dtype (bf16 has no NumPy type)
        digests = all_gather_bytes(h.digest(), "comparing the trained weights")
        if len(set(digests)) != 1:
            raise RuntimeError("the ranks' trained weights differ (data-parallel training went out of step)")


def _set_key(key) -> None:
    import mlx.core as mx

    k0, k1 = (int(x) for x in key.tolist())
    mx.random.seed((k0 << 32) | k1)  # MLX's key of a seed is its two 32-bit halves


def data_parallel(batch_size: int, train_mode: str) -> DataParallel | None:
    """The data-parallel part of this rank under a launcher; None with one process."""
    g = current()
    if g.size == 1:
        return None
    if batch_size % g.size:
        raise UserError(f"batch_size {batch_size} is not divisible by the {g.size} ranks of the launch: "
                        "each rank takes an equal share of every batch")
    if train_mode == "orpo":
        raise UserError("orpo cannot be trained data-parallel (its loss mixes a token mean and a pair mean, "
                        "not one weighted mean over ranks): run it without mlx.launch")
    return DataParallel(g.rank, g.size, g.handle)


@contextmanager
def follower_paths(dp: DataParallel | None, final: Path, run_dir: Path, resume: bool):
    """The adapter path a rank trains into: rank 0 (and one process) the
    real one; another rank a copy in a private scratch directory, deleted
    afterwards (only rank 0 writes outputs). To resume, that copy starts
    from rank 0's run directory, which the rank must then see (a shared
    filesystem at the same path)."""
    if dp is None:
        yield final
        return
    with tempfile.TemporaryDirectory(prefix="pyfuse-rank-train-") as scratch:
        mine = final if dp.is_main else Path(scratch) / final.name
        with together("finding the run to resume"):
            if resume and not dp.is_main:
                if not run_dir.is_dir():
                    raise UserError(f"resume: this rank does not see {run_dir} (rank 0's run directory): "
                                    "resuming under mlx.launch needs it on a filesystem every host shares, "
                                    "at the same path")
                shutil.copytree(run_dir, mine.parent / run_dir.name)
        yield mine
