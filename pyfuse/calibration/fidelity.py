"""Output-space fidelity of one fused module on held-out activations.

With ``H = X^T X`` of held-out inputs, ``D`` the adapter's delta, ``W`` the
base and ``W_hat`` the fused weight (both dequantized), per expert:

* output error ``||X (W_hat - W - D)^T|| / ||X D^T||``
  = ``sqrt(sum tr(A H A^T) / sum tr(D H D^T))`` with ``A = W_hat - W - D``:
  0 is a perfect fuse, 1 is as bad as dropping the adapter;
* output retention ``<X (W_hat - W)^T, X D^T> / ||X D^T||^2``: the share of
  the adapter's effect on the outputs that the fused weights carry.

Computed from ``H`` (no activations kept), one expert at a time.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..kernel.reference import delta_f32


def output_fidelity(weights, experts: int | None, a: mx.array, b: mx.array, scale: float,
                    held_out: mx.array) -> dict:
    """``weights(e)`` -> the dequantized base and fused weights ``[out, in]``
    of expert ``e`` (``e`` None for a Linear, ``experts`` None); ``a``/``b``:
    the LoRA factors (leading expert dim for a SwitchLinear); ``held_out``:
    ``[E, in, in]`` or ``[in, in]``. Returns ``output_error`` and
    ``output_retention`` (None when the delta does not reach the outputs)."""
    sums = {"aa": 0.0, "dd": 0.0, "cd": 0.0}
    for e in range(experts) if experts is not None else (None,):
        pick = (lambda x: x) if e is None else (lambda x: x[e])
        old, new = weights(e)
        h = pick(held_out).astype(mx.float32)
        d = delta_f32(pick(a), pick(b), scale)
        c = new.astype(mx.float32) - old.astype(mx.float32)
        err = c - d
        dh = d @ h
        parts = (mx.sum((err @ h) * err), mx.sum(dh * d), mx.sum(dh * c))
        mx.eval(*parts)
        for key, value in zip(("aa", "dd", "cd"), parts):
            sums[key] += float(value.item())
    if not sums["dd"] > 0:
        return {"output_error": None, "output_retention": None}
    return {"output_error": math.sqrt(max(sums["aa"], 0.0) / sums["dd"]),
            "output_retention": sums["cd"] / sums["dd"]}
