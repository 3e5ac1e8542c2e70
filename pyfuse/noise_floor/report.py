"""The noise floor's result object and its files: ``noise_floor.json``
(``{"rows": [...], "meta": {...}}``), ``noise_floor.md`` (the table),
``noise_floor_tensors.jsonl`` (per tensor), ``noise_floor_mc.jsonl`` (per
multiple-choice item, with ``mc``) and the plots (:mod:`pyfuse.noise_floor.plots`),
each written atomically."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

__all__ = ["NoiseFloorResult", "ROW_FIELDS", "format_markdown", "write_outputs"]

# The fields of every row of noise_floor.json, in order (more may follow).
ROW_FIELDS = ("group_size", "bits", "policy", "source", "weights_changed", "codes_changed",
              "rel_error", "max_abs", "rounds", "drift", "retention", "noise", "kl_mean", "kl_p99",
              "top1_flip", "top1_agreement", "mc_flip")


@dataclass
class NoiseFloorResult:
    """What :func:`measure_noise_floor` measured (rows as plain dicts)."""

    rows: list[dict]
    meta: dict
    tensors: list[dict] = field(default_factory=list)
    # per multiple-choice item and model (the baseline, each policy's fused model): the scorer's
    # answer and log-probabilities (pyfuse.lm.scorer; what `pyfuse eval mc --method logprob` gives)
    mc_items: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "meta": self.meta}

    def row(self, group_size: int, bits: int, policy: str, source: str | None = None) -> dict:
        """The row of one setting (``source`` needed only when ambiguous)."""
        found = [r for r in self.rows if (r["group_size"], r["bits"], r["policy"]) == (group_size, bits, policy)
                 and (source is None or r["source"] == source)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} rows for group size {group_size}, {bits} bits, {policy}"
                           + (f", source {source}" if source else ""))
        return found[0]

    def markdown(self) -> str:
        return format_markdown(self)


# -- files --------------------------------------------------------------------------------


def _pct(x):
    return "—" if x is None else f"{100 * x:.2f} %"


def _num(x):
    return "—" if x is None else f"{x:.3f}"


def _sci(x):
    return "—" if x is None else ("0" if x == 0 else f"{x:.2e}")


def format_markdown(result: NoiseFloorResult, command: str | None = None) -> str:
    """The rows as a Markdown table, with what was measured above it."""
    meta = result.meta
    has_adapter = meta.get("adapter") is not None
    zero_adapter = has_adapter and meta["adapter"].get("zero")
    has_out = any(r["kl_mean"] is not None for r in result.rows)
    has_mc = any(r["mc_flip"] is not None for r in result.rows)
    has_akl = any(r.get("adapter_kl_to_unfused") is not None for r in result.rows)
    has_aerr = any(r.get("adapter_output_error") is not None for r in result.rows)
    lines = ["# Re-quantization noise floor", ""]
    if command:
        lines += ["```", command, "```", ""]
    kind = meta["model_kind"]
    if meta["model_quantization"]:
        q = meta["model_quantization"]
        kind += f", {q['bits']}-bit g{q['group_size']}"
    lines.append(f"- model: `{meta['model']}` ({kind})")
    lines.append(f"- kernel: {'native' if meta['native_kernel'] else 'pure-MLX reference (fallback)'}; "
                 f"rounds: {meta['rounds']} (figures after round {meta['rounds']}); seed {meta['seed']}")
    if has_adapter:
        a = meta["adapter"]
        lines.append(f"- adapter: `{a['path']}` ({a['modules']} module(s), scale {a['scale']:g})"
                     + (" — its delta is zero: retention and noise are undefined" if zero_adapter else ""))
    if meta.get("prompts"):
        lines.append(f"- prompts: {meta['prompts']}, {meta['prompt_tokens']} tokens, teacher-forced"
                     + (f"; multiple choice: {meta['mc_items']} items from `{meta['mc']}`" if has_mc else ""))
    lines.append(f"- time: {meta['seconds']:.1f} s")
    lines.append("")
    head = ["source", "group size", "bits", "policy", "weights changed", "codes changed", "rel. error",
            "max abs"]
    if has_adapter:
        head += ["retention", "noise"]
    if has_out:
        head += ["KL mean", "KL p99", "top-1 flip"]
    if has_mc:
        head += ["MC flip"]
    if has_aerr:
        head += ["adapter output error", "adapter output ret."]
    if has_akl:
        head += ["adapter KL to unfused", "adapter top-1 agree"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    for r in result.rows:
        cells = [r["source"], str(r["group_size"]), str(r["bits"]), r["policy"], _pct(r["weights_changed"]),
                 _pct(r["codes_changed"]), _sci(r["rel_error"]), _sci(r["max_abs"])]
        if has_adapter:
            if r["retention"] is None:
                cells += ["undefined", "undefined"]
            else:
                cells += [f"{r['retention']:.3f}", "0" if r["noise"] == 0 else f"{r['noise']:.3g}x"]
        if has_out:
            cells += [_sci(r["kl_mean"]), _sci(r["kl_p99"]), _pct(r["top1_flip"])]
        if has_mc:
            cells += [_pct(r["mc_flip"])]
        if has_aerr:
            cells += [_num(r.get("adapter_output_error")), _num(r.get("adapter_output_retention"))]
        if has_akl:
            cells += [_sci(r.get("adapter_kl_to_unfused")), _pct(r.get("adapter_top1_agreement"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("weights changed: share of weights whose dequantized value changed; codes changed: "
                 "share whose integer code changed; rel. error = ||change|| / ||W||; "
                 + ("retention = <change, delta> / ||delta||^2 and noise = ||change - retention * delta|| "
                    "/ ||delta|| for the adapter fused once; " if has_adapter else "")
                 + ("KL = KL(baseline || fused) of next-token distributions per token; top-1 flip: "
                    "positions whose most likely token changed; " if has_out else "")
                 + ("MC flip: items whose answer (the letter `pyfuse eval mc --method logprob` picks) "
                    "changed; " if has_mc else "")
                 + ("adapter output error = ||X (W_hat - W - delta)|| / ||X delta|| and output ret. = "
                    "<X (W_hat - W), X delta> / ||X delta||^2 on held-out calibration tokens, mean over the "
                    "adapter's modules; " if has_aerr else "")
                 + ("adapter KL to unfused: per-token KL(unfused || fused) of the adapter's fuse against the "
                    "model as given with the adapter applied unfused, on the same prompts, and the share of "
                    "positions whose top-1 token agrees; " if has_akl else "")
                 + "source: `quantized` = full-precision model quantized at that setting, `model` = the "
                   "quantized model as stored, `requantized` = its dequantized weights quantized at "
                   "that setting.")
    with_ret = [r for r in result.rows if r["retention"] is not None]
    if with_ret:
        keep = [r for r in with_ret if 0.5 <= r["retention"] <= 1.5]
        if keep:
            best = min(keep, key=lambda r: r["noise"])
            lines += ["", f"Keeps the adapter best (retention within 0.5-1.5, least noise): {best['policy']} at "
                          f"{best['bits']}-bit g{best['group_size']} ({best['source']}), retention "
                          f"{best['retention']:.3f}, noise {best['noise']:.3g}x."]
        else:
            lines += ["", "No measured setting keeps the adapter (retention within 0.5-1.5)."]
    if result.warnings:
        lines += ["", "Notes:", ""] + [f"- {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def write_outputs(result: NoiseFloorResult, out: str | os.PathLike,
                  command: str | None = None) -> dict[str, Path]:
    """Write noise_floor.json, noise_floor.md, noise_floor_tensors.jsonl,
    noise_floor_mc.jsonl (with multiple-choice items) and the plots into
    ``out`` (atomically, file by file)."""
    from ..io.files import atomic_write_text
    from .plots import plot_all

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output directory {out} ({err.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {out}")
    files = {}
    files["json"] = atomic_write_text(out / "noise_floor.json",
                                      json.dumps(_jsonable(result.to_dict()), indent=2) + "\n")
    files["md"] = atomic_write_text(out / "noise_floor.md", format_markdown(result, command))
    files["tensors"] = atomic_write_text(out / "noise_floor_tensors.jsonl", _jsonl(result.tensors))
    if result.mc_items:
        files["mc"] = atomic_write_text(out / "noise_floor_mc.jsonl", _jsonl(result.mc_items))
    for name, p in plot_all(result.rows, out).items():
        files[name] = p
    return files


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(_jsonable(r)) + "\n" for r in rows)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
