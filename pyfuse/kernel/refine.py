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
"""

from __future__ import annotations

import mlx.core as mx

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
) -> tuple[mx.array, mx.array, mx.array]:
    """The same weights on a ``to_bits`` grid (``to_group_size``: a divisor of
    ``group_size``, default the same), every dequantized value bit-identical.

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
    split = group_size // to_group_size
    if split > 1:
        new_scales = mx.repeat(new_scales, split, axis=-1)
        biases = mx.repeat(biases, split, axis=-1)
    return pack_codes(codes, to_bits), new_scales, biases


def _fail(msg: str) -> None:
    raise ValueError(f"[pyfuse.refine_grid] {msg}")
