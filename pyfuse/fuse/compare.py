"""``pyfuse fuse --compare-policies``: every re-quantization policy, on the
model's own grid and refined to ``requant_bits`` (8 unless given), fused and
measured without writing a model.

Per row (policy x grid), from one fuse of the adapter and one of its
zero-delta twin (:func:`pyfuse.adapters.zero.zero_adapter`), each into a
temporary directory that is removed straight after:

* ``weight_retention``: the fuse report's retention (share of the delta in
  the fused weights, :mod:`pyfuse.kernel.fidelity`);
* ``output_error`` / ``output_retention``: the mean over the fused modules of
  the report's per-module figures on the held-out calibration tokens
  (:mod:`pyfuse.calibration.fidelity`; with ``calibration`` only);
* ``kl_to_unfused`` / ``top1_agreement``: the fused model against the base
  with the adapter applied unfused, per token (:mod:`pyfuse.fuse.agreement`,
  on ``agreement_prompts`` or the held-out calibration sequences);
* ``zero_twin_weights_changed``: the share of the fused modules' dequantized
  weights the zero-delta twin's fuse changes (the twin's report);
* ``bytes_added``: the fused model's tensor bytes minus the base's.

The calibration pass and the unfused reference run once, before the fuses;
one model is in memory at a time. ``calibrated`` needs ``calibration``
(without it its rows are left out, with a note).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import progress
from ..errors import UserError
from ..io.adapter_dir import read_adapter
from ..io.hub import resolve_model_dir
from ..io.model_dir import ModelDir
from ..options import POLICIES, SUPPORTED_BITS
from .agreement import agreement_data, agreement_summary, unfused_reference

# The refined rows' bits when none are given.
DEFAULT_REFINE_BITS = 8
ROW_FIELDS = ("policy", "grid", "requant_bits", "weight_retention", "output_error", "output_retention",
              "kl_to_unfused", "top1_agreement", "zero_twin_weights_changed", "bytes_added")
# fuse_model options a comparison passes on to every fuse.
PASSED_ON = ("seed", "on_range_overflow", "only", "layers", "modules", "lenient", "trust_remote_code",
             "requant_group_size", "damp", "report_sample", "refine_headroom")


@dataclass
class Comparison:
    """The rows (:data:`ROW_FIELDS`, plus ``error`` when a fuse failed), what
    was compared and notes."""

    rows: list[dict]
    meta: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "meta": self.meta, "warnings": self.warnings}


def compare_policies(model, adapter_path, *, policies=None, requant_bits: int | None = None,
                     calibration=None, calibration_min_tokens: int | None = None, agreement_prompts=None,
                     agreement: bool = True, **fuse_options) -> Comparison:
    """Fuse ``adapter_path`` into ``model`` under each of ``policies``
    (default: all), on the stored grid and refined to ``requant_bits``, and
    measure each fuse (see the module doc). ``fuse_options``: any of
    :data:`PASSED_ON` (:func:`pyfuse.fuse_model`'s arguments). Writes no
    model: every fuse goes to a temporary directory, removed after."""
    started = time.monotonic()
    unknown = sorted(set(fuse_options) - set(PASSED_ON))
    if unknown:
        raise UserError(f"--compare-policies does not take {', '.join(unknown)}")
    model_path, adapter_path = resolve_model_dir(model), Path(adapter_path)
    policies, notes = _check(policies, requant_bits, calibration)
    bits = requant_bits or DEFAULT_REFINE_BITS
    adapter = read_adapter(adapter_path)
    if adapter.fine_tune_type == "full":
        raise UserError(f"{adapter_path} is a full fine-tune: --compare-policies compares fuses of a "
                        "LoRA/DoRA delta")
    modules = _quantized_modules(model_path, adapter)
    data = agreement_data(model_path, prompts=agreement_prompts, calibration=calibration, enabled=agreement)
    hessians = _hessians(model_path, calibration, modules, calibration_min_tokens)
    reference = unfused_reference(model_path, adapter_path, data) if data is not None else None
    if isinstance(reference, str):
        notes.append(reference)
        reference = None
    runs = [(p, rb) for p in policies for rb in (None, bits)]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="pyfuse-compare-") as tmp, progress.progress_bar() as bar:
            task = bar.add_task("compare policies", total=len(runs))
            zero = _zero_twin(adapter_path, model_path, adapter, Path(tmp))
            for policy, rb in runs:
                bar.update(task, description=f"compare policies: {policy} {_grid(policy, rb)}")
                rows.append(_row(model_path, adapter_path, zero, Path(tmp), policy, rb, hessians, reference,
                                 data, fuse_options))
                bar.advance(task)
    finally:
        if reference is not None:
            reference.close()
    notes += [f"{r['policy']} {r['grid']}: {r['error']}" for r in rows if r.get("error")]
    meta = {"model": str(model_path), "adapter": str(adapter_path), "policies": policies,
            "requant_bits": bits, "calibration": None if calibration is None else str(calibration),
            "modules": len(modules), "agreement_data": None if data is None else data.source,
            "agreement_tokens": None if reference is None else sum(len(s) for s in data.sequences),
            "seconds": round(time.monotonic() - started, 3)}
    return Comparison(rows=rows, meta=meta, warnings=notes)


def _check(policies, requant_bits, calibration) -> tuple[list[str], list[str]]:
    """The policies to run (calibrated left out without calibration data) and notes."""
    notes = []
    if policies is None:
        policies = list(POLICIES)
        if calibration is None:
            policies.remove("calibrated")
            notes.append("calibrated: left out (it needs --calibration DATA.jsonl)")
    else:
        bad = [p for p in policies if p not in POLICIES]
        if bad or not policies:
            raise UserError(f"--compare-policies: {', '.join(bad) or 'no policy'} is not a policy "
                            f"({', '.join(POLICIES)})")
        if "calibrated" in policies and calibration is None:
            raise UserError("--compare-policies calibrated needs --calibration DATA.jsonl")
        policies = list(dict.fromkeys(policies))
    if requant_bits is not None and requant_bits not in SUPPORTED_BITS:
        raise UserError(f"--requant-bits {requant_bits} is not supported ({', '.join(map(str, SUPPORTED_BITS))})")
    if calibration is not None and not Path(calibration).exists():
        raise UserError(f"--calibration {calibration} does not exist")
    return policies, notes


def _quantized_modules(model_path: Path, adapter) -> list[str]:
    """The adapter's modules that are quantized in the model (the ones whose
    inputs the calibration records; a filter may fuse fewer)."""
    with ModelDir(model_path) as mdir:
        return [p for p, m in adapter.modules.items() if m.has_delta and f"{p}.scales" in mdir.tensors]


def _hessians(model_path: Path, calibration, modules: list[str], min_tokens) -> dict | None:
    if calibration is None or not modules:
        return None
    from ..calibration import collect_hessians

    return collect_hessians(model_path, calibration, modules, min_tokens=min_tokens)


def _zero_twin(adapter_path: Path, model_path: Path, adapter, tmp: Path) -> Path:
    from ..adapters.zero import zero_adapter

    return zero_adapter(adapter_path, tmp / "zero_twin", model=model_path if adapter.is_dora else None).out


def _grid(policy: str, rb: int | None) -> str:
    if rb is None:
        return "stored grid"
    return f"{rb}-bit " + ("re-fitted" if policy == "stock" else "refined")


def _row(model_path, adapter_path, zero, tmp: Path, policy, rb, hessians, reference, data, options) -> dict:
    """One policy x grid: the adapter's fuse and its zero twin's, measured and removed."""
    from .api import fuse_model

    row = dict.fromkeys(ROW_FIELDS)
    row.update(policy=policy, grid=_grid(policy, rb), requant_bits=rb)
    kw = dict(policy=policy, requant_bits=rb, hessians=hessians, agreement=False, link_unchanged=True,
              **options)
    fused = tmp / "fused"
    try:
        res = fuse_model(model_path, adapter_path, fused, **kw)
        row["weight_retention"] = res.summary["retention"]
        row.update(output_figures(res.report["tensors"]))
        if reference is not None:
            s = agreement_summary(_compare(reference, fused), data)
            row.update(kl_to_unfused=s["kl_to_unfused"], top1_agreement=s["top1_agreement"])
        row["bytes_added"] = tensor_bytes(fused) - tensor_bytes(model_path)
        shutil.rmtree(fused)
        twin = fuse_model(model_path, zero, fused, **kw)
        row["zero_twin_weights_changed"] = weights_changed(twin.report["tensors"])
    except UserError as err:
        row["error"] = str(err)
    finally:
        shutil.rmtree(fused, ignore_errors=True)
    return row


def _compare(reference, fused: Path):
    from ..lm.agreement import compare_to_reference

    return compare_to_reference(reference, fused)


def output_figures(records: list[dict]) -> dict:
    """The mean over modules of the per-module output error and retention (None without them)."""
    errs = [r["output_error"] for r in records if r.get("output_error") is not None]
    rets = [r["output_retention"] for r in records if r.get("output_retention") is not None]
    return {"output_error": sum(errs) / len(errs) if errs else None,
            "output_retention": sum(rets) / len(rets) if rets else None}


def weights_changed(records: list[dict]) -> float | None:
    """The share of the fused modules' weights whose dequantized value changed."""
    n = sum(_size(r) for r in records)
    return sum(r["weights_changed"] * _size(r) for r in records) / n if n else None


def _size(r: dict) -> int:
    out = 1
    for d in r["shape"]:
        out *= d
    return out


def tensor_bytes(model_dir: str | os.PathLike) -> int:
    """The bytes of every tensor of a model directory (its shards' data, headers left out)."""
    with ModelDir(Path(model_dir)) as mdir:
        return sum(t.nbytes for t in mdir.tensors.values())


# -- output ---------------------------------------------------------------------------------


def format_comparison(comparison: Comparison):
    """A rich table of the rows."""
    from rich.table import Table

    m = comparison.meta
    table = Table(title=f"pyfuse fuse --compare-policies ({m['modules']} quantized module(s) in the adapter)",
                  title_justify="left")
    heads = ("policy", "grid", "weight ret.", "output error", "output ret.", "KL to unfused", "top-1 agree",
             "zero twin changes", "bytes added")
    for i, h in enumerate(heads):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in comparison.rows:
        if r.get("error"):
            table.add_row(r["policy"], r["grid"], "failed (see notes)", *[""] * 6)
            continue
        table.add_row(r["policy"], r["grid"], num(r["weight_retention"], ".3f"), num(r["output_error"], ".3f"),
                      num(r["output_retention"], ".3f"), num(r["kl_to_unfused"], ".3g"),
                      num(r["top1_agreement"], ".2%"), num(r["zero_twin_weights_changed"], ".2%"),
                      num(r["bytes_added"], ",d"))
    return table


def legend(comparison: Comparison) -> list[str]:
    """What the columns mean and on what they were measured."""
    m = comparison.meta
    out = ["weight ret.: share of the adapter's delta in the fused weights; output error / ret.: "
           "||X (W_fused - W - delta)|| / ||X delta|| and the share of X delta kept, on held-out calibration "
           "tokens (mean over modules; needs --calibration); zero twin changes: share of the fused modules' "
           "weights the zero-delta twin's fuse changes; bytes added: tensor bytes over the base model's"]
    if m["agreement_data"]:
        out.append(f"KL to unfused (per token, KL(unfused || fused)) and top-1 agreement against the base model "
                   f"with the adapter applied unfused, on {m['agreement_tokens']} tokens: {m['agreement_data']}")
    else:
        out.append("KL to unfused / top-1 agree: not measured (give --agreement-prompts or --calibration)")
    return out
