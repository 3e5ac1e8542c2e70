"""The pure-MLX reference of the fuse: the oracle in tests and the fallback
when the native extension cannot be loaded.

Every policy is written with plain MLX ops so that it can be read against
the kernel contract in docs/DESIGN.md:

* ``stock``: ``mx.dequantize`` -> ``+ (scale * b @ a).astype(dtype)`` ->
  ``mx.quantize``, exactly what ``mlx_lm fuse`` does on the same device.
* ``preserve``: keep every group's scale and bias; the new code is
  ``rint(q + delta / scale)`` computed in the code domain (so a zero delta
  returns the input bit for bit); groups that the delta pushes out of
  ``[0, 2**bits - 1]`` are re-fitted with MLX's affine rule.
* ``stochastic``: as ``preserve`` with ``floor(q + delta / scale + u)``,
  ``u`` a counter-based hash of (seed, element index) shared with the kernels.
* ``calibrated``: keep the grid, error-feedback rounding steered by the
  layer's input Hessian (:mod:`pyfuse.kernel.calibrated`).

An optional DoRA ``magnitude`` ([..., out]) rescales each fused row to that
norm before quantizing, as mlx-lm's DoRA fuse does; under ``preserve`` and
``stochastic`` the rescale goes into the group scales and biases.
"""

from __future__ import annotations

from contextlib import nullcontext

import mlx.core as mx

from .calibrated import DEFAULT_DAMP, calibrated_reference_codes, propagation_matrix

# Rescale factors within 1e-5 of 1 are float32 summation noise of the row
# norm (the kernel and mx.linalg.norm add in different orders): treated as
# exactly 1 so that a zero DoRA delta with unchanged magnitudes stays
# bit-exact (csrc/fuse_math.h, kDoraUnitTolerance).
DORA_UNIT_TOLERANCE = 1e-5


def delta_f32(a: mx.array, b: mx.array, scale: float) -> mx.array:
    """``scale * b @ a`` in float32, with the scale applied to ``b`` first as
    mlx-lm's fuse does."""
    return (scale * b.astype(mx.float32)) @ a.astype(mx.float32)


def unpack_codes(w: mx.array, group_size: int, bits: int) -> mx.array:
    """The integer codes of a packed tensor as float32 (exact: codes < 256)."""
    groups = w.shape[-1] * 32 // bits // group_size
    ones = mx.ones((*w.shape[:-1], groups), dtype=mx.float32)
    return mx.dequantize(w, ones, mx.zeros_like(ones), group_size=group_size, bits=bits)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """Pack integer codes (any numeric dtype) into MLX's affine layout.

    MLX packs codes as one little-endian bit stream (LSB first), 32 bits per
    uint32 word for every bit width, so one generic bit shuffle covers
    2, 3, 4, 5, 6 and 8 bits."""
    q = codes.astype(mx.uint32)
    shifts = mx.arange(bits, dtype=mx.uint32)
    bit_stream = (q[..., None] >> shifts) & 1  # [..., in, bits]
    bit_stream = bit_stream.reshape(*q.shape[:-1], -1, 32)
    return (bit_stream << mx.arange(32, dtype=mx.uint32)).sum(axis=-1).astype(mx.uint32)


def hash_uniform(seed: int, n: int) -> mx.array:
    """``u`` in [0, 1) for element indices ``0 .. n-1``: the ``lowbias32`` hash
    of ``index ^ mix(seed)``, the same integer recipe as
    ``csrc/fuse_math.h::stochastic_uniform``."""
    if n >= 2**32:
        raise ValueError("[pyfuse.kernel.reference] tensors of 2**32 elements or more are not supported")
    idx = mx.arange(n, dtype=mx.uint32)
    key = mx.array(_lowbias32(_lowbias32(seed & 0xFFFFFFFF) ^ 0x9E3779B9), dtype=mx.uint32)
    h = _lowbias32_mx(idx ^ key)
    return (h >> 8).astype(mx.float32) * (1.0 / (1 << 24))


def _lowbias32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


def _lowbias32_mx(x: mx.array) -> mx.array:
    x = x ^ (x >> 16)
    x = x * mx.array(0x7FEB352D, dtype=mx.uint32)
    x = x ^ (x >> 15)
    x = x * mx.array(0x846CA68B, dtype=mx.uint32)
    return x ^ (x >> 16)


def _dora_factor(rows: mx.array, magnitude: mx.array) -> mx.array:
    """``magnitude / ||row||`` per row, snapped to 1 within float32 noise."""
    norm = mx.linalg.norm(rows.astype(mx.float32), axis=-1)
    k = magnitude.astype(mx.float32) / norm
    return mx.where(mx.abs(k - 1.0) <= DORA_UNIT_TOLERANCE, mx.array(1.0), k)


def stochastic_round(t: mx.array, u: mx.array) -> mx.array:
    """``floor(t + u)`` as if exact (csrc/fuse_math.h::stochastic_round): the
    float sum would round up when ``u`` is within float spacing of 1."""
    whole = mx.floor(t)
    return mx.where(u >= 1.0 - (t - whole), whole + 1.0, whole)


def _by_group(x: mx.array, group_size: int) -> mx.array:
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def fuse_requant_reference(
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    a: mx.array,
    b: mx.array,
    *,
    scale: float = 1.0,
    group_size: int = 64,
    bits: int = 4,
    policy: str = "stock",
    seed: int = 0,
    magnitude: mx.array | None = None,
    hessian: mx.array | None = None,
    damp: float | None = None,
    stream=None,
    on_range_overflow: str = "refit",
    propagation: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Pure-MLX fuse with the same contract as :func:`pyfuse.fuse_requant`
    (arguments are assumed valid: :mod:`pyfuse.kernel.ops` checks them).

    ``on_range_overflow`` (``preserve`` / ``stochastic``): what a group whose
    new codes leave ``[0, 2**bits - 1]`` gets: ``refit`` (the kernel's rule,
    MLX's affine fit of the fused values) or ``clip`` (its codes clamped to
    the range, its scale and bias kept; the native kernel has no clip).
    ``calibrated`` runs its column loop in NumPy (:mod:`.calibrated`);
    ``propagation``: its ``P`` when already computed from ``hessian``."""
    dtype = scales.dtype
    delta = delta_f32(a, b, scale)
    if policy == "calibrated":
        if propagation is None and hessian is not None:
            propagation = propagation_matrix(hessian, DEFAULT_DAMP if damp is None else damp)
        return _calibrated(w, scales, biases, delta, group_size, bits, propagation, magnitude,
                           on_range_overflow)
    with mx.stream(stream) if stream is not None else nullcontext():
        if policy == "stock":
            fused = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
            fused = fused + delta.astype(dtype)
            if magnitude is not None:
                k = _dora_factor(fused, magnitude)
                fused = (k[..., None] * fused.astype(mx.float32)).astype(dtype)
            return tuple(mx.quantize(fused, group_size=group_size, bits=bits))
        if policy not in ("preserve", "stochastic"):
            raise ValueError(f"[pyfuse.kernel.reference] unknown policy {policy!r}")
        return _preserve_or_stochastic(
            w, scales, biases, delta, group_size, bits, policy, seed, magnitude, on_range_overflow
        )


def _delta_to(w, scales, biases, target, group_size, bits):
    base = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group_size,
                         bits=bits)
    return target.astype(mx.float32) - base


def requant_to_reference(w, scales, biases, target: mx.array, *, group_size: int, bits: int, policy: str,
                         seed: int = 0, on_range_overflow: str = "refit"):
    """``preserve`` / ``stochastic`` towards a whole new weight ``target``
    (a full fine-tune's) instead of a LoRA delta: the delta is ``target``
    minus the dequantized base, in float32. Returns the new ``(w, scales,
    biases)`` and how many groups left their grid's range."""
    delta = _delta_to(w, scales, biases, target, group_size, bits)
    codes, _ = _grid_codes(w, scales, delta, group_size, bits, policy, seed)
    out = _preserve_or_stochastic(w, scales, biases, delta, group_size, bits, policy, seed, None,
                                  on_range_overflow)
    return out, int(_out_of_range(codes, bits).sum().item())


def _grid_codes(w, scales, delta, group_size, bits, policy, seed):
    """The codes ``preserve`` / ``stochastic`` give every weight on its
    group's own grid, before any range check (``[..., groups, group_size]``),
    and the stochastic ``u`` (None for preserve)."""
    s = scales.astype(mx.float32)[..., None]
    q = _by_group(unpack_codes(w, group_size, bits), group_size)
    target = q + _by_group(delta, group_size) / s  # the fused weight in steps of the old grid
    if policy == "stochastic":
        u = _by_group(hash_uniform(seed, delta.size).reshape(delta.shape), group_size)
        return stochastic_round(target, u), u
    return mx.round(target), None


def _out_of_range(codes: mx.array, bits: int) -> mx.array:
    """Per group: does any code leave ``[0, 2**bits - 1]``?"""
    return mx.any((codes < 0) | (codes > float((1 << bits) - 1)), axis=-1)


def range_overflow_groups(w, scales, a, b, *, scale: float, group_size: int, bits: int, policy: str,
                          seed: int = 0) -> mx.array:
    """The groups (bool ``[..., out, in / group_size]``) whose fused values
    leave their grid's range under ``preserve`` / ``stochastic``: the groups
    the kernel re-fits (``stochastic``: the whole tensor, the hash is indexed
    by position). The decision does not depend on a DoRA magnitude."""
    codes, _ = _grid_codes(w, scales, delta_f32(a, b, scale), group_size, bits, policy, seed)
    return _out_of_range(codes, bits)


def _preserve_or_stochastic(w, scales, biases, delta, group_size, bits, policy, seed, magnitude,
                            on_range_overflow="refit"):
    dtype = scales.dtype
    n_bins = float((1 << bits) - 1)
    s = scales.astype(mx.float32)[..., None]
    bias = biases.astype(mx.float32)[..., None]
    q = _by_group(unpack_codes(w, group_size, bits), group_size)
    d = _by_group(delta, group_size)
    new_q, u = _grid_codes(w, scales, delta, group_size, bits, policy, seed)
    refit = _out_of_range(new_q, bits)

    k = None
    if magnitude is not None:
        # The row norm is that of the weight mlx-lm's DoRA fuse would rescale:
        # the dequantized weight plus the delta, in the weight dtype.
        rows = (mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
                + delta.astype(dtype))
        k = _dora_factor(rows, magnitude)[..., None, None]
        new_s = (s * k).astype(dtype)
        new_b = (bias * k).astype(dtype)
    else:
        new_s, new_b = scales[..., None], biases[..., None]
    if on_range_overflow == "clip":
        codes = mx.clip(new_q, 0, n_bins).reshape(delta.shape)
        return pack_codes(codes, bits), new_s[..., 0], new_b[..., 0]

    # Re-fitted groups: MLX's affine rule on the float32 fused values.
    x = q * s + bias + d
    if k is not None:
        x = x * k
    _, fit_s, fit_b = mx.quantize(x.reshape(delta.shape), group_size=group_size, bits=bits)
    fit_s, fit_b = fit_s[..., None], fit_b[..., None]
    fit_t = (x - fit_b) / fit_s
    fit_q = stochastic_round(fit_t, u) if policy == "stochastic" else mx.round(fit_t)
    fit_q = mx.clip(fit_q, 0, n_bins)

    r = refit[..., None]
    codes = mx.where(r, fit_q, new_q).reshape(delta.shape)
    out_s = mx.where(r, fit_s.astype(dtype), new_s)[..., 0]
    out_b = mx.where(r, fit_b.astype(dtype), new_b)[..., 0]
    return pack_codes(codes, bits), out_s, out_b


def _calibrated(w, scales, biases, delta, group_size, bits, prop, magnitude, on_range_overflow="refit"):
    """The calibrated policy: codes from :mod:`.calibrated` (NumPy), each
    group on its kept grid or, where the delta leaves its range, re-fitted
    (``on_range_overflow="clip"``: kept and clamped); DoRA: the grid
    rescaled by the row factor, as ``preserve``."""
    dtype = scales.dtype
    codes, new_s, new_z = calibrated_reference_codes(
        unpack_codes(w, group_size, bits), scales, biases, delta, group_size=group_size, bits=bits, prop=prop,
        refit=on_range_overflow != "clip")
    if magnitude is None:
        return pack_codes(codes, bits), new_s, new_z
    rows = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits) + delta.astype(dtype)
    k = _dora_factor(rows, magnitude)[..., None]
    return (pack_codes(codes, bits), (new_s.astype(mx.float32) * k).astype(dtype),
            (new_z.astype(mx.float32) * k).astype(dtype))
