"""``pyfuse.fuse_requant``: dequantize -> add a LoRA delta -> re-quantize,
for a Linear (2-D) or every expert of a SwitchLinear (3-D) in one dispatch.

Arguments are checked here, in Python, so that every mistake is a clear
``ValueError`` naming the supported values; the native primitive checks
them again (``std::invalid_argument``, also a ``ValueError``) for callers
that reach it directly.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..options import (DEFAULT_BITS, DEFAULT_GROUP_SIZE, DEFAULT_POLICY, DEFAULT_SEED, POLICIES,
                       SUPPORTED_BITS, SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES, joined)
from . import native as _native
from .calibrated import DEFAULT_DAMP, propagation_matrix
from .reference import fuse_requant_reference

_DTYPES = tuple(getattr(mx, name) for name in SUPPORTED_DTYPES)


def _fail(msg: str) -> None:
    raise ValueError(f"[pyfuse.fuse_requant] {msg}")


def check_arguments(w, scales, biases, a, b, group_size, bits, policy, magnitude=None):
    """Raise ValueError unless the arguments satisfy the kernel contract."""
    if bits not in SUPPORTED_BITS:
        _fail(f"bits={bits} is not supported; supported: {joined(SUPPORTED_BITS)}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        _fail(f"group_size={group_size} is not supported; supported: {joined(SUPPORTED_GROUP_SIZES)}")
    if policy not in POLICIES:
        _fail(f"policy={policy!r} is not supported; supported: {joined(POLICIES)}")
    for name, x in (("w", w), ("scales", scales), ("biases", biases), ("a", a), ("b", b)):
        if not isinstance(x, mx.array):
            _fail(f"{name} must be an mx.array, got {type(x).__name__}")
    if w.dtype != mx.uint32:
        _fail(f"w must be uint32 (packed codes), got {w.dtype}")
    if scales.dtype not in _DTYPES:
        _fail(f"scales dtype {scales.dtype} is not supported; supported: {joined(SUPPORTED_DTYPES)}")
    if biases.dtype != scales.dtype:
        _fail(f"biases dtype {biases.dtype} differs from scales dtype {scales.dtype}")
    if w.ndim not in (2, 3):
        _fail(f"w must be 2-D [out, in*bits/32] or 3-D [experts, out, in*bits/32], got shape {w.shape}")
    if scales.shape != biases.shape:
        _fail(f"scales {scales.shape} and biases {biases.shape} must have the same shape")
    if scales.ndim != w.ndim or scales.shape[:-1] != w.shape[:-1]:
        _fail(f"scales {scales.shape} do not match w {w.shape}")
    if (w.shape[-1] * 32) % bits:
        _fail(f"w's last dimension {w.shape[-1]} is not a whole number of {bits}-bit codes")
    in_dims = w.shape[-1] * 32 // bits
    if scales.shape[-1] * group_size != in_dims:
        _fail(f"w {w.shape} holds {in_dims} inputs per row but scales {scales.shape} with "
              f"group_size={group_size} cover {scales.shape[-1] * group_size}")
    lead, out_dims = w.shape[:-2], w.shape[-2]
    for name, x in (("a", a), ("b", b)):
        if not mx.issubdtype(x.dtype, mx.floating):
            _fail(f"{name} must be floating point, got {x.dtype}")
        if x.ndim != w.ndim:
            _fail(f"{name} must have {w.ndim} dims like w (a: [..., r, in], b: [..., out, r]), "
                  f"got shape {x.shape}")
        if x.shape[:-2] != lead:
            _fail(f"{name} leading dims {x.shape[:-2]} differ from w's {lead}")
    if a.shape[-1] != in_dims:
        _fail(f"a {a.shape} must be [..., r, {in_dims}]")
    if b.shape[-2] != out_dims:
        _fail(f"b {b.shape} must be [..., {out_dims}, r]")
    if a.shape[-2] != b.shape[-1]:
        _fail(f"rank mismatch: a {a.shape} has r={a.shape[-2]} but b {b.shape} has r={b.shape[-1]}")
    if a.shape[-2] < 1:
        _fail("rank must be at least 1")
    if magnitude is not None:
        if not isinstance(magnitude, mx.array) or not mx.issubdtype(magnitude.dtype, mx.floating):
            _fail("magnitude must be a floating mx.array")
        if magnitude.shape != w.shape[:-1]:
            _fail(f"magnitude {magnitude.shape} must be [..., out] = {w.shape[:-1]}")


def fuse_requant(
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    a: mx.array,
    b: mx.array,
    *,
    scale: float = 1.0,
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: int = DEFAULT_BITS,
    policy: str = DEFAULT_POLICY,
    seed: int = DEFAULT_SEED,
    magnitude: mx.array | None = None,
    hessian: mx.array | None = None,
    damp: float = DEFAULT_DAMP,
    stream=None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Fuse ``delta = scale * b @ a`` into a quantized weight and re-quantize.

    Args:
        w: packed codes, uint32 ``[out, in*bits/32]`` or ``[E, out, in*bits/32]``.
        scales, biases: ``[..., out, in/group_size]`` in bfloat16, float16 or float32.
        a: ``[..., r, in]``; b: ``[..., out, r]`` (any float dtype; used in float32).
        scale: the LoRA scale (alpha / rank in mlx-lm's convention).
        group_size: 32, 64 or 128.  bits: 2, 3, 4, 5, 6 or 8.
        policy: ``stock`` (what ``mlx_lm fuse`` does), ``preserve`` (keep the
            grid; zero delta is bit-exact), ``stochastic`` (keep the grid,
            unbiased stochastic rounding seeded by ``seed``) or
            ``calibrated`` (keep the grid; GPTQ-style error-feedback rounding
            steered by ``hessian``: see :mod:`pyfuse.kernel.calibrated`).
        magnitude: DoRA magnitudes ``[..., out]``: each fused row is rescaled
            to this norm before quantizing.
        hessian: ``calibrated`` only: ``X^T X`` of the layer's inputs, float32
            ``[..., in, in]`` (one per expert for 3-D weights); None = the
            identity (plain nearest rounding on the kept grid).
        damp: ``calibrated``: ``H + damp * mean(diag H) * I`` is inverted.
        stream: MLX stream or device.

    Returns:
        ``(w, scales, biases)`` with the input shapes and dtypes.
    """
    check_arguments(w, scales, biases, a, b, group_size, bits, policy, magnitude)
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        _fail(f"seed must be an integer in [0, 2**32), got {seed!r}")
    kwargs = dict(scale=float(scale), group_size=group_size, bits=bits, policy=policy,
                  seed=seed, magnitude=magnitude, stream=stream)
    if policy == "calibrated":
        return _calibrated(w, scales, biases, a, b, hessian, damp, kwargs)
    if hessian is not None:
        _fail(f"hessian is used by policy='calibrated' only, not {policy!r}")
    return _run(w, scales, biases, a, b, kwargs)


def check_hessian(hessian, w, in_dims: int) -> None:
    if not isinstance(hessian, mx.array) or not mx.issubdtype(hessian.dtype, mx.floating):
        _fail("hessian must be a floating mx.array")
    want = (*w.shape[:-2], in_dims, in_dims)
    if tuple(hessian.shape) != want:
        _fail(f"hessian {hessian.shape} must be [..., in, in] = {want} (one per expert for 3-D w)")


def _calibrated(w, scales, biases, a, b, hessian, damp, kwargs):
    if not isinstance(damp, (int, float)) or not 0 <= damp < float("inf"):
        _fail(f"damp must be a finite number >= 0, got {damp!r}")
    prop = None
    if hessian is not None:
        check_hessian(hessian, w, a.shape[-1])
        try:
            prop = propagation_matrix(hessian, float(damp))
        except (ValueError, np.linalg.LinAlgError) as err:
            _fail(f"hessian cannot be factorised ({err}); is it X^T X (symmetric, positive "
                  "semi-definite)? a larger damp may help")
    return _run(w, scales, biases, a, b, kwargs, prop)


def _run(w, scales, biases, a, b, kwargs, prop=None):
    """The native primitive, or the reference when it cannot load."""
    if _native.ext is None:
        _native.warn_fallback()
        return fuse_requant_reference(w, scales, biases, a, b, propagation=prop, **kwargs)
    if kwargs["magnitude"] is not None:
        kwargs = {**kwargs, "magnitude": kwargs["magnitude"].astype(mx.float32)}
    return tuple(_native.ext.fuse_requant(w, scales, biases, a.astype(mx.float32), b.astype(mx.float32),
                                          prop=prop, **kwargs))


def native_available() -> bool:
    """True when the compiled kernels are in use (not the reference fallback)."""
    return _native.ext is not None
