"""The fuse report: per fused tensor, what really changed; a summary with
warnings; a short rich table for the terminal.

The per-tensor figures come from :func:`pyfuse.kernel.fidelity.tensor_fidelity`
(or, for DoRA, other precisions and float outputs, the same figures against
the exact fused target, :func:`general_fidelity`); tensors of more than
``sample`` weights are measured on evenly spaced output rows of every expert
(``sampled`` < 1), because MLX's CPU dequantize costs ~25 ns per weight.
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx

from ..kernel.fidelity import retention_and_noise, tensor_fidelity
from ..kernel.ops import native_available
from ..kernel.reference import delta_f32, unpack_codes
from ..options import DEFAULT_RANGE_OVERFLOW
from .compute import Fused, dequantize, dora_rescale, grid_move, job_factors, row_chunks
from .plan import Job, Plan

# Tensors with more weights than this are measured on a sample of their rows
# (``sampled`` < 1 in the report); ``report_sample=None`` measures everything.
REPORT_SAMPLE_ELEMENTS = 1 << 21
# The fidelity figures hold ~80 bytes of temporaries per weight: smaller chunks.
FIDELITY_CHUNK_ELEMENTS = 1 << 20
# Retention below this is "mostly erased"; below PARTLY "partly erased".
LOW_RETENTION = 0.5
PARTLY_RETENTION = 0.8


# -- one tensor ---------------------------------------------------------------------


def record(job: Job, fused: Fused, *, scale: float, sample: int | None) -> dict:
    """The report's record of one fused module (its weight tensor)."""
    w0, s0, b0 = fused.old
    results, magnitude = fused.tensors, fused.magnitude
    w1 = results[f"{job.path}.weight"]
    s1 = results.get(f"{job.path}.scales")
    b1 = results.get(f"{job.path}.biases")
    q_in, q_out = job.q_in, job.q_out
    rec = _describe(job, lead=tuple(w0.shape[:-1]), dora=magnitude is not None, policy=fused.policy)
    simple = (job.quantized and q_out == q_in and q_in.mode == "affine" and magnitude is None
              and b0 is not None)
    # The native sums (pyfuse.kernel.fidelity) measure the common case exactly at
    # memory speed: no sampling there.
    exact_is_cheap = simple and native_available()
    tensors, b, fraction = (w0, s0, b0, w1, s1, b1, magnitude), job.b, 1.0
    if sample and not exact_is_cheap:
        tensors, b, fraction = _sampled_rows(job, tensors, sample)
    sw0, ss0, sb0, sw1, ss1, sb1, smag = tensors
    if simple:
        fid = tensor_fidelity((sw0, ss0, sb0), (sw1, ss1, sb1), job.a, b, scale=scale,
                              group_size=q_in.group_size, bits=q_in.bits,
                              chunk_elements=FIDELITY_CHUNK_ELEMENTS).as_dict()
    else:
        fid = general_fidelity(dataclasses.replace(job, b=b), scale, (sw0, ss0, sb0), (sw1, ss1, sb1), smag)
    if fraction < 1.0:  # sums -> whole-tensor estimates; ratios stay as they are
        fid["delta_norm"] /= math.sqrt(fraction)
        fid["change_norm"] /= math.sqrt(fraction)
        if fid.get("groups_refit") is not None:
            fid["groups_refit"] = int(round(fid["groups_refit"] / fraction))
        if fid.get("groups") is not None:
            fid["groups"] = int(round(fid["groups"] / fraction))
    rec.update(fid)
    rec["sampled"] = fraction
    if fused.groups_out_of_range is not None:  # exact, whatever was sampled
        n = fused.groups_out_of_range
        rec["groups"] = math.prod(w0.shape[:-1]) * (job.in_dims // q_out.group_size)
        rec["groups_out_of_range"] = n
        rec["out_of_range_share"] = n / rec["groups"]
        rec["groups_refit"] = n if fused.range_overflow == "refit" else 0
        rec["groups_clipped"] = n if fused.range_overflow == "clip" else 0
    return rec


def calibration_record(job: Job, fused: Fused, hessians, *, scale: float) -> dict:
    """The calibration of one module (tokens, experts that fell back to plain
    rounding) and, on its held-out tokens, the output error and retention
    (:mod:`pyfuse.calibration.fidelity`; not for DoRA, whose target is
    rescaled)."""
    from ..calibration.fidelity import output_fidelity

    out = {"calibration": hessians.summary()}
    if hessians.held_out is None or fused.magnitude is not None or job.q_out is None:
        return out
    w0, s0, b0 = fused.old
    new = [fused.tensors.get(f"{job.path}.{n}") for n in ("weight", "scales", "biases")]
    switch = job.kind == "switch"

    def weights(e):
        pick = (lambda x: x) if e is None else (lambda x: None if x is None else x[e])
        return (dequantize(pick(w0), pick(s0), pick(b0), job.q_in),
                dequantize(*(pick(x) for x in new), job.q_out))

    out.update(output_fidelity(weights, w0.shape[0] if switch else None, job.a, job.b, scale,
                               hessians.held_out))
    return out


def _describe(job: Job, *, lead: tuple, dora: bool, policy: str) -> dict:
    q_in, q_out = job.q_in, job.q_out
    rec = {
        "name": f"{job.path}.weight",
        "module": job.path,
        "kind": job.kind + (" (dora)" if dora else ""),
        "shape": [*lead, job.in_dims],
        "dtype": job.dtype,
        "bits": q_out.bits if q_out else (q_in.bits if q_in else None),
        "group_size": q_out.group_size if q_out else (q_in.group_size if q_in else None),
        "mode": q_out.mode if q_out else None,
        "policy": policy if (job.quantized and q_out is not None) else "none",
    }
    if q_in is not None and q_out != q_in:
        rec["from_bits"], rec["from_group_size"] = q_in.bits, q_in.group_size
        if q_in.mode != "affine":
            rec["from_mode"] = q_in.mode
        if rec["policy"] not in ("stock", "none"):
            rec["base_grid"] = grid_move(q_in, q_out)  # refined: the base moved exactly
    return rec


def _sampled_rows(job: Job, tensors: tuple, sample: int):
    """Evenly spaced output rows (of every expert) of ``tensors`` and of the
    adapter's ``b`` when the tensor has more than ``sample`` weights, and the
    share of rows kept. Without the native sums, MLX's CPU dequantize makes the
    exact figures cost ~100 ns per weight, ~15 s for one 128 x 2048 x 512 tensor."""
    w0 = tensors[0]
    lead = tuple(w0.shape[:-1])
    out_rows = lead[-1]
    per_row = math.prod(lead[:-1]) * job.in_dims
    if per_row * out_rows <= sample:
        return tensors, job.b, 1.0
    k = max(1, min(out_rows, -(-sample // per_row)))
    idx = mx.array([int((i + 0.5) * out_rows / k) for i in range(k)], dtype=mx.int32)
    *quant, magnitude = tensors
    sub = tuple(None if x is None else mx.take(x, idx, axis=len(lead) - 1) for x in quant)
    sub += (None if magnitude is None else mx.take(magnitude, idx, axis=-1),)
    return sub, mx.take(job.b, idx, axis=job.b.ndim - 2), k / out_rows


def general_fidelity(job: Job, scale: float, old, new, magnitude) -> dict:
    """The report's figures when :func:`pyfuse.kernel.fidelity.tensor_fidelity` does
    not apply (float weights, --dequantize, another precision, mx modes,
    DoRA): the intended change is ``target - W`` with ``target`` the exact
    (float32) fused weight, ``W + delta``, DoRA-rescaled when there is a
    magnitude; codes and groups are compared only when the grid is the same."""
    w0 = old[0]
    q_out = job.q_out
    same_grid = job.quantized and q_out == job.q_in
    sums = dict(dd=0.0, cc=0.0, cd=0.0, ww=0.0, wchg=0, cchg=0, refit=0, max_abs=0.0)
    lead = w0.shape[:-1]
    for rows in row_chunks(lead, job.in_dims, stochastic=False, elements=FIDELITY_CHUNK_ELEMENTS):
        _add_chunk_sums(sums, job, scale, rows, old, new, magnitude, same_grid)
    n = math.prod(lead) * job.in_dims
    delta_norm, change_norm = math.sqrt(sums["dd"]), math.sqrt(sums["cc"])
    retention, noise = retention_and_noise(sums["dd"], sums["cd"], sums["cc"])
    groups = (math.prod(lead) * (job.in_dims // q_out.group_size)) if q_out is not None else None
    return dict(
        delta_norm=delta_norm, change_norm=change_norm, retention=retention, noise=noise,
        weights_changed=sums["wchg"] / n,
        codes_changed=(sums["cchg"] / n) if same_grid else None,
        groups_refit=int(sums["refit"]) if same_grid else None,
        groups=groups,
        rel_error=change_norm / math.sqrt(sums["ww"]) if sums["ww"] > 0 else 0.0,
        max_abs=sums["max_abs"],
    )


def _as_float(w, s, b, q) -> mx.array:
    """Some rows of a weight in float32 (dequantized when ``q``)."""
    return (w if q is None else dequantize(w, s, b, q)).astype(mx.float32)


def _add_chunk_sums(sums: dict, job: Job, scale: float, rows: slice, old, new, magnitude,
                    same_grid: bool) -> None:
    w0, s0, b0 = (x[rows] if x is not None else None for x in old)
    w1, s1, b1 = (x[rows] if x is not None else None for x in new)
    q_in = job.q_in
    before = _as_float(w0, s0, b0, q_in if job.quantized else None)
    after = _as_float(w1, s1, b1, job.q_out)
    target = before + delta_f32(*job_factors(job, rows), scale)
    if magnitude is not None:
        target = dora_rescale(target, magnitude[rows].astype(mx.float32))
    d = target - before
    change = after - before
    parts = [(change * change).sum(), (before * before).sum(), (before != after).sum(),
             mx.abs(change).max(), (d * d).sum(), (change * d).sum()]
    if same_grid:
        parts.append((unpack_codes(w0, q_in.group_size, q_in.bits)
                      != unpack_codes(w1, q_in.group_size, q_in.bits)).sum())
        refit = s0 != s1
        if b0 is not None:
            refit = refit | (b0 != b1)
        parts.append(refit.sum())
    mx.eval(*parts)
    sums["cc"] += parts[0].item()
    sums["ww"] += parts[1].item()
    sums["wchg"] += parts[2].item()
    sums["max_abs"] = max(sums["max_abs"], parts[3].item())
    sums["dd"] += parts[4].item()
    sums["cd"] += parts[5].item()
    if same_grid:
        sums["cchg"] += parts[6].item()
        sums["refit"] += parts[7].item()


# -- the whole fuse -----------------------------------------------------------------


def build_report(plan: Plan, records, *, policy, seed, dequantize, requant_bits,
                 requant_group_size, only, written, seconds, on_range_overflow=DEFAULT_RANGE_OVERFLOW) -> dict:
    """``{"tensors": records, "summary": {...}}``."""
    dd = sum(r["delta_norm"] ** 2 for r in records)
    cd = sum((r["retention"] or 0.0) * r["delta_norm"] ** 2 for r in records)
    # Sums per-tensor residuals (each vs its own retention); the noise floor uses one global retention.
    resid = sum(((r["noise"] or 0.0) * r["delta_norm"]) ** 2 for r in records)
    retention = cd / dd if dd > 0 else None
    noise = math.sqrt(resid) / math.sqrt(dd) if dd > 0 else None
    with_ret = [r for r in records if r["retention"] is not None]
    worst = min(with_ret, key=lambda r: r["retention"]) if with_ret else None
    coded = [r for r in records if r.get("codes_changed") is not None]
    n_coded = sum(math.prod(r["shape"]) for r in coded)
    summary = {
        "policy": policy,
        "seed": seed,
        "dequantize": dequantize,
        "requant_bits": requant_bits,
        "requant_group_size": requant_group_size,
        "only": only,
        "kernel": "native" if native_available() else "reference",
        "modules_fused": len(records),
        "weights_fused": sum(math.prod(r["shape"]) for r in records),
        "delta_norm": math.sqrt(dd),
        "change_norm": math.sqrt(sum(r["change_norm"] ** 2 for r in records)),
        "retention": retention,
        "noise": noise,
        "min_retention": worst["retention"] if worst else None,
        "min_retention_tensor": worst["name"] if worst else None,
        "codes_changed": (sum(r["codes_changed"] * math.prod(r["shape"]) for r in coded) / n_coded
                          if n_coded else None),
        "groups_refit": sum(r["groups_refit"] for r in coded) if coded else None,
        **_out_of_range_summary(records, policy, on_range_overflow),
        "configured_without_weights": plan.configured_without_weights,
        "zero_modules": plan.zero_modules,
        "excluded_by_only": plan.excluded_by_only,
        "outside_config": plan.outside_config,
        "incompatible": plan.incompatible,
        "replaced": [n for j in plan.jobs if j.kind in ("replace", "requantize") for n in j.replacement],
        "dequantized_modules": sum(1 for j in plan.jobs if j.kind == "dequantize"),
        "sampled_tensors": sum(1 for r in records if r.get("sampled", 1.0) < 1.0),
        "shards": written["shards"],
        "seconds": round(seconds, 3),
    }
    summary["warnings"] = _warnings(summary, records)
    return {"tensors": records, "summary": summary}


def _out_of_range_summary(records, policy: str, on_range_overflow: str) -> dict:
    """preserve / stochastic: the groups whose fused values left their grid's
    range, over the whole fuse, and which modules had any."""
    kept = [r for r in records if r.get("groups_out_of_range") is not None]
    if not kept:
        return {}
    n, groups = sum(r["groups_out_of_range"] for r in kept), sum(r["groups"] for r in kept)
    return {"on_range_overflow": on_range_overflow, "groups_out_of_range": n, "groups_grid_kept": groups,
            "out_of_range_share": n / groups if groups else 0.0,
            "modules_out_of_range": [r["module"] for r in kept if r["groups_out_of_range"]],
            "modules_grid_kept": len(kept)}


def _range_warning(summary: dict, records) -> str | None:
    n = summary.get("groups_out_of_range")
    if not n:
        return None
    worst = max((r for r in records if r.get("groups_out_of_range")), key=lambda r: r["out_of_range_share"])
    done = ("lost their grid: their fused values left its range, so they were re-fitted (a new scale and "
            "bias, MLX's affine rule on their fused values)"
            if summary["on_range_overflow"] == "refit" else
            "had fused values outside their grid's range: their codes were clipped to it (scale and bias "
            "kept, that part of the delta lost)")
    return (f"--policy {summary['policy']}: {n} of {summary['groups_grid_kept']} groups "
            f"({summary['out_of_range_share']:.1%}) in {len(summary['modules_out_of_range'])} of "
            f"{summary['modules_grid_kept']} module(s) {done}; worst {worst['module']} "
            f"{worst['out_of_range_share']:.1%}; see --on-range-overflow")


def _warnings(summary: dict, records) -> list[str]:
    out = []
    if (range_warning := _range_warning(summary, records)) is not None:
        out.append(range_warning)
    if not records and not summary["replaced"]:
        out.append("nothing was fused: the adapter has no weights for any module"
                   + (" matching --only" if summary["only"] else ""))
    r, n = summary["retention"], summary["noise"]
    quantized = [x for x in records if x["policy"] != "none"]
    if quantized and r is not None:
        bits = sorted({x["bits"] for x in quantized})
        bits_s = " and ".join(f"{b}-bit" for b in bits)
        hints = []
        if summary["policy"] != "stochastic":
            hints.append("--policy stochastic")
        if not summary["requant_bits"] or summary["requant_bits"] < 8:
            hints.append("--requant-bits 8")
        hints.append("--dequantize")
        hint = "; consider " + ", ".join(hints)
        noise_s = f", noise {n:.3g}x the delta" if n is not None else ""
        if r < LOW_RETENTION:
            out.append(f"the adapter is mostly erased by {bits_s} re-quantization: "
                       f"retention {r:.3g}{noise_s}{hint}")
        elif r < PARTLY_RETENTION:
            out.append(f"the adapter is partly erased by {bits_s} re-quantization: "
                       f"retention {r:.3g}{noise_s}{hint}")
        elif summary["min_retention"] is not None and summary["min_retention"] < LOW_RETENTION:
            out.append(f"{summary['min_retention_tensor']} keeps only "
                       f"{summary['min_retention']:.2f} of its delta after re-quantization{hint}")
    if summary["incompatible"]:
        first = ", ".join(list(summary["incompatible"])[:3])
        out.append(f"--lenient: fused {len(summary['incompatible'])} module(s) mlx-lm's loader refuses "
                   f"(first: {first}); the output matches no model mlx-lm builds from this adapter")
    if summary["configured_without_weights"]:
        k = len(summary["configured_without_weights"])
        out.append(f"{k} module(s) named by the adapter config have no adapter weights and were "
                   "left unchanged (mlx_lm fuse would re-quantize them with a zero delta)")
    return out


def format_table(report: dict, max_rows: int = 12):
    """A short rich table of the report (the worst tensors first)."""
    from rich.table import Table
    from rich.text import Text

    recs = sorted(report["tensors"], key=lambda r: (r["retention"] is None, r["retention"] or 0.0))
    table = Table(title="pyfuse fuse: fidelity", title_justify="left")
    table.add_column("tensor", justify="left", no_wrap=True)
    for col in ("shape", "q", "|delta|", "|change|", "retention", "noise", "codes chg", "refit"):
        table.add_column(col, justify="right", no_wrap=True)

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    def changed(r):
        return (num(r["codes_changed"], ".2%") if r.get("codes_changed") is not None else "-",
                num(r["groups_refit"], "d") if r.get("groups_refit") is not None else "-")

    for r in recs[:max_rows]:
        q = "float" if r["bits"] is None or r["policy"] == "none" else f"{r['bits']}b g{r['group_size']}"
        table.add_row(r["name"], "x".join(map(str, r["shape"])), q, num(r["delta_norm"], ".3g"),
                      num(r["change_norm"], ".3g"), num(r["retention"], ".3f"), num(r["noise"], ".3g"),
                      *changed(r))
    if len(recs) > max_rows:
        table.add_row(f"... {len(recs) - max_rows} more (see --report)", *[""] * 8)
    s = report["summary"]
    if recs:
        table.add_row(Text.assemble(("all", "bold")), "", s["policy"], num(s["delta_norm"], ".3g"),
                      num(s["change_norm"], ".3g"), num(s["retention"], ".3f"), num(s["noise"], ".3g"),
                      *changed(s))
    return table
