"""The ``calibrated`` policy: error-feedback rounding onto the kept grid, in
the style of GPTQ/OPTQ (Frantar et al., 2022), and its NumPy reference (the
oracle of the native kernel's tests and its fallback).

Each group keeps its scale and bias (times the DoRA factor, as ``preserve``).
Per output row, input columns are taken in order; column ``i``'s target,
measured in steps of its group's grid, is ``t_i = q_i + delta_i / s_i``; its
code is ``c_i = clamp(rint(t_i), 0, 2^bits - 1)``; its error in weight units
``e = (t_i - c_i) * s_i`` is pushed onto the later columns,
``t_j -= (e * P[i, j]) * (1 / s_j)`` for ``j > i``, where
``P[i, j] = U[i, j] / U[i, i]`` and ``U`` is the upper Cholesky factor of
``(H + damp * mean(diag H) * I)^-1``, ``H = X^T X`` of the layer's inputs.
The rounding error then lands where the inputs do not look: ``||X (W_hat -
W_target)||`` is what the choice minimises, column by column.

A zero delta gives ``t_i = q_i`` exactly, so every error is 0 and every code is
kept (bit-identical, whatever ``H``). ``hessian=None`` is the identity (``P =
0``): plain nearest rounding on the kept grid, i.e. ``preserve`` except that
groups pushed out of range are clamped, never re-fitted.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# The dampening added to H's diagonal, as a share of its mean diagonal (GPTQ's
# default 0.01): keeps H invertible when some inputs are (nearly) never used
# and limits how far one column's error is pushed onto the others.
DEFAULT_DAMP = 0.01


def propagation_matrix(hessian, damp: float = DEFAULT_DAMP) -> mx.array:
    """``P`` (float32, ``[..., in, in]``, zero on and below the diagonal) from
    ``H`` (``[..., in, in]``), one per leading index (expert).

    Factorised in float64 (NumPy) for stability; an ``H`` of all zeros (no
    tokens) gives ``P = 0``: plain rounding."""
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim < 2 or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"[pyfuse.calibrated] hessian must be [..., in, in], got {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("[pyfuse.calibrated] hessian holds NaN or inf")
    n = h.shape[-1]
    flat = h.reshape(-1, n, n)
    out = np.zeros_like(flat, dtype=np.float32)
    eye = np.eye(n)
    for e, he in enumerate(flat):
        if not np.any(he):
            continue  # no activations: nothing to steer by
        mean_diag = float(np.mean(np.diag(he)))
        hd = 0.5 * (he + he.T) + damp * mean_diag * eye
        lower = np.linalg.cholesky(hd)
        inv_lower = np.linalg.solve(lower, eye)
        h_inv = inv_lower.T @ inv_lower
        upper = np.linalg.cholesky(h_inv).T  # h_inv = upper.T @ upper
        p = np.triu(upper / np.diag(upper)[:, None], k=1)
        out[e] = p.astype(np.float32)
    return mx.array(out.reshape(h.shape))


def calibrated_codes(codes: np.ndarray, steps: np.ndarray, inv_scales: np.ndarray, scales: np.ndarray,
                     prop: np.ndarray, bits: int, *, clamp: bool = True) -> np.ndarray:
    """The new codes of rows ``[..., out, in]`` (float32 arrays, ``codes``
    the old ones, ``steps = delta / s``, ``scales`` and ``inv_scales = 1 / s``
    per element) with ``prop`` ``[..., in, in]`` (leading dims of the rows but
    ``out``). Every operation is one float32 rounding, in the kernel's order.
    ``clamp=False`` (analysis only: bench/calibrated_clamp.py) lets codes
    leave ``[0, 2^bits - 1]``, as if the grid had room."""
    f32 = np.float32
    n_bins = f32((1 << bits) - 1)
    t = (codes + steps).astype(f32)
    out = np.empty_like(t)
    prop = prop[..., None, :, :]  # broadcast over out
    for i in range(t.shape[-1]):
        c = np.rint(t[..., i])
        c = np.clip(c, f32(0), n_bins) if clamp else c
        out[..., i] = c
        err = ((t[..., i] - c) * scales[..., i]).astype(f32)
        later = slice(i + 1, None)
        push = (err[..., None] * prop[..., i, later]).astype(f32)
        t[..., later] = (t[..., later] - (push * inv_scales[..., later]).astype(f32)).astype(f32)
    return out


def working_grid(codes: np.ndarray, scales: mx.array, biases: mx.array, delta: np.ndarray, *,
                 group_size: int, bits: int, refit: bool = True):
    """The targets ``t`` (float32 ``[..., out, in]``, in steps of each group's
    grid) and the grid the column loop works on (``scales``, ``biases`` in
    their dtype, per group), as the kernel's first phase computes them: each
    group keeps its grid, ``t = q + delta / s``, unless its nearest codes
    ``rint(t)`` leave ``[0, 2^bits - 1]`` (and ``refit``): then it is
    re-fitted as under ``preserve`` (MLX's affine rule on the float32 fused
    values ``q s + z + delta``) and ``t = (x - z') / s'`` on the re-fitted
    grid, rounded to the scales' dtype. Also returns the re-fitted groups
    (bool ``[..., out, in / group_size]``)."""
    f32 = np.float32
    dtype = scales.dtype
    by_group = lambda x: x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)  # noqa: E731
    s = by_group(np.asarray(mx.repeat(scales.astype(mx.float32), group_size, axis=-1)))
    z = by_group(np.asarray(mx.repeat(biases.astype(mx.float32), group_size, axis=-1)))
    q, d = by_group(codes), by_group(delta)
    t = (q + (d / s).astype(f32)).astype(f32)
    c = np.rint(t)
    out = np.any((c < 0) | (c > f32((1 << bits) - 1)), axis=-1)
    if not refit or not out.any():
        return t.reshape(codes.shape), scales, biases, out
    x = (((q * s).astype(f32) + z).astype(f32) + d).astype(f32)
    _, fit_s, fit_z = mx.quantize(mx.array(x.reshape(codes.shape)), group_size=group_size, bits=bits)
    fit_s, fit_z = fit_s.astype(dtype), fit_z.astype(dtype)
    new_s = mx.where(mx.array(out), fit_s, scales)
    new_z = mx.where(mx.array(out), fit_z, biases)
    gs_, gz_ = (np.asarray(v.astype(mx.float32))[..., None] for v in (fit_s, fit_z))
    t_fit = ((x - gz_).astype(f32) / gs_).astype(f32)
    t = np.where(out[..., None], t_fit, t)
    return t.reshape(codes.shape), new_s, new_z, out


def calibrated_reference_codes(codes: mx.array, scales: mx.array, biases: mx.array, delta: mx.array, *,
                               group_size: int, bits: int, prop: mx.array | None, refit: bool = True):
    """The calibrated codes (float32 ``[..., out, in]``) of the old ``codes``
    (float32, unpacked), the group ``scales`` and ``biases`` and the float32
    ``delta``, with the grid they are on (:func:`working_grid`); ``prop``
    from :func:`propagation_matrix` (None: plain rounding). ``refit=False``
    keeps every grid and clamps (``--on-range-overflow clip``)."""
    codes_np = np.asarray(codes)
    t, new_s, new_z, _ = working_grid(codes_np, scales, biases, np.asarray(delta.astype(mx.float32)),
                                      group_size=group_size, bits=bits, refit=refit)
    s_np = np.asarray(mx.repeat(new_s.astype(mx.float32), group_size, axis=-1))
    if prop is None:
        prop_np = np.zeros((*codes_np.shape[:-2], codes_np.shape[-1], codes_np.shape[-1]), dtype=np.float32)
    else:
        prop_np = np.asarray(prop.astype(mx.float32))
    inv_s = (np.float32(1.0) / s_np).astype(np.float32)
    out = calibrated_codes(np.zeros_like(t), t, inv_s, s_np, prop_np, bits)
    return mx.array(out), new_s, new_z
