"""What a fuse really did to one quantized tensor: the figures of the fuse
report and of the noise floor, computed in one place.

With ``W`` the dequantized weight before, ``W'`` after, ``change = W' - W``
and ``delta = scale * b @ a`` the adapter's intended change (float32):

* ``delta_norm`` = ||delta||, ``change_norm`` = ||change||
* ``retention`` = <change, delta> / ||delta||^2: the share of the delta that
  survived (1 is perfect, 0 erased); undefined (None) for a zero delta
* ``noise`` = ||change - retention * delta|| / ||delta||: what changed that
  is not the delta, in units of the delta; undefined for a zero delta
* ``weights_changed`` / ``codes_changed``: shares of weights whose value /
  code changed; ``groups_refit``: groups whose (scale, bias) changed
* ``rel_error`` = ||change|| / ||W||, ``max_abs`` = max |change|

The native extension computes the sums in one multithreaded pass over the
packed codes (csrc/fidelity.cpp); without it, tensors are processed a few
rows (or experts) at a time with MLX ops so that a 128 x 2048 x 512 expert
tensor never needs several float32 copies at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import mlx.core as mx

from . import native as _native
from .reference import delta_f32, unpack_codes


@dataclass
class Fidelity:
    delta_norm: float
    change_norm: float
    retention: float | None
    noise: float | None
    weights_changed: float
    codes_changed: float
    groups_refit: int
    groups: int
    rel_error: float
    max_abs: float

    def as_dict(self) -> dict:
        return asdict(self)


def dequantize_exact(w, scales, biases, group_size, bits):
    """The grid values in float32 (scales and biases widened first)."""
    return mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                         group_size=group_size, bits=bits)


def _chunks(n: int, rows: int):
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def tensor_fidelity(old, new, a=None, b=None, *, scale=1.0, group_size=64, bits=4,
                    chunk_elements=1 << 22) -> Fidelity:
    """Compare ``old`` and ``new`` ``(w, scales, biases)`` triples of one
    tensor; ``a``/``b`` (kernel layout: ``[..., r, in]``, ``[..., out, r]``) give
    the intended delta, None for a zero delta."""
    w0, s0, b0 = old
    w1, s1, b1 = new
    lead = w0.shape[:-1]  # [..., out]: rows are processed in chunks
    in_dims = w0.shape[-1] * 32 // bits
    n_rows = math.prod(lead)
    if _native.ext is not None:
        inputs = [w0, s0, b0, w1, s1, b1] + ([] if a is None else [a, b])
        sums = dict(_native.ext.fidelity_sums(inputs, float(scale), group_size, bits))
        sums["wchg"], sums["cchg"], sums["refit"] = (
            sums.pop("weights_changed"), sums.pop("codes_changed"), sums.pop("groups_refit"))
        return _figures(sums, n_rows, in_dims, group_size)

    flat = lambda x: x.reshape(n_rows, x.shape[-1])  # noqa: E731
    w0f, s0f, b0f, w1f, s1f, b1f = map(flat, (w0, s0, b0, w1, s1, b1))
    rows_per_chunk = max(1, chunk_elements // in_dims)

    sums = dict(dd=0.0, cc=0.0, cd=0.0, ww=0.0, wchg=0, cchg=0, refit=0, max_abs=0.0)
    for rows in _chunks(n_rows, rows_per_chunk):
        before = dequantize_exact(w0f[rows], s0f[rows], b0f[rows], group_size, bits)
        after = dequantize_exact(w1f[rows], s1f[rows], b1f[rows], group_size, bits)
        change = after - before
        parts = [
            (change * change).sum(), (before * before).sum(),
            (before != after).sum(),
            (unpack_codes(w0f[rows], group_size, bits) != unpack_codes(w1f[rows], group_size, bits)).sum(),
            ((s0f[rows] != s1f[rows]) | (b0f[rows] != b1f[rows])).sum(),
            mx.abs(change).max(),
        ]
        if a is not None:
            d = _delta_rows(a, b, scale, lead, rows)
            parts += [(d * d).sum(), (change * d).sum()]
        mx.eval(*parts)
        sums["cc"] += parts[0].item()
        sums["ww"] += parts[1].item()
        sums["wchg"] += parts[2].item()
        sums["cchg"] += parts[3].item()
        sums["refit"] += parts[4].item()
        sums["max_abs"] = max(sums["max_abs"], parts[5].item())
        if a is not None:
            sums["dd"] += parts[6].item()
            sums["cd"] += parts[7].item()

    return _figures(sums, n_rows, in_dims, group_size)


def retention_and_noise(dd: float, cd: float, cc: float) -> tuple[float | None, float | None]:
    """``retention = <c, d> / ||d||^2`` and ``noise = ||c - retention d|| / ||d||``
    from the sums ``dd = ||d||^2``, ``cd = <c, d>``, ``cc = ||c||^2`` of a change
    ``c`` against an intended delta ``d`` (over one tensor, or many: pass the
    summed sums). Both None (undefined) for a zero delta. This is the one place
    the formula is written."""
    if dd <= 0:
        return None, None
    retention = cd / dd
    # ||c - r d||^2 = ||c||^2 - 2 r <c,d> + r^2 ||d||^2, clipped at 0 for rounding
    resid = cc - 2 * retention * cd + retention**2 * dd
    return retention, math.sqrt(max(resid, 0.0)) / math.sqrt(dd)


def _figures(sums, n_rows, in_dims, group_size) -> Fidelity:
    n = n_rows * in_dims
    delta_norm = math.sqrt(sums["dd"])
    change_norm = math.sqrt(sums["cc"])
    retention, noise = retention_and_noise(sums["dd"], sums["cd"], sums["cc"])
    return Fidelity(
        delta_norm=delta_norm,
        change_norm=change_norm,
        retention=retention,
        noise=noise,
        weights_changed=sums["wchg"] / n,
        codes_changed=sums["cchg"] / n,
        groups_refit=int(sums["refit"]),
        groups=n_rows * (in_dims // group_size),
        rel_error=change_norm / math.sqrt(sums["ww"]) if sums["ww"] > 0 else 0.0,
        max_abs=sums["max_abs"],
    )


def _delta_rows(a, b, scale, lead, rows):
    """The delta for a slice of flattened rows (rows never straddle experts
    in a way that matters: each row is delta[e, o, :] = scale * b[e, o] @ a[e])."""
    if len(lead) == 1:
        return delta_f32(a, b[rows], scale)
    out = lead[-1]
    e0, e1 = rows.start // out, (rows.stop - 1) // out + 1
    d = delta_f32(a[e0:e1], b[e0:e1], scale).reshape(-1, a.shape[-1])
    return d[rows.start - e0 * out: rows.stop - e0 * out]
