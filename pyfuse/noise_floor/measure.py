"""``pyfuse.noise_floor.measure``: what a fuse does to a quantized model when the
adapter contributes nothing, and how much of a real adapter survives.

For every requested (group size, bits) and policy, :func:`measure_noise_floor`

1. builds the **baseline**, the quantized model at that setting
   (:mod:`pyfuse.noise_floor.baseline`: ``source`` ``quantized`` for a
   full-precision model quantized here, ``model`` for a quantized model as
   stored, every module at its own bits and group size, ``requantized`` for
   its dequantized weights quantized at another setting);

2. fuses a **zero delta** into every affine-quantized tensor through the
   native kernel, ``rounds`` times in a row (:mod:`pyfuse.noise_floor.weights`),
   and compares each round with the baseline
   (:func:`pyfuse.kernel.fidelity.tensor_fidelity`, summed over tensors in
   :mod:`pyfuse.noise_floor.sums`):

   * ``weights_changed``: share of weights whose dequantized value changed;
   * ``codes_changed``: share of weights whose integer code changed;
   * ``rel_error`` = ||change|| / ||W|| over all measured tensors;
   * ``max_abs`` = the largest |change|;
   * ``drift``: these four after round 1, 2, ..., ``rounds``.

   **The scalar fields of a row describe the model after all ``rounds``
   fuses** (round ``rounds``; with the default ``rounds=1``, one fuse);
   ``drift`` holds every round.

3. with an adapter: fuses the adapter's real delta once into the baseline
   (same kernel and policy) and reports ``retention`` = <change, delta> /
   ||delta||^2 and ``noise`` = ||change - retention * delta|| / ||delta||
   over all adapted tensors; both are null (undefined) for a zero adapter.
   At settings other than the model's own, the adapter is fused into the
   baseline of that setting (labelled by ``source``). With ``calibration``
   data: ``adapter_output_error`` = ||X (W_hat - W - delta)|| / ||X delta||
   and ``adapter_output_retention``, the mean over the adapted modules of the
   fuse report's per-module figures on the held-out calibration tokens
   (:func:`pyfuse.calibration.collect_hessians`, run once on the model as
   given; :func:`pyfuse.calibration.fidelity.output_fidelity`).

4. on a prompt set (a built-in dozen, or ``prompts``), runs the baseline and
   the zero-delta-fused model (after ``rounds`` fuses) teacher-forced
   (:mod:`pyfuse.noise_floor.probe`): ``kl_mean`` / ``kl_p99`` of
   KL(baseline || fused), ``top1_flip`` and ``top1_agreement`` (its
   complement), as :mod:`pyfuse.lm.agreement` computes them for the fuse
   report; with ``mc`` (MMLU-Pro rows)
   ``mc_flip``, the share of items whose answer flips, the answer being that
   of the one multiple-choice scorer (:mod:`pyfuse.lm.scorer`: what ``pyfuse
   eval mc --method logprob`` gives for the same model and items; every
   answer and its log-probabilities are in ``result.mc_items``). When every
   fused tensor is bit-identical to its baseline the outputs are identical
   by construction: the forward pass is skipped, the figures are 0 and the
   row says ``outputs_identical: true``. With an adapter, the adapter's
   fuse at each setting is run on the same prompts against the model as
   given with the adapter applied unfused (mlx-lm's loader; its logits
   computed once, :func:`pyfuse.lm.agreement.reference_logits`):
   ``adapter_kl_to_unfused`` (mean per-token KL(unfused || fused)) and
   ``adapter_top1_agreement``.

Absent figures are ``None`` (JSON null). The output directory gets
``noise_floor.json`` (``{"rows": [...], "meta": {...}}``), ``noise_floor.md``,
``noise_floor_tensors.jsonl`` (per-tensor figures), ``noise_floor_mc.jsonl``
(per item, with ``mc``) and PNG plots (:mod:`pyfuse.noise_floor.report`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .. import progress
from ..errors import UserError
from ..io.model_dir import ModelDir
from ..kernel.ops import native_available
from ..lm.load import compute_dtype_note
from ..options import DATA_FREE_POLICIES, POLICIES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .baseline import Setting, load_baseline, model_quantization, settings_for
from .probe import DEFAULT_PROMPTS, OutputProbe, ProbeInputs
from .report import ROW_FIELDS, NoiseFloorResult, format_markdown, write_outputs
from .sums import WeightNorms
from .weights import PolicyFuse, adapter_factors, fuse_policy, read_adapter

__all__ = ["DEFAULT_PROMPTS", "NoiseFloorResult", "measure_noise_floor", "format_markdown", "write_outputs",
           "ROW_FIELDS"]


# -- argument checks ----------------------------------------------------------------------


def _int_list(values, name: str, supported: Sequence[int]) -> list[int]:
    if isinstance(values, (int, str)):
        values = [values]
    out: list[int] = []
    for v in values:
        try:
            iv = int(v)
            if isinstance(v, bool) or (isinstance(v, float) and v != iv):
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{name}: {v!r} is not an integer") from None
        if iv not in supported:
            raise UserError(f"{name}: {iv} is not supported; supported: {', '.join(map(str, supported))}")
        if iv not in out:
            out.append(iv)
    if not out:
        raise UserError(f"{name}: give at least one value ({', '.join(map(str, supported))})")
    return out


def _policy_list(values) -> list[str]:
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for p in values:
        if p not in POLICIES:
            raise UserError(f"policies: {p!r} is not a policy; supported: {', '.join(POLICIES)}")
        if p not in out:
            out.append(p)
    if not out:
        raise UserError(f"policies: give at least one ({', '.join(POLICIES)})")
    return out


# -- the measurement ----------------------------------------------------------------------------


@dataclass
class _Job:
    """The inputs every setting is measured with."""

    model_dir: ModelDir
    policies: list[str]
    rounds: int
    seed: int
    adapter: Any | None
    probe_inputs: ProbeInputs | None
    unfused: Any | None = None  # the unfused adapter's logits on the prompts (ReferenceLogits)
    held_out: dict | None = None  # {module path: held-out X^T X} of the adapter's modules


@dataclass
class _Collected:
    """What the settings measured so far."""

    rows: list[dict] = field(default_factory=list)
    tensors: list[dict] = field(default_factory=list)
    mc_items: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: dict[str, list] = field(default_factory=dict)
    setting_seconds: dict[str, float] = field(default_factory=dict)


def measure_noise_floor(
    model: str | os.PathLike,
    *,
    group_sizes: Iterable[int] = SUPPORTED_GROUP_SIZES,
    bits: Iterable[int] = SUPPORTED_BITS,
    policies: Iterable[str] = DATA_FREE_POLICIES,
    rounds: int = 1,
    adapter_path: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    prompts: str | os.PathLike | Sequence[str | dict] | None = None,
    mc: str | os.PathLike | None = None,
    mc_limit: int | None = None,
    outputs: bool = True,
    out: str | os.PathLike | None = None,
    seed: int = 0,
) -> NoiseFloorResult:
    """Measure the re-quantization noise floor of ``model`` (see the module doc).

    Args:
        model: an mlx-lm model directory, full precision or quantized.
        group_sizes, bits: the settings to measure (32/64/128; 2/3/4/5/6/8).
            A quantized model is always measured at its own settings too.
        policies: re-quantization policies (``stock``, ``preserve``, ``stochastic``).
        rounds: successive zero-delta fuses (>= 1); scalar figures are after the last.
        adapter_path: an mlx-lm adapter directory: adds ``retention``/``noise``
            and, with the output level, ``adapter_kl_to_unfused`` /
            ``adapter_top1_agreement``.
        calibration: mlx-lm data (``text``, ``messages`` or
            ``prompt``/``completion`` rows; needs ``adapter_path``): adds
            ``adapter_output_error`` / ``adapter_output_retention``.
        prompts: None (built-in prompts), a JSONL file of ``{"text"}`` or
            ``{"messages"}`` rows, or a list of strings / such dicts.
        mc: an MMLU-Pro JSONL/Parquet file: adds ``mc_flip``; ``mc_limit``
            takes its first N items.
        outputs: False skips the output level (no tokenizer or forward passes).
        out: a directory for noise_floor.json / .md / _tensors.jsonl / _mc.jsonl and plots.
        seed: the seed of the ``stochastic`` policy (round r uses seed + r - 1).

    Raises:
        UserError: unknown settings, unreadable files, a model with no
            quantizable tensor at any requested setting.
    """
    started = time.monotonic()
    path = Path(model)
    gss = _int_list(group_sizes, "group sizes", SUPPORTED_GROUP_SIZES)
    bitss = _int_list(bits, "bits", SUPPORTED_BITS)
    pols = _policy_list(policies)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"rounds must be a positive integer, got {rounds!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if mc is not None and not outputs:
        raise UserError("mc needs the output level (it runs the models); drop outputs=False / --no-outputs")
    if calibration is not None and adapter_path is None:
        raise UserError("calibration measures the adapter's output error: give an adapter (--adapter-path)")
    model_dir, job = ModelDir(path), None
    try:
        quant = model_quantization(model_dir)
        adapter = read_adapter(adapter_path) if adapter_path is not None else None
        if not outputs and prompts is not None:
            raise UserError("prompts need the output level; drop outputs=False / --no-outputs")
        probe_inputs = ProbeInputs.read(path, prompts, mc, mc_limit) if outputs else None
        job = _Job(model_dir, pols, rounds, seed, adapter, probe_inputs)
        got = _Collected()
        _adapter_references(job, got, path, adapter_path, calibration)
        settings = settings_for(quant, gss, bitss)
        with progress.progress_bar() as bar:
            overall = bar.add_task("noise floor", total=len(settings))
            for setting in settings:
                t_setting = time.monotonic()
                if _measure_setting(job, got, setting, bar, overall):
                    got.setting_seconds[setting.label] = time.monotonic() - t_setting
                bar.advance(overall)
    finally:
        model_dir.close()
        if job is not None and job.unfused is not None:
            job.unfused.close()

    if not got.rows:
        raise UserError(f"{path}: no quantizable tensor at any requested setting "
                        f"(group sizes {', '.join(map(str, gss))}): "
                        + "; ".join(got.warnings[:3]))
    meta = _meta(path, quant, job, got, gss=gss, bitss=bitss, mc=mc, adapter_path=adapter_path)
    meta["calibration"] = None if calibration is None else str(calibration)
    meta["seconds"] = time.monotonic() - started
    result = NoiseFloorResult(rows=got.rows, meta=meta, tensors=got.tensors, mc_items=got.mc_items,
                              warnings=got.warnings)
    if out is not None:
        result.files = write_outputs(result, out)
    return result


def _measure_setting(job: _Job, got: _Collected, setting: Setting, bar, overall) -> bool:
    """Every policy at one setting; False when nothing is quantized there."""
    base = load_baseline(job.model_dir, setting)
    bar.update(overall, description=f"noise floor {setting.bits}-bit g{setting.group_size}")
    if base.skipped:
        got.skipped[setting.label] = [{"module": m, "reason": r} for m, r in base.skipped]
    if not base.qmods:
        got.warnings.append(f"{setting.label}: no tensor is quantized at this setting "
                            f"({len(base.skipped)} stay in full precision); no rows")
        return False
    if base.skipped and setting.source != "model":
        m, why = base.skipped[0]
        got.warnings.append(f"{setting.label}: {len(base.skipped)} weight tensor(s) stay in full "
                            f"precision and are not measured (e.g. {m}: {why})")
    factors = {}
    if job.adapter is not None:
        all_modules = {n for n, _ in base.model.named_modules()}
        factors, unquantized = adapter_factors(job.adapter, {q.path: q for q in base.qmods}, all_modules)
        if unquantized:
            got.warnings.append(f"{setting.label}: {len(unquantized)} adapted module(s) are not "
                                f"quantized here and do not count in retention/noise "
                                f"(e.g. {unquantized[0]})")
    record = {"setting": setting.label, "source": setting.source, "row_group_size": setting.group_size,
              "row_bits": setting.bits}
    probe = None
    if job.probe_inputs is not None:
        probe = OutputProbe(job.probe_inputs, base.model, base.qmods)
        got.mc_items += _mc_rows(record, None, job.probe_inputs.mc_items, probe.base_mc)
    norms = WeightNorms(base.qmods)
    other: dict[str, int] = {}
    for q in base.qmods:
        if (q.group_size, q.bits) != (setting.group_size, setting.bits):
            key = f"{q.bits}-bit g{q.group_size}"
            other[key] = other.get(key, 0) + 1
    task = bar.add_task(f"  {setting.label}", total=len(job.policies) * len(base.qmods))
    for policy in job.policies:
        t_row = time.monotonic()
        fused = fuse_policy(base.qmods, policy, rounds=job.rounds, seed=job.seed, norms=norms, record=record,
                            factors=factors, adapter_scale=job.adapter.scale if job.adapter else None,
                            keep_params=probe is not None, advance=lambda: bar.advance(task),
                            held_out=job.held_out)
        got.tensors += fused.tensors
        row = _row(setting, policy, fused, job, norms)
        row.update(tensors=len(base.qmods), weights=fused.rounds[-1].n, skipped=len(base.skipped),
                   other_settings=other)
        if job.adapter is not None:
            row.update(fused.adapter.figures())
            row["adapter_modules"] = fused.adapter.modules
            row["adapter_delta_norm"] = math.sqrt(fused.adapter.dd)
            _adapter_outputs(row, job, probe, fused)
        row["seconds_weights"] = time.monotonic() - t_row
        if probe is not None:
            answers = _outputs(row, probe, fused)
            got.mc_items += _mc_rows(record, policy, job.probe_inputs.mc_items, answers)
        got.rows.append(row)
    bar.update(task, visible=False)
    if probe is not None:
        probe.close()  # the baseline's logits (a temporary file when large)
    return True


def _row(setting: Setting, policy: str, fused: PolicyFuse, job: _Job, norms: WeightNorms) -> dict:
    """The row's figures after the last round, every round in ``drift``, the
    output-level figures still null."""
    final = fused.rounds[-1].figures(norms)
    return {"group_size": setting.group_size, "bits": setting.bits, "policy": policy,
            "source": setting.source,
            "weights_changed": final["weights_changed"], "codes_changed": final["codes_changed"],
            "rel_error": final["rel_error"], "max_abs": final["max_abs"],
            "rounds": job.rounds,
            "drift": [{"round": r + 1, **s.figures(norms)} for r, s in enumerate(fused.rounds)],
            "retention": None, "noise": None,
            "kl_mean": None, "kl_p99": None, "top1_flip": None, "top1_agreement": None, "mc_flip": None,
            "groups_refit": final["groups_refit"],
            "adapter_kl_to_unfused": None, "adapter_top1_agreement": None,
            "adapter_output_error": None, "adapter_output_retention": None}


def _adapter_references(job: _Job, got: _Collected, path: Path, adapter_path, calibration) -> None:
    """Once for every setting: the unfused adapter's logits on the probe's
    prompts (with the output level) and the held-out ``X^T X`` of the
    adapter's modules (with ``calibration``)."""
    if job.adapter is None:
        return
    if calibration is not None:
        from ..calibration import collect_hessians

        if not Path(calibration).exists():
            raise UserError(f"calibration data {calibration} does not exist")
        modules = [p for p, m in job.adapter.modules.items() if m.has_delta]
        hessians = collect_hessians(path, calibration, modules)
        job.held_out = {p: h.held_out for p, h in hessians.items()}
        if all(h is None for h in job.held_out.values()):
            got.warnings.append(f"{calibration}: no held-out sequence (every 4th is held out): "
                                "no output error")
    if job.probe_inputs is not None:
        from ..fuse.agreement import AgreementData, unfused_reference

        data = AgreementData(job.probe_inputs.prompt_seqs, job.probe_inputs.prompts)
        ref = unfused_reference(path, adapter_path, data)
        if isinstance(ref, str):
            got.warnings.append(ref)
        else:
            job.unfused = ref


def _adapter_outputs(row: dict, job: _Job, probe: OutputProbe | None, fused: PolicyFuse) -> None:
    """The adapter fuse's output figures: output error and retention (mean
    over its modules), KL and top-1 agreement to the unfused adapter."""
    from ..fuse.compare import output_figures

    if job.held_out is not None:
        figures = output_figures(fused.tensors)
        row.update(adapter_output_error=figures["output_error"],
                   adapter_output_retention=figures["output_retention"])
    if probe is not None and job.unfused is not None:
        agree = probe.agreement(job.unfused, fused.adapter_params)
        row.update(adapter_kl_to_unfused=agree.kl_mean, adapter_top1_agreement=agree.top1_agreement)


def _outputs(row: dict, probe: OutputProbe, fused: PolicyFuse) -> list:
    """Fill the row's output-level figures; the fused model's MC answers."""
    t_out = time.monotonic()
    row["outputs_identical"] = fused.identical
    if fused.identical:
        # bit-identical parameters: the same outputs, no forward pass needed
        row.update(kl_mean=0.0, kl_p99=0.0, top1_flip=0.0, top1_agreement=1.0,
                   mc_flip=probe.mc_flip(probe.base_mc))
        answers = probe.base_mc
    else:
        figures, answers = probe.compare(fused.params)
        row.update(figures)
    row["seconds_outputs"] = time.monotonic() - t_out
    return answers


def _mc_rows(record: dict, policy: str | None, items, answers) -> list[dict]:
    """Per item: the scorer's answer of the baseline (``policy`` null) or of a fused model."""
    return [{**record, "policy": policy, "id": it.question_id, "gold": it.answer,
             "prediction": a.prediction, "logprobs": a.logprobs} for it, a in zip(items, answers)]


def _meta(path: Path, quant: dict | None, job: _Job, got: _Collected, *, gss, bitss, mc,
          adapter_path) -> dict:
    adapter_meta = None
    if job.adapter is not None:
        dd = [r["adapter_delta_norm"] for r in got.rows]
        adapter_meta = {"path": str(adapter_path), "scale": job.adapter.scale,
                        "modules": sum(1 for m in job.adapter.modules.values() if m.has_delta),
                        "delta_norm": max(dd) if dd else 0.0, "zero": all(d == 0 for d in dd)}
        if adapter_meta["zero"]:
            got.warnings.append("the adapter's delta is zero: retention and noise are undefined")
    probe = job.probe_inputs
    return {
        "model": str(path),
        "model_quantization": dict(quant) if quant is not None else None,
        "model_kind": "quantized" if quant is not None else "full precision",
        "group_sizes": gss, "bits": bitss, "policies": job.policies, "rounds": job.rounds, "seed": job.seed,
        "scalars_describe": f"round {job.rounds} (after all rounds); drift lists every round",
        "native_kernel": native_available(),
        "output_dtype": compute_dtype_note() if probe is not None else None,
        "adapter": adapter_meta,
        "prompts": probe.prompts if probe else None, "prompt_tokens": probe.tokens if probe else None,
        "mc": str(mc) if mc is not None else None,
        "mc_items": len(probe.mc_items) if probe and mc is not None else None,
        "skipped": got.skipped,
        "warnings": got.warnings,
        "setting_seconds": got.setting_seconds,
    }
