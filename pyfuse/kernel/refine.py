"""``pyfuse.refine_grid``: move a quantized weight to a finer affine grid
with every dequantized weight bit-identical.

A group on a ``b``-bit grid (scale ``s``, bias ``z``, codes ``q``) is the same
set of values on a ``b'``-bit grid with scale ``s / 2^m``, the same bias and
codes ``q * 2^m`` whenever ``(2^b - 1) * 2^m <= 2^b' - 1``: MLX dequantizes
``T(q * s) + z`` and ``q * 2^m * (s / 2^m)`` is the same real product, so
it rounds to the same ``T`` as long as ``s / 2^m`` is itself exact (no
underflow into subnormals: float16 scales below ``2^-14 * 2^m`` are refused).
A smaller group size that divides the old one is exact too (each new group
takes its old group's scale and bias). The largest such ``m`` is used, so a
later delta lands on steps ``2^m`` times finer.

Head-room at both ends (``headroom=True``; off by default): codes ``q * 2^m``
reach ``(2^b - 1) 2^m`` (3 -> 8 bits: 224 of 255), so the spare codes are all
at the top and a delta that lowers a code-0 weight has nowhere to go (the
policies then clamp or re-fit the group). Each group's codes are moved up by
``k`` (the spare codes split evenly first: 3 -> 8 bits tries 15, 16, 14, 17,
...) with its bias ``z - k s'`` rounded to the scale dtype, but only where
that reproduces every dequantized weight of the group bit for bit under
``mx.dequantize`` on the running device (checked per group; a group where no
``k`` does keeps ``k = 0``). ``T(T(q' s') + z')`` equals ``T(T(q s) + z)``
only by the luck of rounding (on the tiny test MoE, for ~80 % of 3-bit
groups); a dequantize that fused ``q s + z`` into one multiply-add would
agree far less often (~13 %), so these groups are exact under MLX's unfused
rule on the device that runs the check, not under every dequantize (the
plain refinement is exact under both). Hence opt-in.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..options import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, joined
from .reference import pack_codes, unpack_codes


def refinement_shift(bits: int, to_bits: int, group_size: int, to_group_size: int | None = None) -> int:
    """The ``m`` of the exact refinement ``bits -> to_bits`` (codes times
    ``2^m``), or ValueError saying why none exists."""
    to_group_size = group_size if to_group_size is None else to_group_size
    for name, value, allowed in (("bits", bits, SUPPORTED_BITS), ("to_bits", to_bits, SUPPORTED_BITS),
                                 ("group_size", group_size, SUPPORTED_GROUP_SIZES),
                                 ("to_group_size", to_group_size, SUPPORTED_GROUP_SIZES)):
        if value not in allowed:
            _fail(f"{name}={value} is not supported; supported: {joined(allowed)}")
    if to_bits < bits:
        _fail(f"no exact refinement from {bits} to {to_bits} bits: a {to_bits}-bit code cannot hold "
              f"the {2 ** bits} levels of a {bits}-bit group")
    if group_size % to_group_size:
        _fail(f"no exact refinement from group size {group_size} to {to_group_size}: a new group "
              "would straddle two old groups with different scales")
    m = 0
    while ((1 << bits) - 1) << (m + 1) <= (1 << to_bits) - 1:
        m += 1
    return m


def refine_grid(
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    group_size: int,
    bits: int,
    to_bits: int,
    to_group_size: int | None = None,
    headroom: bool = False,
) -> tuple[mx.array, mx.array, mx.array]:
    """The same weights on a ``to_bits`` grid (``to_group_size``: a divisor of
    ``group_size``, default the same), every dequantized value bit-identical;
    ``headroom``: codes moved off 0 where exact (see the module docstring).

    Returns ``(w, scales, biases)`` at ``to_bits``. Raises ValueError with the
    reason when no exact refinement exists (fewer bits, a group size that is
    not a divisor, or scales that would lose precision when divided by 2^m).
    """
    to_group_size = group_size if to_group_size is None else to_group_size
    m = refinement_shift(bits, to_bits, group_size, to_group_size)
    if w.dtype != mx.uint32 or scales.shape != biases.shape or scales.dtype != biases.dtype:
        _fail("w must be uint32 packed codes and scales/biases alike in shape and dtype")
    if w.shape[-1] * 32 != scales.shape[-1] * group_size * bits:
        _fail(f"w {w.shape} and scales {scales.shape} disagree for group_size={group_size}, bits={bits}")
    factor = float(1 << m)
    new_scales = scales / mx.array(factor, dtype=scales.dtype)
    # exact iff multiplying back gives the scale (no bits lost to underflow)
    if not mx.array_equal(new_scales * mx.array(factor, dtype=scales.dtype), scales, equal_nan=True).item():
        _fail(f"scales / 2^{m} underflow {scales.dtype}'s normal range for some groups, so the "
              f"{bits} -> {to_bits}-bit refinement would not be exact")
    codes = unpack_codes(w, group_size, bits) * factor
    spare = (1 << to_bits) - 1 - (((1 << bits) - 1) << m)
    if headroom and spare > 0:
        old = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
        codes, biases = _centred(codes, new_scales, biases, old, group_size, to_bits, spare)
    split = group_size // to_group_size
    if split > 1:
        new_scales = mx.repeat(new_scales, split, axis=-1)
        biases = mx.repeat(biases, split, axis=-1)
    return pack_codes(codes, to_bits), new_scales, biases


def shift_order(spare: int) -> list[int]:
    """The shifts tried, best first: nearest to half the spare codes."""
    return sorted(range(1, spare + 1), key=lambda k: (abs(2 * k - spare), k))


def _centred(codes, scales, biases, old, group_size: int, to_bits: int, spare: int):
    """``codes + k`` and biases ``z - k s`` per group, ``k`` the first of
    :func:`shift_order` under which the group dequantizes to ``old`` bit for
    bit (0 where none does). Only the groups still unresolved are tried."""
    dtype = scales.dtype
    shape, n = codes.shape, scales.size
    codes_g = codes.reshape(n, group_size)
    want = _bits(old).reshape(n, group_size)
    s_col, z_col = scales.reshape(n, 1), biases.reshape(n, 1)
    shift = np.zeros(n, dtype=np.float32)
    new_z = np.array(biases.reshape(n).astype(mx.float32), copy=True)  # never a view of the input
    todo = np.arange(n)
    for k in shift_order(spare):
        if todo.size == 0:
            break
        idx = mx.array(todo)
        s_k, z_k = s_col[idx], (z_col[idx].astype(mx.float32) - k * s_col[idx].astype(mx.float32)).astype(dtype)
        got = mx.dequantize(pack_codes(codes_g[idx] + k, to_bits), s_k, z_k, group_size=group_size, bits=to_bits)
        ok = np.asarray(mx.all(_bits(got) == want[idx], axis=-1))
        shift[todo[ok]] = k
        new_z[todo[ok]] = np.asarray(z_k[:, 0].astype(mx.float32))[ok]
        todo = todo[~ok]
    moved = codes_g + mx.array(shift)[:, None]
    return moved.reshape(shape), mx.array(new_z).astype(dtype).reshape(biases.shape)


def _bits(x: mx.array) -> mx.array:
    """The bit patterns (so -0 and +0 differ, and NaN equals itself)."""
    return x.view(mx.uint32 if x.dtype == mx.float32 else mx.uint16)


def _fail(msg: str) -> None:
    raise ValueError(f"[pyfuse.refine_grid] {msg}")
