"""``pyfuse.fuse_model``: a streaming, drop-in replacement for ``mlx_lm fuse``.

What it does, in order (one module each):

1. Reads and checks everything before writing anything: the model directory
   (:mod:`pyfuse.io.model_dir`: config.json, its quantization and per-module
   overrides, the shards and their index, whose headers are validated, so
   truncated or corrupt files are refused up front) and the adapter
   directory (:mod:`pyfuse.io.adapter_dir`).
2. Maps the adapter's tensors onto base tensors by name
   (:mod:`~pyfuse.fuse.mapping`): a module is fused only when the adapter has
   weights for it (``lora_a`` and ``lora_b``); the modules the adapter config
   names without weights are reported (and left byte-identical, where
   ``mlx_lm fuse`` re-quantizes them with a zero delta, which changes a few
   per cent of their weights).
3. Plans every fused module's precision and output tensors and the changes to
   config.json (:mod:`~pyfuse.fuse.plan`).
4. Computes each module's new tensors (:mod:`~pyfuse.fuse.compute`) while
   writing the output into a temporary directory that is renamed to
   ``save_path`` at the end (:mod:`~pyfuse.fuse.writer`).
5. Reports, per fused tensor, what really changed (:mod:`~pyfuse.fuse.report`).

Policies (``policy``): ``stock`` is ``mlx_lm fuse``'s algorithm (the same
bytes per fused tensor, but for the two deviations below: DoRA on bf16/fp16
models, f16/bf16 adapter tensors); ``preserve`` keeps each group's scale and
bias (a zero adapter gives a byte-identical model) except in groups whose
fused values leave the grid's range (``on_range_overflow``: re-fitted by
default, counted per module in the report); ``stochastic`` rounds
stochastically (the delta survives in expectation). See
:func:`pyfuse.fuse_requant` (tests/unit/test_fuse_deviations.py checks the
deviations against ``mlx_lm fuse``).

Deviations from ``mlx_lm fuse``, on purpose:

* configured modules without adapter weights are not re-quantized;
* DoRA on a bf16/fp16 model: mlx-lm's DoRA fuse multiplies by the float32
  magnitude and so writes that layer's weight (or scales and biases) in
  float32; pyfuse keeps the model's dtype. For float32 models the two are
  bit-identical.
* f16/bf16 adapter tensors are widened to float32 before ``scale * B @ A``
  (mlx-lm multiplies in the adapter dtype); ``mlx_lm lora`` writes float32.
* the output keeps the input's shard layout, file names and every other
  file byte for byte (mlx-lm re-shards, rewrites the tokenizer files and
  config.json and adds a README); config.json is rewritten only when the
  quantization changes (``--dequantize``, ``--requant-bits``).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import fuse as ranks
from ..distributed import together, writes
from ..errors import UserError
from ..io.adapter_dir import read_adapter
from ..io.checks import check_finite
from ..io.files import sigterm_as_interrupt
from ..io.hub import resolve_model_dir
from ..io.outputs import check_file_destination, check_paths, publish_text
from ..io.model_dir import ModelDir
from ..options import (DEFAULT_GGUF_PATH, DEFAULT_RANGE_OVERFLOW, POLICIES, RANGE_OVERFLOW_POLICIES,
                       RANGE_OVERFLOW_ACTIONS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES)
from . import compute, export, report as reporting
from .agreement import agreement_data, measure_fused
from .plan import Job, Plan, make_plan
from .writer import write_model


@dataclass
class FuseResult:
    """What :func:`fuse_model` wrote and measured."""

    save_path: Path
    report: dict
    report_path: Path | None = None
    fused: list[str] = field(default_factory=list)  # module paths
    gguf_path: Path | None = None

    @property
    def summary(self) -> dict:
        return self.report["summary"]

    @property
    def warnings(self) -> list[str]:
        return self.report["summary"]["warnings"]


def fuse_model(
    model: str | os.PathLike,
    adapter_path: str | os.PathLike,
    save_path: str | os.PathLike,
    *,
    dequantize: bool = False,
    policy: str = "stock",
    seed: int = 0,
    report: str | os.PathLike | None = None,
    requant_bits: int | None = None,
    requant_group_size: int | None = None,
    only: str | None = None,
    layers: str | int | list[int] | None = None,
    modules: list[str] | None = None,
    link_unchanged: bool = False,
    force: bool = False,
    lenient: bool = False,
    on_range_overflow: str = DEFAULT_RANGE_OVERFLOW,
    export_gguf: bool = False,
    gguf_path: str = DEFAULT_GGUF_PATH,
    upload_repo: str | None = None,
    trust_remote_code: bool = False,
    report_sample: int | None = reporting.REPORT_SAMPLE_ELEMENTS,
    calibration: str | os.PathLike | None = None,
    calibration_min_tokens: int | None = None,
    damp: float | None = None,
    agreement_prompts: str | os.PathLike | None = None,
    agreement: bool = True,
    hessians: dict | None = None,
    refine_headroom: bool = False,
) -> FuseResult:
    """Fuse an mlx-lm LoRA/DoRA adapter into an mlx-lm model directory.

    Args:
        model: the model directory (quantized or not).
        adapter_path: the adapter directory (adapter_config.json, adapters.safetensors).
        save_path: the output directory (must not exist unless ``force``).
        dequantize: write the fused modules and every other quantized module
            in full precision and drop the quantization from config.json
            (what ``mlx_lm fuse --dequantize`` does).
        policy: ``stock`` | ``preserve`` | ``stochastic`` | ``calibrated`` (see
            the module doc).
        seed: the ``stochastic`` policy's seed.
        report: also write the fidelity report (JSON) to this file.
        requant_bits, requant_group_size: re-quantize the fused modules at this
            precision (recorded per module in config.json's quantization).
        only: fuse only the modules whose path matches this regular
            expression (``re.search``); the others stay byte-identical.
        layers, modules: fuse only the modules of these transformer blocks
            (``early`` / ``middle`` / ``late`` / ``all``, ``"4-7"``, ``[0, 2]``)
            and matching one of these globs (:mod:`pyfuse.fuse.layers`);
            combined with ``only`` into the one filter the report records.
        link_unchanged: hard-link (or copy when linking fails) the shards that
            hold no fused tensor instead of copying them. The output then
            shares those files with the input.
        force: replace an existing ``save_path`` (and ``report``).
        on_range_overflow: under ``preserve`` / ``stochastic`` /
            ``calibrated``, what a group
            whose fused values leave its grid's range gets: ``refit`` (MLX's
            affine rule on its fused values: that group loses its scale and
            bias), ``clip`` (its codes clamped to ``[0, 2**bits - 1]``, scale
            and bias kept) or ``error`` (UserError naming the module). The
            report counts those groups per module.
        export_gguf, gguf_path: also write ``save_path / gguf_path`` with
            mlx-lm's GGUF export (llama, mixtral, mistral; full precision:
            with ``dequantize`` for a quantized model), as ``mlx_lm fuse``.
        upload_repo: then upload ``save_path`` to this Hugging Face repo with
            mlx-lm's ``upload_to_hub`` (UserError when it fails; the fused
            model stays).
        trust_remote_code: accept a model whose config.json names a custom
            architecture module (``model_file``), which ``mlx_lm fuse`` refuses
            without it; pyfuse itself runs none of that code.
        lenient: fuse adapter modules that ``mlx_lm.load(model,
            adapter_path=...)`` refuses (outside the config's ``num_layers`` /
            ``keys``; DoRA on a SwitchLinear without ``m``) instead of refusing
            the adapter; they are listed in the report's ``incompatible`` and
            a warning.
        report_sample: measure the report's figures on about this many
            weights of each larger tensor (evenly spaced output rows of every
            expert; norms are scaled to whole-tensor estimates, ``sampled`` in
            the report says which share was measured); None: every weight.
        calibration: mlx-lm data (``.jsonl`` or a data directory: ``text``,
            ``messages`` or ``prompt``/``completion`` rows) that the base
            model is run over to get ``X^T X`` of each fused module's inputs
            (per expert): needed by ``policy="calibrated"``; under the other
            policies it only adds the report's output-space figures. Every
            4th sequence is held out for those figures.
        calibration_min_tokens: experts with fewer calibration tokens are
            rounded plainly (``H = 0``); default: the module's number of
            inputs (at least :data:`pyfuse.calibration.MIN_EXPERT_TOKENS`).
        damp: the calibrated policy's dampening (share of mean diag H).
        agreement_prompts: mlx-lm data (as ``calibration``) on which the
            fused model is compared with the base model with the adapter
            applied unfused (mlx-lm's loader): the report's summary gets
            ``kl_to_unfused`` (mean per-token KL(unfused || fused) of the
            next-token distributions), ``top1_agreement`` and ``agreement``
            (:mod:`pyfuse.fuse.agreement`). By default, with
            ``calibration``: its held-out sequences.
        agreement: False: no whole-model comparison (not even with
            ``calibration``).
        hessians: ``X^T X`` already collected for the fused modules
            (:func:`pyfuse.calibration.collect_hessians` over
            :func:`calibration_modules`), used instead of a calibration pass
            (``calibration``, if given, is then only the source of the
            agreement's held-out sequences); under every
            policy they add the per-module output error and retention on
            their held-out tokens to the report (``--compare-policies``
            calibrates once for all its fuses).
        refine_headroom: with ``requant_bits`` under a grid-keeping policy,
            the refined base's codes are moved off 0 where that is exact
            (:func:`pyfuse.refine_grid` ``headroom``), so a delta lowering a
            code-0 weight needs no re-fit or clamp.

    Returns:
        a :class:`FuseResult` (``report`` is ``{"tensors": [...], "summary": {...}}``).

    Raises:
        UserError: bad input (paths, shapes, corrupt files, unsupported options);
            nothing is left behind.
    """
    started = time.monotonic()
    model_path = resolve_model_dir(model)  # a Hub repo id: its cached snapshot, as mlx-lm
    adapter_path, save_path = Path(adapter_path), Path(save_path)
    _check_options(policy, seed, requant_bits, requant_group_size, dequantize)
    _check_range_overflow(on_range_overflow, policy)
    _check_calibration(policy if hessians is None else None, calibration, dequantize)
    mdir = None
    try:
        with together("reading the model and the adapter"):  # under mlx.launch: every rank, agreed
            mdir = ModelDir(model_path)
            only, plan, agree_data = _prepared(mdir, model_path, adapter_path, save_path, report, force,
                                               export_gguf, trust_remote_code, only, layers, modules, policy,
                                               dequantize, requant_bits, requant_group_size, lenient,
                                               calibration, agreement_prompts, agreement)
            if hessians is None:
                hessians = _calibrate(model_path, calibration, plan, calibration_min_tokens)
        records: list[dict] = []
        run = _job_runner(mdir, plan, records, policy=policy, seed=seed, report_sample=report_sample,
                          on_range_overflow=on_range_overflow, hessians=hessians, damp=damp,
                          headroom=refine_headroom)
        if not writes():  # a rank other than 0: its share of the modules; rank 0 writes and reports
            rep = ranks.follow_fuse(ranks.job_order(mdir, plan), ranks.with_record(run, records))
            return FuseResult(save_path=save_path, report=rep, fused=[j.path for j in plan.jobs if j.fuses])
        with ranks.leading(mdir, plan, run, records) as (compute, finish):
            written = _write(mdir, plan, save_path, compute, link_unchanged, force)
            rep = reporting.build_report(plan, records, policy=policy, seed=seed, dequantize=dequantize,
                                         requant_bits=requant_bits, requant_group_size=requant_group_size,
                                         only=only, written=written, seconds=time.monotonic() - started,
                                         on_range_overflow=on_range_overflow)
            _add_agreement(rep, model_path, adapter_path, save_path, agree_data)
            finish(rep)
    finally:
        if mdir is not None:
            mdir.close()
    report_path = None if report is None else _write_report(Path(report), rep, save_path, force)
    gguf = export.export_gguf(save_path, gguf_path) if export_gguf else None
    if upload_repo is not None:
        export.upload(save_path, upload_repo)
    return FuseResult(save_path=save_path, report=rep, report_path=report_path,
                      fused=[j.path for j in plan.jobs if j.fuses], gguf_path=gguf)


def _prepared(mdir, model_path, adapter_path, save_path, report, force, export_gguf, trust_remote_code, only,
              layers, modules, policy, dequantize, requant_bits, requant_group_size, lenient, calibration,
              agreement_prompts, agreement):
    """Every check before any work; ``(only, plan, the agreement data)``."""
    _check_remote_code(mdir, trust_remote_code)
    if export_gguf:
        export.check_gguf(mdir, dequantize)
    only = _layer_selection(mdir, only, layers, modules)
    only_re = _compile_only(only)
    adapter = read_adapter(adapter_path)
    check_paths({"--model": model_path, "--adapter-path": adapter_path, "--agreement-prompts": agreement_prompts},
                {"--save-path": save_path, "--report": report}, nested_ok=[("--report", "--save-path")])
    if writes():  # the other ranks of a launch write nothing (and may not see rank 0's disk)
        _check_save_path(save_path, force)
        if report is not None:
            _check_report_path(Path(report), save_path, force)
    plan = make_plan(mdir, adapter, policy=policy, dequantize=dequantize, requant_bits=requant_bits,
                     requant_group_size=requant_group_size, only_re=only_re, lenient=lenient)
    return only, plan, agreement_data(model_path, prompts=agreement_prompts, calibration=calibration,
                                      enabled=agreement)


def _write(mdir, plan, save_path, compute, link_unchanged, force) -> dict:
    with sigterm_as_interrupt():
        try:
            return write_model(mdir, plan, save_path, compute=compute, link_unchanged=link_unchanged, force=force)
        except OSError as err:  # disk full, a file vanishing...: nothing was left behind
            where = f" ({err.filename})" if getattr(err, "filename", None) else ""
            raise UserError(f"writing {save_path} failed: {err.strerror or err}{where}; "
                            "nothing was written") from None


def _job_runner(mdir: ModelDir, plan: Plan, records: list[dict], *, policy: str, seed: int,
                report_sample: int | None, on_range_overflow: str = DEFAULT_RANGE_OVERFLOW,
                hessians: dict | None = None, damp: float | None = None, headroom: bool = False):
    """The writer's ``compute`` callback: one job's new tensors; the record of
    each fused module is appended to ``records`` (in the order written)."""

    def run(job: Job):
        mh = (hessians or {}).get(job.path)
        fused = compute.run_job(mdir, job, plan, policy=policy, seed=seed, on_range_overflow=on_range_overflow,
                                hessian=None if mh is None else mh.fit, damp=damp, headroom=headroom)
        for name, arr in fused.tensors.items():  # an overflow must not reach the output
            check_finite(arr, f"fusing {job.path}: {name}", "; the adapter's delta overflows the model's dtype")
        if job.fuses:
            rec = reporting.record(job, fused, scale=plan.scale, sample=report_sample)
            if mh is not None:
                rec.update(reporting.calibration_record(job, fused, mh, scale=plan.scale))
            records.append(rec)
        return fused.tensors

    return run


def _add_agreement(rep: dict, model_path, adapter_path, save_path: Path, data) -> None:
    """The whole-model figures (:mod:`pyfuse.fuse.agreement`) into the report's summary."""
    fields, warnings = measure_fused(model_path, adapter_path, save_path, data)
    if fields.get("agreement") and rep["summary"]["incompatible"]:
        warnings.append(f"kl_to_unfused / top1_agreement compare with the adapter as mlx-lm's loader applies it, "
                        f"without the {len(rep['summary']['incompatible'])} module(s) it refuses (--lenient)")
    rep["summary"].update(fields)
    rep["summary"]["warnings"] += warnings


def _write_report(path: Path, rep: dict, save_path: Path, force: bool) -> Path:
    try:
        publish_text(path, json.dumps(rep, indent=2) + "\n", force, "--report")
    except OSError as err:
        raise UserError(f"cannot write the report to {path} ({err.strerror}); "
                        f"the fused model is in {save_path}") from None
    return path


# -- checks before any work ---------------------------------------------------------


def _check_options(policy, seed, requant_bits, requant_group_size, dequantize):
    if policy not in POLICIES:
        raise UserError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"--seed must be an integer in [0, 2**32), got {seed!r}")
    if requant_bits is not None and requant_bits not in SUPPORTED_BITS:
        raise UserError(f"--requant-bits {requant_bits} is not supported "
                        f"({', '.join(map(str, SUPPORTED_BITS))})")
    if requant_group_size is not None and requant_group_size not in SUPPORTED_GROUP_SIZES:
        raise UserError(f"--requant-group-size {requant_group_size} is not supported "
                        f"({', '.join(map(str, SUPPORTED_GROUP_SIZES))})")
    if dequantize and (requant_bits is not None or requant_group_size is not None):
        raise UserError("--dequantize writes full precision: it cannot be combined with "
                        "--requant-bits/--requant-group-size")


def _check_remote_code(mdir: ModelDir, trust_remote_code: bool) -> None:
    model_file = mdir.config.get("model_file")
    if model_file is not None and not trust_remote_code:
        raise UserError(f"the model at {mdir.path} needs a custom module ({model_file!r}) to build its "
                        "architecture, which mlx_lm fuse refuses without --trust-remote-code (pyfuse runs "
                        "none of it); pass --trust-remote-code if you trust this model")


def _check_range_overflow(on_range_overflow, policy):
    if on_range_overflow not in RANGE_OVERFLOW_ACTIONS:
        raise UserError(f"--on-range-overflow must be one of {', '.join(RANGE_OVERFLOW_ACTIONS)}, "
                        f"got {on_range_overflow!r}")
    if on_range_overflow != DEFAULT_RANGE_OVERFLOW and policy not in RANGE_OVERFLOW_POLICIES:
        raise UserError(f"--on-range-overflow {on_range_overflow} applies to the policies that keep the "
                        f"grid ({', '.join(RANGE_OVERFLOW_POLICIES)}), not to --policy {policy}")


def _layer_selection(mdir: ModelDir, only, layers, modules) -> str | None:
    """``only`` narrowed to ``layers`` / ``modules`` (:mod:`pyfuse.fuse.layers`)."""
    if layers is None and not modules:
        return only
    from ..io.names import layer_prefix
    from .layers import selection_only

    prefix, found = layer_prefix(n[: -len(".weight")] for n in mdir.tensors if n.endswith(".weight"))
    n_layers = mdir.num_hidden_layers or (max(found) + 1 if found else None)
    return selection_only(only, layers=layers, modules=modules, prefix=prefix, n_layers=n_layers)


def _check_calibration(policy, calibration, dequantize):
    if policy == "calibrated" and calibration is None:
        raise UserError("--policy calibrated needs --calibration DATA.jsonl (the inputs whose X^T X "
                        "steers the rounding)")
    if calibration is not None and not Path(calibration).exists():
        raise UserError(f"--calibration {calibration} does not exist")


def _calibrated_paths(plan: Plan) -> list[str]:
    """The modules a calibration pass records: every fused quantized module kept quantized."""
    return [j.path for j in plan.jobs if j.fuses and j.quantized and j.q_out is not None]


def calibration_modules(model, adapter_path, *, only: str | None = None, layers=None,
                        modules: list[str] | None = None, dequantize: bool = False) -> list[str]:
    """The modules whose ``X^T X`` :func:`fuse_model` collects with
    ``calibration`` for this adapter and selection (the fuse policy and
    re-quantization do not change them), so one collection can serve every
    fuse of the same selection through ``hessians``."""
    with ModelDir(resolve_model_dir(model)) as mdir:
        only_re = _compile_only(_layer_selection(mdir, only, layers, modules))
        plan = make_plan(mdir, read_adapter(Path(adapter_path)), policy="stock", dequantize=dequantize,
                         requant_bits=None, requant_group_size=None, only_re=only_re, lenient=False)
        return _calibrated_paths(plan)


def _calibrate(model_path: Path, calibration, plan: Plan, min_tokens) -> dict:
    """``X^T X`` per fused quantized module (one pass of the base model)."""
    if calibration is None:
        return {}
    from ..calibration import collect_hessians

    paths = _calibrated_paths(plan)
    if not paths:
        return {}
    return collect_hessians(model_path, calibration, paths, min_tokens=min_tokens)


def _compile_only(only: str | None) -> re.Pattern | None:
    if only is None:
        return None
    try:
        return re.compile(only)
    except re.error as err:
        raise UserError(f"--only {only!r} is not a valid regular expression ({err})") from None


def _check_save_path(save_path: Path, force: bool) -> None:
    dst = save_path.resolve()
    if save_path.exists() or save_path.is_symlink():
        if not force:
            raise UserError(f"--save-path {save_path} already exists; pass --force to replace it")
        if not save_path.is_dir() or save_path.is_symlink():
            raise UserError(f"--save-path {save_path} exists and is not a directory; not replacing it")
    parent = dst.parent
    if not parent.is_dir():
        raise UserError(f"the parent of --save-path, {parent}, is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {parent}")


def _check_report_path(report: Path, save_path: Path, force: bool) -> None:
    target = report.resolve()
    if target.is_relative_to(save_path.resolve()):
        if target.parent != save_path.resolve():
            raise UserError(f"--report {report}: only directly inside --save-path, or elsewhere")
        return
    if not target.parent.is_dir():
        raise UserError(f"--report {report}: directory {target.parent} does not exist")
    if target.is_dir():
        raise UserError(f"--report {report} is a directory")
    check_file_destination(report, force, "--report")


__all__ = ["FuseResult", "calibration_modules", "fuse_model"]
