"""One module's fuse: the new tensors of one :class:`~pyfuse.fuse.plan.Job`.

* affine, same precision, LoRA (the common case): :func:`pyfuse.fuse_requant`
  with the chosen policy (one call on the whole tensor with the native
  kernel; a few experts / rows at a time on the reference path);
* stock DoRA, the mx modes (mxfp4, nvfp4, mxfp8: stock and --dequantize
  only), ``--requant-bits`` under stock and ``--dequantize``: mlx-lm's own
  MLX ops (dequantize, add, [DoRA rescale], quantize), chunked;
* ``--requant-bits`` under preserve / stochastic / calibrated: the base is
  first moved to the new grid, exactly (:func:`pyfuse.refine_grid`: every
  dequantized weight bit-identical) when the new grid is finer, else by a
  zero-delta stock re-quantization; then fused with the policy on that grid;
* float (unquantized) weights: ``W + delta`` in the weight dtype.

A DoRA module without a stored magnitude starts from ``m = ||W||`` per row
(float32), as mlx-lm's DoRALinear does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import mlx.core as mx

from ..errors import UserError
from ..io.model_dir import ModelDir, QParams
from ..io.safetensors import dtype_of
from ..kernel.ops import fuse_requant, native_available
from ..kernel.reference import delta_f32, fuse_requant_reference, range_overflow_groups, requant_to_reference
from ..options import DEFAULT_RANGE_OVERFLOW, GRID_KEEPING_POLICIES, RANGE_OVERFLOW_POLICIES
from ..kernel.refine import refine_grid, refinement_shift
from .plan import Job, Plan

# Work on this many weight elements at a time (rows or experts) so that the
# float32 intermediates of a 128 x 2048 x 512 expert tensor stay ~16 MB each.
CHUNK_ELEMENTS = 1 << 22
_MX_DTYPE = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


@dataclass
class Fused:
    """A job's new tensors and what the report compares them with."""

    tensors: dict[str, mx.array]  # output name -> array, as planned (job.out)
    old: tuple  # the base (weight, scales, biases) as stored; None where absent
    magnitude: mx.array | None  # the DoRA magnitude applied (given or default)
    policy: str  # the policy applied ("stock" for float weights)
    # preserve / stochastic / calibrated: the groups whose fused values left
    # their grid's range (re-fitted, or clipped under --on-range-overflow
    # clip); else None
    groups_out_of_range: int | None = None
    range_overflow: str | None = None  # what those groups got: "refit" | "clip"


def row_chunks(lead: tuple, in_dims: int, stochastic: bool, elements: int | None = None):
    """Slices along the first axis (experts, or rows of a 2-D weight) holding
    about ``elements`` (CHUNK_ELEMENTS) weights. ``stochastic`` is never split:
    its hash is indexed by the element's position in the whole tensor."""
    n = lead[0]
    per_item = math.prod(lead[1:]) * in_dims if len(lead) > 1 else in_dims
    step = n if stochastic else max(1, (elements or CHUNK_ELEMENTS) // max(per_item, 1))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _kernel_is_native() -> bool:
    return native_available()


def dequantize(w, s, bi, q: QParams):
    if q.mode == "affine":
        return mx.dequantize(w, s, bi, group_size=q.group_size, bits=q.bits)
    return mx.dequantize(w, s, None, group_size=q.group_size, bits=q.bits, mode=q.mode)


def quantize(x, q: QParams):
    if q.mode == "affine":
        return tuple(mx.quantize(x, group_size=q.group_size, bits=q.bits))
    wq, sq = mx.quantize(x, group_size=q.group_size, bits=q.bits, mode=q.mode)
    return wq, sq


def dora_rescale(fused: mx.array, magnitude: mx.array) -> mx.array:
    """mlx-lm's DoRA fuse: ``(m / ||fused row||) * fused`` (float32 for a
    float32 magnitude), cast back to the weight dtype by the caller."""
    norm_scale = magnitude / mx.linalg.norm(fused, axis=-1)
    return norm_scale[..., None] * fused


def row_norms(w, s=None, bi=None, q: QParams | None = None) -> mx.array:
    """``||row||`` in float32 of a weight (dequantized with ``q``): the
    magnitude mlx-lm's DoRALinear starts from when ``m`` is absent."""
    return mx.linalg.norm((w if q is None else dequantize(w, s, bi, q)).astype(mx.float32), axis=-1)


def job_factors(job: Job, rows: slice) -> tuple[mx.array, mx.array]:
    """The kernel's ``(a, b)`` for these rows (experts) of the job's weight."""
    return (job.a[rows] if job.kind == "switch" else job.a), job.b[rows]


def run_job(mdir: ModelDir, job: Job, plan: Plan, *, policy: str, seed: int,
            on_range_overflow: str = DEFAULT_RANGE_OVERFLOW, hessian: mx.array | None = None,
            damp: float | None = None, headroom: bool = False) -> Fused:
    """Read the job's base tensors and compute its outputs (UserError when a
    group leaves its grid's range under ``on_range_overflow="error"``).
    ``hessian``: the calibrated policy's ``X^T X`` of this module (per
    expert), ``damp`` its dampening. ``headroom``: a refined base gets
    head-room at both ends where exact (:func:`pyfuse.refine_grid`)."""
    if job.kind == "replace":  # a full fine-tune's trained tensors, as they are
        return Fused(dict(job.replacement), (None, None, None), None, "none")
    w, s, bi = mdir.read_module(job.path)
    if job.kind == "requantize":
        return _run_requantize_job(job, (w, s, bi), policy=policy, seed=seed, on_range_overflow=on_range_overflow)
    if not job.quantized:
        return _run_float_job(job, w, plan)
    q_in, q_out = job.q_in, job.q_out
    magnitude = job.magnitude
    if job.fuses and plan.is_dora and magnitude is None and job.kind == "linear":
        magnitude = row_norms(w, s, bi, q_in)
    # The kernel does every affine re-quantization except stock DoRA, which
    # goes through the MLX ops mlx-lm uses (bit-identical to mlx_lm fuse).
    use_kernel = (job.fuses and q_out is not None and q_in.mode == "affine" and q_out.mode == "affine"
                  and not (policy == "stock" and magnitude is not None))
    grid_keeping = use_kernel and policy in RANGE_OVERFLOW_POLICIES
    clip = grid_keeping and on_range_overflow == "clip"  # the reference's rule: no native clip
    # The native kernel needs no float copies of the tensor: one call. MLX ops
    # (and the reference fallback) go a few experts / rows at a time.
    whole = use_kernel and (policy == "stochastic" or (_kernel_is_native() and not clip))
    outs = []
    out_of_range = 0
    for rows in row_chunks(w.shape[:-1], job.in_dims, stochastic=whole):
        mc = magnitude[rows] if magnitude is not None else None
        base = (w[rows], s[rows], bi[rows] if bi is not None else None)
        calib = {} if policy != "calibrated" else {
            "hessian": None if hessian is None else (hessian[rows] if job.kind == "switch" else hessian),
            **({} if damp is None else {"damp": damp})}
        res = _quantized_rows(job, plan, rows, base, mc, use_kernel=use_kernel, policy=policy, seed=seed,
                              clip=clip, headroom=headroom, **calib)
        mx.eval(*res)
        if grid_keeping:
            out_of_range += _count_groups(job, plan, rows, base, res, mc, policy=policy, seed=seed,
                                          action=on_range_overflow, headroom=headroom)
        outs.append(res)
    if grid_keeping and out_of_range and on_range_overflow == "error":
        groups = math.prod(w.shape[:-1]) * (job.in_dims // q_out.group_size)
        raise UserError(f"{job.path}: {out_of_range} of {groups} groups ({out_of_range / groups:.1%}) "
                        f"have fused values outside their grid's range under --policy {policy}; "
                        "--on-range-overflow error refuses the fuse (refit re-fits those groups, "
                        "clip clamps their codes); nothing was written")
    parts = [_join([o[i] for o in outs]) for i in range(len(outs[0]))]
    mx.eval(*parts)
    del outs
    names = [f"{job.path}.weight"]
    if q_out is not None:
        names.append(f"{job.path}.scales")
        if q_out.mode == "affine":
            names.append(f"{job.path}.biases")
    results = dict(zip(names, parts))
    _check_planned(job, results)
    if not grid_keeping:
        return Fused(results, (w, s, bi), magnitude, policy)
    return Fused(results, (w, s, bi), magnitude, policy, out_of_range, "clip" if clip else "refit")


def _count_groups(job: Job, plan: Plan, rows: slice, base: tuple, res: tuple, mc, *, policy: str,
                 seed: int, action: str, headroom: bool = False) -> int:
    """preserve / stochastic / calibrated, some rows (experts): under ``refit`` without
    DoRA, the groups that lost their grid (scale or bias changed: a re-fit
    that lands on the same grid only clamps codes); otherwise the groups whose
    new codes leave the range, by the reference's rule
    (:func:`range_overflow_groups`; a DoRA rescale moves every scale by a
    factor the kernel and MLX round differently, so outputs cannot tell)."""
    wc, sc, bc = base
    q = job.q_out
    grid = (wc, sc, bc) if q == job.q_in else move_to_grid(wc, sc, bc, job.q_in, q, headroom=headroom)
    if action == "refit" and mc is None:  # no float work: the kept grid is the input's
        return int(((res[1] != grid[1]) | (res[2] != grid[2])).sum().item())
    ac, bc_ = job_factors(job, rows)
    mask = range_overflow_groups(*grid[:2], ac, bc_, scale=plan.scale, group_size=q.group_size,
                                 bits=q.bits, policy=policy, seed=seed)
    return int(mask.sum().item())


def _quantized_rows(job: Job, plan: Plan, rows: slice, base: tuple, mc, *, use_kernel: bool,
                    policy: str, seed: int, clip: bool = False, headroom: bool = False, **calib) -> tuple:
    """The outputs of some rows (experts) of a quantized base ``(w, s, b)``."""
    wc, sc, bc = base
    q_in, q_out = job.q_in, job.q_out
    if not job.fuses:  # --dequantize of an untouched module
        return (dequantize(wc, sc, bc, q_in),)
    ac, bc_ = job_factors(job, rows)
    # --on-range-overflow clip: the reference (only it clips), same rule otherwise
    fuse = (lambda *t, **kw: fuse_requant_reference(*t, **kw, on_range_overflow="clip")) if clip else fuse_requant
    if use_kernel and q_out == q_in:
        return fuse(wc, sc, bc, ac, bc_, scale=plan.scale, group_size=q_in.group_size,
                    bits=q_in.bits, policy=policy, seed=seed, magnitude=mc, **calib)
    if use_kernel and policy != "stock":
        # another precision with a grid-keeping policy: move the base to the
        # new grid first, exactly when it can (refine_grid), else by a
        # zero-delta stock re-quantization; then fuse on that grid
        moved = move_to_grid(wc, sc, bc, q_in, q_out, headroom=headroom)
        return fuse(*moved, ac, bc_, scale=plan.scale, group_size=q_out.group_size,
                    bits=q_out.bits, policy=policy, seed=seed, magnitude=mc, **calib)
    # stock through MLX ops (mx modes, other precision, or --dequantize)
    fused = dequantize(wc, sc, bc, q_in)
    fused = fused + delta_f32(ac, bc_, plan.scale).astype(fused.dtype)
    if mc is not None:
        fused = dora_rescale(fused, mc).astype(_MX_DTYPE[job.dtype])
    return (fused,) if q_out is None else quantize(fused, q_out)


def _run_requantize_job(job: Job, base: tuple, *, policy: str, seed: int, on_range_overflow: str) -> Fused:
    """A full fine-tune's float weight for a quantized module: quantized at
    the module's (or --requant-*) precision, by the policy: ``stock``
    quantizes it afresh (``mx.quantize`` of the weight in the scales' dtype);
    ``preserve`` / ``stochastic`` move the base's codes towards it on the
    base's grid (the pure-MLX reference; ``--on-range-overflow`` applies)."""
    (name, trained), = job.replacement.items()
    q_in, q_out = job.q_in, job.q_out
    weight = trained.astype(_MX_DTYPE[job.dtype])
    if q_out is None:
        parts = (weight,)
    elif policy in GRID_KEEPING_POLICIES and q_out.mode == "affine" and q_in.mode == "affine":
        grid = base if q_out == q_in else quantize(dequantize(*base, q_in), q_out)
        parts, out_of_range = requant_to_reference(
            *grid, trained, group_size=q_out.group_size, bits=q_out.bits, policy=policy, seed=seed,
            on_range_overflow="clip" if on_range_overflow == "clip" else "refit")
        if out_of_range and on_range_overflow == "error":
            raise UserError(f"{job.path}: {out_of_range} groups of the full fine-tune's weight leave their "
                            f"grid's range under --policy {policy}; --on-range-overflow error refuses the "
                            "fuse; nothing was written")
    else:
        parts = quantize(weight, q_out)
    mx.eval(*parts)
    names = [f"{job.path}.weight", f"{job.path}.scales", f"{job.path}.biases"][: len(parts)]
    results = dict(zip(names, parts))
    _check_planned(job, results)
    return Fused(results, base, None, policy if q_out is not None else "none")


def grid_move(q_in: QParams, q_out: QParams) -> str:
    """How a grid-keeping policy moves the base from ``q_in`` to ``q_out``:
    ``refined`` (exact, :func:`pyfuse.refine_grid`) or ``re-fitted`` (a
    zero-delta stock re-quantization: the base itself changes)."""
    if q_in.mode != "affine" or q_out.mode != "affine":
        return "re-fitted"
    try:
        refinement_shift(q_in.bits, q_out.bits, q_in.group_size, q_out.group_size)
    except ValueError:
        return "re-fitted"
    return "refined"


def move_to_grid(w, s, bi, q_in: QParams, q_out: QParams, *, headroom: bool = False) -> tuple:
    """The base on the ``q_out`` grid: exact refinement when it exists (and
    the scales allow it), else re-fitted like a stock fuse of a zero delta."""
    if grid_move(q_in, q_out) == "refined":
        try:
            return refine_grid(w, s, bi, group_size=q_in.group_size, bits=q_in.bits,
                               to_bits=q_out.bits, to_group_size=q_out.group_size, headroom=headroom)
        except ValueError as err:  # scales that would underflow: not exact
            warnings.warn(f"pyfuse: {err}; re-fitting this module's base instead", RuntimeWarning,
                          stacklevel=2)
    return quantize(dequantize(w, s, bi, q_in), q_out)


def _run_float_job(job: Job, w: mx.array, plan: Plan) -> Fused:
    """A float (unquantized) base weight: ``W + delta`` in its dtype, exactly
    as mlx-lm's fuse (policies do not apply: there is nothing to round)."""
    magnitude = job.magnitude
    if plan.is_dora and magnitude is None:
        magnitude = row_norms(w) if job.kind == "linear" else mx.linalg.norm(w, axis=-1)
    outs = []
    for rows in row_chunks(w.shape[:-1], job.in_dims, stochastic=False):
        ac, bc = job_factors(job, rows)
        fused = w[rows] + delta_f32(ac, bc, plan.scale).astype(w.dtype)
        if magnitude is not None:
            fused = dora_rescale(fused, magnitude[rows]).astype(w.dtype)
        mx.eval(fused)
        outs.append(fused)
    new = _join(outs)
    mx.eval(new)
    return Fused({f"{job.path}.weight": new}, (w, None, None), magnitude, "stock")


def _join(parts: list[mx.array]) -> mx.array:
    return mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


def _check_planned(job: Job, results: dict[str, mx.array]) -> None:
    for n, arr in results.items():
        d, shp = job.out[n]
        if dtype_of(arr) != d or tuple(arr.shape) != tuple(shp):
            raise RuntimeError(f"internal error: {n} computed as {dtype_of(arr)} {arr.shape}, "
                               f"planned {d} {shp}")
