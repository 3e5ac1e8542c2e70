"""``pyfuse.fuse_model``: a streaming, drop-in replacement for ``mlx_lm fuse``.

What it does, in order:

1. Reads and checks everything before writing anything: the model directory
   (``config.json`` with ``quantization`` / ``quantization_config`` and its
   per-module overrides, the safetensors shards and their index, whose
   headers are validated, so truncated or corrupt files are refused up
   front) and the adapter directory (:mod:`pyfuse.io.adapter_dir`).
2. Maps the adapter's tensors onto base tensors by name: a module is fused
   only when the adapter has weights for it (``lora_a`` and ``lora_b``);
   the modules the adapter config names without weights are reported (and
   left byte-identical, where ``mlx_lm fuse`` re-quantizes them with a zero
   delta, which changes a few per cent of their weights).
3. Writes the output into ``<parent>/.<name>.pyfuse-tmp-<pid>-XXXX`` tensor
   by tensor (untouched tensors are copied byte for byte, shards without
   touched tensors are copied or hard-linked whole), fsyncs, and renames it
   to ``save_path`` at the end. Any error, Ctrl-C or SIGTERM removes the
   temporary directory; a SIGKILLed run leaves a hidden temporary directory
   that the next run removes.
4. Reports, per fused tensor, what really changed (:mod:`pyfuse.kernel.fidelity`).

Policies (``policy``): ``stock`` is ``mlx_lm fuse``'s algorithm (bit-identical
per fused tensor for float32 adapters, which is what ``mlx_lm lora`` writes);
``preserve`` keeps each group's scale and bias (a zero adapter gives a
byte-identical model); ``stochastic`` rounds stochastically (the delta
survives in expectation). See :func:`pyfuse.fuse_requant`.

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

How each fused module is computed:

* affine, same precision, LoRA (the common case): :func:`pyfuse.fuse_requant`
  with the chosen policy (one call on the whole tensor with the native
  kernel; a few experts / rows at a time on the reference path);
* stock DoRA, the mx modes (mxfp4, nvfp4, mxfp8: stock and --dequantize
  only), ``--requant-bits`` under stock and ``--dequantize``: mlx-lm's own
  MLX ops (dequantize, add, [DoRA rescale], quantize), chunked;
* ``--requant-bits`` under preserve / stochastic: the base is first moved to
  the new grid (a zero-delta stock re-quantization), then fused with the
  policy on that grid;
* float (unquantized) weights: ``W + delta`` in the weight dtype.

The report's figures come from :func:`pyfuse.kernel.fidelity.tensor_fidelity` (or,
for DoRA, other precisions and float outputs, the same figures against the
exact fused target); tensors of more than ``report_sample`` weights are
measured on evenly spaced output rows of every expert (``sampled`` < 1),
because MLX's CPU dequantize costs ~25 ns per weight.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .. import progress
from ..io.adapter_dir import Adapter, AdapterModule, read_adapter
from ..io.names import natural_key
from .mapping import configured_modules, kernel_factors, match_module
from ..errors import UserError
from ..io.files import TMP_MARK, pid_alive, sigterm_as_interrupt
from ..kernel.fidelity import retention_and_noise, tensor_fidelity
from ..kernel.ops import fuse_requant, native_available
from ..options import POLICIES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ..kernel.reference import delta_f32
from ..io.model_dir import (CONFIG_FILE, FLOAT_DTYPES, INDEX_FILE, MX_MODES, ModelDir,
                               QParams)
from ..io.safetensors import (SafetensorsError, SafetensorsFile, SafetensorsWriter, TensorInfo,
                             dtype_of, nbytes_of)

# Work on this many weight elements at a time (rows or experts) so that the
# float32 intermediates of a 128 x 2048 x 512 expert tensor stay ~16 MB each.
CHUNK_ELEMENTS = 1 << 22
# The fidelity figures hold ~80 bytes of temporaries per weight: smaller chunks.
FIDELITY_CHUNK_ELEMENTS = 1 << 20
# Tensors with more weights than this are measured on a sample of their rows
# (``sampled`` < 1 in the report); ``report_sample=None`` measures everything.
REPORT_SAMPLE_ELEMENTS = 1 << 21
# Retention below this is "mostly erased"; below PARTLY "partly erased".
LOW_RETENTION = 0.5
PARTLY_RETENTION = 0.8
_MX_DTYPE = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


@dataclass
class FuseResult:
    """What :func:`fuse_model` wrote and measured."""

    save_path: Path
    report: dict
    report_path: Path | None = None
    fused: list[str] = field(default_factory=list)  # module paths

    @property
    def summary(self) -> dict:
        return self.report["summary"]

    @property
    def warnings(self) -> list[str]:
        return self.report["summary"]["warnings"]


# -- the plan -----------------------------------------------------------------------


@dataclass
class _Job:
    """One module whose tensors are recomputed (fused or dequantized)."""

    path: str
    kind: str  # linear | switch | embedding | dequantize (untouched, --dequantize)
    quantized: bool
    q_in: QParams | None
    q_out: QParams | None  # None: float output
    dtype: str  # weight dtype (float weights) or scales dtype (quantized)
    mod: AdapterModule | None = None
    a: mx.array | None = None
    b: mx.array | None = None
    magnitude: mx.array | None = None
    in_dims: int = 0
    out: dict[str, tuple[str, tuple]] = field(default_factory=dict)  # name -> (dtype, shape)
    inputs: list[str] = field(default_factory=list)

    @property
    def fuses(self) -> bool:
        return self.kind != "dequantize"


def _plan_outputs(job: _Job, model: ModelDir) -> None:
    w = model.tensors[f"{job.path}.weight"]
    lead = w.shape[:-1]
    job.inputs = [f"{job.path}.weight"]
    if job.quantized:
        job.inputs.append(f"{job.path}.scales")
        if f"{job.path}.biases" in model.tensors:
            job.inputs.append(f"{job.path}.biases")
    if job.q_out is None:
        job.out[f"{job.path}.weight"] = (job.dtype, (*lead, job.in_dims))
        return
    q = job.q_out
    sdt = "U8" if q.mode in MX_MODES else job.dtype
    job.out[f"{job.path}.weight"] = ("U32", (*lead, job.in_dims * q.bits // 32))
    job.out[f"{job.path}.scales"] = (sdt, (*lead, job.in_dims // q.group_size))
    if q.mode == "affine":
        job.out[f"{job.path}.biases"] = (sdt, (*lead, job.in_dims // q.group_size))


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


def _check_save_path(save_path: Path, model_path: Path, adapter_path: Path, force: bool) -> None:
    dst = save_path.resolve()
    for what, src in (("model", model_path.resolve()), ("adapter", adapter_path.resolve())):
        if dst == src or src.is_relative_to(dst):
            raise UserError(f"--save-path {save_path} would overwrite the {what} directory {src}")
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


def _check_report_path(report: Path, save_path: Path) -> None:
    target = report.resolve()
    if target.is_relative_to(save_path.resolve()):
        if target.parent != save_path.resolve():
            raise UserError(f"--report {report}: only directly inside --save-path, or elsewhere")
        return
    if not target.parent.is_dir():
        raise UserError(f"--report {report}: directory {target.parent} does not exist")
    if target.is_dir():
        raise UserError(f"--report {report} is a directory")


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
    link_unchanged: bool = False,
    force: bool = False,
    report_sample: int | None = REPORT_SAMPLE_ELEMENTS,
) -> FuseResult:
    """Fuse an mlx-lm LoRA/DoRA adapter into an mlx-lm model directory.

    Args:
        model: the model directory (quantized or not).
        adapter_path: the adapter directory (adapter_config.json, adapters.safetensors).
        save_path: the output directory (must not exist unless ``force``).
        dequantize: write the fused modules and every other quantized module
            in full precision and drop the quantization from config.json
            (what ``mlx_lm fuse --dequantize`` does).
        policy: ``stock`` | ``preserve`` | ``stochastic`` (see the module doc).
        seed: the ``stochastic`` policy's seed.
        report: also write the fidelity report (JSON) to this file.
        requant_bits, requant_group_size: re-quantize the fused modules at this
            precision (recorded per module in config.json's quantization).
        only: fuse only the modules whose path matches this regular
            expression (``re.search``); the others stay byte-identical.
        link_unchanged: hard-link (or copy when linking fails) the shards that
            hold no fused tensor instead of copying them. The output then
            shares those files with the input.
        force: replace an existing ``save_path``.
        report_sample: measure the report's figures on about this many
            weights of each larger tensor (evenly spaced output rows of every
            expert; norms are scaled to whole-tensor estimates, ``sampled`` in
            the report says which share was measured); None: every weight.

    Returns:
        a :class:`FuseResult` (``report`` is ``{"tensors": [...], "summary": {...}}``).

    Raises:
        UserError: bad input (paths, shapes, corrupt files, unsupported options);
            nothing is left behind.
    """
    started = time.monotonic()
    model_path, adapter_path, save_path = Path(model), Path(adapter_path), Path(save_path)
    _check_options(policy, seed, requant_bits, requant_group_size, dequantize)
    only_re = None
    if only is not None:
        try:
            only_re = re.compile(only)
        except re.error as err:
            raise UserError(f"--only {only!r} is not a valid regular expression ({err})") from None

    mdir = ModelDir(model_path)
    try:
        adapter = read_adapter(adapter_path)
        _check_save_path(save_path, model_path, adapter_path, force)
        if report is not None:
            _check_report_path(Path(report), save_path)
        plan = _make_plan(mdir, adapter, policy=policy, dequantize=dequantize,
                          requant_bits=requant_bits, requant_group_size=requant_group_size,
                          only_re=only_re)
        plan.report_sample = report_sample
        with sigterm_as_interrupt():
            try:
                records, written = _execute(mdir, plan, save_path, policy=policy, seed=seed,
                                            dequantize=dequantize, link_unchanged=link_unchanged,
                                            force=force)
            except OSError as err:  # disk full, a file vanishing...: nothing was left behind
                where = f" ({err.filename})" if getattr(err, "filename", None) else ""
                raise UserError(f"writing {save_path} failed: {err.strerror or err}{where}; "
                                "nothing was written") from None
    finally:
        mdir.close()

    rep = _build_report(plan, records, policy=policy, seed=seed, dequantize=dequantize,
                        requant_bits=requant_bits, requant_group_size=requant_group_size,
                        only=only, written=written, seconds=time.monotonic() - started)
    report_path = None
    if report is not None:
        report_path = Path(report)
        try:
            report_path.write_text(json.dumps(rep, indent=2) + "\n")
        except OSError as err:
            raise UserError(f"cannot write the report to {report_path} ({err.strerror}); "
                            f"the fused model is in {save_path}") from None
    return FuseResult(save_path=save_path, report=rep, report_path=report_path,
                      fused=[j.path for j in plan.jobs if j.fuses])


@dataclass
class _Plan:
    jobs: list[_Job]
    configured_without_weights: list[str]
    zero_modules: list[str]  # lora_a without lora_b: a zero delta, nothing to fuse
    excluded_by_only: list[str]
    outside_config: list[str]
    config_changes: dict | None  # new config.json dict, or None to copy it
    is_dora: bool
    scale: float
    report_sample: int | None = REPORT_SAMPLE_ELEMENTS


def _make_plan(mdir: ModelDir, adapter: Adapter, *, policy, dequantize, requant_bits,
               requant_group_size, only_re) -> _Plan:
    tensors = mdir.tensors
    jobs: list[_Job] = []
    zero, excluded = [], []
    for path in sorted(adapter.modules, key=natural_key):
        mod = adapter.modules[path]
        weight = tensors.get(f"{path}.weight")
        if weight is None:
            raise UserError(f"adapter does not fit the model: it has weights for {path}, "
                            "which the model does not have")
        if not mod.has_delta and mod.magnitude is None:
            zero.append(path)
            continue
        if only_re is not None and not only_re.search(path):
            excluded.append(path)
            continue
        if not mod.has_delta:  # DoRA magnitude only: a zero delta of rank 1
            raise UserError(f"adapter has a DoRA magnitude but no lora_a/lora_b for {path}")
        match = match_module(mod, weight)
        quantized = f"{path}.scales" in tensors
        if quantized:
            _check_dora_sizing(mdir, adapter, path, match.in_dims)
            q_in = mdir.quant_params(path, match.in_dims)
            dtype = tensors[f"{path}.scales"].dtype
            if q_in.mode != "affine":
                dtype = "BF16"  # mx modes dequantize to bfloat16 (as in mlx-lm)
                if policy != "stock":
                    raise UserError(f"{path} is quantized with mode {q_in.mode}: --policy {policy} "
                                    "works on affine quantization only (use --policy stock or "
                                    "--dequantize)")
        else:
            q_in = None
            dtype = weight.dtype
            if dtype not in FLOAT_DTYPES:
                raise UserError(f"{path}.weight has dtype {dtype}: not a float weight")
            if weight.shape[-1] != match.in_dims:
                raise UserError(f"adapter does not fit the model: {path} takes {match.in_dims} "
                                f"inputs but its weight is {list(weight.shape)}")
        if match.kind == "embedding" and mod.magnitude is not None and quantized:
            raise UserError(f"{path}: DoRA on a quantized embedding is not supported (mlx-lm "
                            "cannot fuse it either)")
        if quantized and not dequantize:
            if requant_bits is not None or requant_group_size is not None:
                q_out = QParams(requant_bits or q_in.bits,
                                requant_group_size or (q_in.group_size if q_in.mode == "affine" else 64))
                if match.in_dims % q_out.group_size:
                    raise UserError(f"{path} has {match.in_dims} inputs, not a multiple of "
                                    f"--requant-group-size {q_out.group_size}")
            else:
                q_out = q_in
        else:
            q_out = None
        a, b = kernel_factors(mod, match.kind)
        job = _Job(path=path, kind=match.kind, quantized=quantized, q_in=q_in, q_out=q_out,
                   dtype=dtype, mod=mod, a=a, b=b, magnitude=mod.magnitude, in_dims=match.in_dims)
        _plan_outputs(job, mdir)
        jobs.append(job)

    fused = {j.path for j in jobs}
    if dequantize:  # every other quantized module is written in full precision too
        for name in tensors:
            if not name.endswith(".scales"):
                continue
            path = name[: -len(".scales")]
            if path in fused or f"{path}.weight" not in tensors:
                continue
            q = mdir.quant_params(path)
            dtype = "BF16" if q.mode != "affine" else tensors[name].dtype
            w = tensors[f"{path}.weight"]
            job = _Job(path=path, kind="dequantize", quantized=True, q_in=q, q_out=None, dtype=dtype,
                       in_dims=w.shape[-1] * 32 // q.bits)
            _plan_outputs(job, mdir)
            jobs.append(job)

    num_hidden = mdir.config.get("num_hidden_layers")
    if num_hidden is None and isinstance(mdir.config.get("text_config"), dict):
        num_hidden = mdir.config["text_config"].get("num_hidden_layers")
    configured = configured_modules(adapter, tensors, num_hidden if isinstance(num_hidden, int) else None)
    configured_set = set(configured)
    with_weights = {p for p, m in adapter.modules.items() if m.has_delta or m.magnitude is not None}
    without = [p for p in configured if p not in with_weights]
    outside = [p for p in sorted(with_weights, key=natural_key) if p not in configured_set]

    config_changes = None
    if dequantize and mdir.quant.present:
        config_changes = {k: v for k, v in mdir.config.items()
                          if k not in ("quantization", "quantization_config")}
    elif not dequantize:
        changed = [j for j in jobs if j.fuses and j.q_out is not None and j.q_out != j.q_in]
        if changed:
            config_changes = json.loads(mdir.config_raw)
            keys = [k for k in ("quantization", "quantization_config")
                    if isinstance(config_changes.get(k), dict) and "bits" in config_changes[k]]
            for k in keys:
                for j in changed:
                    entry = {"group_size": j.q_out.group_size, "bits": j.q_out.bits}
                    if "mode" in config_changes[k] or j.q_in.mode != "affine":
                        entry["mode"] = j.q_out.mode
                    config_changes[k][j.path] = entry
    return _Plan(jobs=jobs, configured_without_weights=without, zero_modules=zero,
                 excluded_by_only=excluded, outside_config=outside, config_changes=config_changes,
                 is_dora=adapter.is_dora, scale=adapter.scale)


def _check_dora_sizing(mdir: ModelDir, adapter: Adapter, path: str, in_dims: int) -> None:
    """mlx-lm's DoRALinear sizes quantized layers with ``input_dims *= 32 //
    bits``, wrong for 3, 5 and 6 bits: say so instead of a bare shape error."""
    if not adapter.is_dora:
        return
    packed = mdir.tensors[f"{path}.weight"].shape[-1]
    if (packed * 32) % in_dims == 0:
        return
    for bits in (3, 5, 6):
        if in_dims == packed * (32 // bits):
            raise UserError(f"adapter does not fit the model: the DoRA adapter's {path} takes "
                            f"{in_dims} inputs but the {bits}-bit layer has {packed * 32 // bits}: "
                            f"mlx-lm's DoRALinear mis-sizes {bits}-bit layers (input_dims *= 32 // "
                            "bits), so this adapter cannot be fused (mlx_lm fuse fails on it too)")


# -- execution --------------------------------------------------------------------------




def _remove_stale_temps(parent: Path, name: str) -> None:
    """Remove temporary outputs of runs that were killed (their pid is gone)."""
    prefix = f".{name}{TMP_MARK}"
    for entry in parent.glob(f"{prefix}*"):
        rest = entry.name[len(prefix):]
        pid = rest.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file(src: Path, dst: Path, link: bool = False) -> str:
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass
    shutil.copyfile(src, dst)
    _fsync_path(dst)
    return "copied"


def _execute(mdir: ModelDir, plan: _Plan, save_path: Path, *, policy, seed, dequantize,
             link_unchanged, force):
    save_path = Path(os.path.abspath(save_path))
    parent, name = save_path.parent, save_path.name
    _remove_stale_temps(parent, name)
    tmp = parent / f".{name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        records, written = _write_all(mdir, plan, tmp, save_path.resolve(), policy=policy, seed=seed,
                                      link_unchanged=link_unchanged)
        _fsync_path(tmp)
        if save_path.exists():  # --force (checked before): swap, then delete the old one
            old = parent / f".{name}{TMP_MARK}{os.getpid()}-old-{secrets.token_hex(4)}"
            os.rename(save_path, old)
            os.rename(tmp, save_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, save_path)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return records, written


def _write_all(mdir: ModelDir, plan: _Plan, out: Path, final: Path, *, policy, seed, link_unchanged):
    jobs_by_tensor: dict[str, _Job] = {}
    for job in plan.jobs:
        for t in job.inputs:
            jobs_by_tensor[t] = job
    written = {"shards": {}, "total_size": 0, "added": {}}
    records: list[dict] = []

    # every file other than the shards, the index and config.json: as it is
    shard_names = set(mdir.shards)
    special = shard_names | {INDEX_FILE, CONFIG_FILE}
    for entry in (mdir.path / n for n in mdir.entries):
        if entry.name in special or TMP_MARK in entry.name or entry.resolve() == final:
            continue
        target = out / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target)
        elif entry.is_file():
            _copy_file(entry, target)

    if plan.config_changes is None:
        (out / CONFIG_FILE).write_bytes(mdir.config_raw)
    else:
        (out / CONFIG_FILE).write_text(json.dumps(plan.config_changes, indent=4) + "\n")
    _fsync_path(out / CONFIG_FILE)

    total = sum(info.nbytes for info in mdir.tensors.values())
    pending: dict[str, mx.array] = {}
    with progress.progress_bar() as bar:
        task = bar.add_task("pyfuse fuse: MiB", total=max(1, total) / 2**20)
        for shard_name, shard in mdir.shards.items():
            names = list(shard.tensors)
            touched = [t for t in names if t in jobs_by_tensor]
            if not touched:
                how = _copy_file(shard.path, out / shard_name, link=link_unchanged)
                written["shards"][shard_name] = how
                written["total_size"] += sum(shard.tensors[t].nbytes for t in names)
                bar.advance(task, sum(shard.tensors[t].nbytes for t in names) / 2**20)
                continue
            # (output name, dtype, shape, job or None to copy, input size for the bar);
            # a job's new tensors (e.g. biases when mxfp4 becomes affine) follow its weight
            entries = []
            for t in names:
                job = jobs_by_tensor.get(t)
                size = shard.tensors[t].nbytes
                if job is None:
                    info = shard.tensors[t]
                    entries.append((t, info.dtype, info.shape, None, size))
                    continue
                if t in job.out:
                    entries.append((t, *job.out[t], job, size))
                    size = 0
                if t == f"{job.path}.weight":
                    for extra in job.out:
                        if extra not in job.inputs:
                            entries.append((extra, *job.out[extra], job, 0))
                            written["added"][extra] = shard_name
                if size:  # a dropped input (--dequantize: scales, biases)
                    entries.append((None, None, None, None, size))
            layout = [(t, d, shp) for t, d, shp, _, _ in entries if t is not None]
            same = [t for t, *_ in layout] == names and all(
                shard.tensors[t].dtype == d and shard.tensors[t].shape == tuple(shp) for t, d, shp in layout)
            with SafetensorsWriter(out / shard_name, layout, metadata=shard.metadata,
                                   header_bytes=shard.header_bytes if same else None) as writer:
                for t, _, _, job, size in entries:
                    if t is not None and job is None:
                        writer.copy_from(shard, t)
                    elif t is not None:
                        if t not in pending:
                            results, record = _run_job(mdir, job, plan, policy=policy, seed=seed)
                            pending.update(results)
                            if record is not None:
                                records.append(record)
                        writer.write(t, pending.pop(t))
                    bar.advance(task, size / 2**20)
            entries = layout
            written["shards"][shard_name] = "written"
            written["total_size"] += sum(nbytes_of(d, s) for _, d, s in entries)

    if mdir.index is not None:
        changed = any(j.out.keys() != set(j.inputs) or
                      any(mdir.tensors[t].shape != tuple(s) or mdir.tensors[t].dtype != d
                          for t, (d, s) in j.out.items() if t in mdir.tensors)
                      for j in plan.jobs)
        if not changed:
            (out / INDEX_FILE).write_bytes(mdir.index_raw)
        else:
            index = json.loads(mdir.index_raw)
            dropped = {t for j in plan.jobs for t in j.inputs if t not in j.out}
            weight_map = {k: v for k, v in index["weight_map"].items() if k not in dropped}
            weight_map.update(written["added"])
            index["weight_map"] = dict(sorted(weight_map.items()))
            meta = index.setdefault("metadata", {})
            if isinstance(meta, dict):
                meta["total_size"] = written["total_size"]
            (out / INDEX_FILE).write_text(json.dumps(index, indent=4))
        _fsync_path(out / INDEX_FILE)
    return records, written


# -- one module ---------------------------------------------------------------------------


def _row_chunks(lead: tuple, in_dims: int, stochastic: bool, elements: int | None = None):
    """Slices along the first axis (experts, or rows of a 2-D weight) holding
    about ``elements`` (CHUNK_ELEMENTS) weights. ``stochastic`` is never split:
    its hash is indexed by the element's position in the whole tensor."""
    n = lead[0]
    per_item = math.prod(lead[1:]) * in_dims if len(lead) > 1 else in_dims
    step = n if stochastic else max(1, (elements or CHUNK_ELEMENTS) // max(per_item, 1))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _kernel_is_native() -> bool:
    return native_available()


def _dequantize(w, s, bi, q: QParams):
    if q.mode == "affine":
        return mx.dequantize(w, s, bi, group_size=q.group_size, bits=q.bits)
    return mx.dequantize(w, s, None, group_size=q.group_size, bits=q.bits, mode=q.mode)


def _quantize(x, q: QParams):
    if q.mode == "affine":
        return tuple(mx.quantize(x, group_size=q.group_size, bits=q.bits))
    wq, sq = mx.quantize(x, group_size=q.group_size, bits=q.bits, mode=q.mode)
    return wq, sq


def _dora_rescale(fused: mx.array, magnitude: mx.array) -> mx.array:
    """mlx-lm's DoRA fuse: ``(m / ||fused row||) * fused`` (float32 for a
    float32 magnitude), cast back to the weight dtype by the caller."""
    norm_scale = magnitude / mx.linalg.norm(fused, axis=-1)
    return norm_scale[..., None] * fused


def _run_job(mdir: ModelDir, job: _Job, plan: _Plan, *, policy, seed):
    w = mdir.read(f"{job.path}.weight")
    if not job.quantized:
        return _run_float_job(job, w, plan)
    s = mdir.read(f"{job.path}.scales")
    bi = mdir.read(f"{job.path}.biases") if f"{job.path}.biases" in mdir.tensors else None
    q_in, q_out = job.q_in, job.q_out
    dt = _MX_DTYPE[job.dtype]
    magnitude = job.magnitude
    if job.fuses and plan.is_dora and magnitude is None and job.kind == "linear":
        # mlx-lm's DoRALinear starts from m = ||W|| (float32) when m is absent
        magnitude = mx.linalg.norm(_dequantize(w, s, bi, q_in).astype(mx.float32), axis=-1)
    lead = w.shape[:-1]
    # The kernel does every affine re-quantization except stock DoRA, which
    # goes through the MLX ops mlx-lm uses (bit-identical to mlx_lm fuse).
    use_kernel = (job.fuses and q_out is not None and q_in.mode == "affine" and q_out.mode == "affine"
                  and not (policy == "stock" and magnitude is not None))
    # The native kernel needs no float copies of the tensor: one call. MLX ops
    # (and the reference fallback) go a few experts / rows at a time.
    whole = use_kernel and (policy == "stochastic" or _kernel_is_native())
    chunks = _row_chunks(lead, job.in_dims, stochastic=whole)
    outs = []
    for rows in chunks:
        wc, sc = w[rows], s[rows]
        bc = bi[rows] if bi is not None else None
        mc = magnitude[rows] if magnitude is not None else None
        if not job.fuses:  # --dequantize of an untouched module
            res = (_dequantize(wc, sc, bc, q_in),)
        else:
            ac = job.a[rows] if job.kind == "switch" else job.a
            bc_ = job.b[rows]
            if use_kernel and q_out == q_in:
                res = fuse_requant(wc, sc, bc, ac, bc_, scale=plan.scale, group_size=q_in.group_size,
                                   bits=q_in.bits, policy=policy, seed=seed, magnitude=mc)
            elif use_kernel and policy != "stock":
                # another precision with a grid-keeping policy: move the base to
                # the new grid first (a zero-delta stock re-quantization), then fuse
                base = _quantize(_dequantize(wc, sc, bc, q_in), q_out)
                res = fuse_requant(*base, ac, bc_, scale=plan.scale, group_size=q_out.group_size,
                                   bits=q_out.bits, policy=policy, seed=seed, magnitude=mc)
            else:  # stock through MLX ops (mx modes, other precision, or --dequantize)
                fused = _dequantize(wc, sc, bc, q_in)
                fused = fused + delta_f32(ac, bc_, plan.scale).astype(fused.dtype)
                if mc is not None:
                    fused = _dora_rescale(fused, mc).astype(dt)
                res = (fused,) if q_out is None else _quantize(fused, q_out)
        mx.eval(*res)
        outs.append(res)
    parts = [mx.concatenate([o[i] for o in outs], axis=0) if len(outs) > 1 else outs[0][i]
             for i in range(len(outs[0]))]
    mx.eval(*parts)
    del outs
    names = [f"{job.path}.weight"]
    if q_out is not None:
        names.append(f"{job.path}.scales")
        if q_out.mode == "affine":
            names.append(f"{job.path}.biases")
    results = dict(zip(names, parts))
    for n, arr in results.items():
        d, shp = job.out[n]
        if dtype_of(arr) != d or tuple(arr.shape) != tuple(shp):
            raise RuntimeError(f"internal error: {n} computed as {dtype_of(arr)} {arr.shape}, "
                               f"planned {d} {shp}")
    record = None
    if job.fuses:
        record = _record(job, plan, (w, s, bi), results, magnitude, policy)
    return results, record


def _run_float_job(job: _Job, w: mx.array, plan: _Plan):
    """A float (unquantized) base weight: ``W + delta`` in its dtype, exactly
    as mlx-lm's fuse (policies do not apply: there is nothing to round)."""
    magnitude = job.magnitude
    if plan.is_dora and magnitude is None:
        magnitude = (mx.linalg.norm(w.astype(mx.float32), axis=-1) if job.kind == "linear"
                     else mx.linalg.norm(w, axis=-1))
    outs = []
    for rows in _row_chunks(w.shape[:-1], job.in_dims, stochastic=False):
        ac = job.a[rows] if job.kind == "switch" else job.a
        fused = w[rows] + delta_f32(ac, job.b[rows], plan.scale).astype(w.dtype)
        if magnitude is not None:
            fused = _dora_rescale(fused, magnitude[rows]).astype(w.dtype)
        mx.eval(fused)
        outs.append(fused)
    new = mx.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]
    mx.eval(new)
    results = {f"{job.path}.weight": new}
    return results, _record(job, plan, (w, None, None), results, magnitude, "stock")


# -- fidelity -------------------------------------------------------------------------------


def _record(job: _Job, plan: _Plan, old, results, magnitude, policy) -> dict:
    w0, s0, b0 = old
    q_in, q_out = job.q_in, job.q_out
    w1 = results[f"{job.path}.weight"]
    s1 = results.get(f"{job.path}.scales")
    b1 = results.get(f"{job.path}.biases")
    lead = tuple(w0.shape[:-1])
    rec = {
        "name": f"{job.path}.weight",
        "module": job.path,
        "kind": job.kind + (" (dora)" if magnitude is not None else ""),
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
    # Without the native sums, large tensors are measured on evenly spaced
    # output rows (of every expert): MLX's CPU dequantize makes the exact
    # figures cost ~100 ns per weight, ~15 s for one 128 x 2048 x 512 tensor.
    out_rows = lead[-1]
    per_row = math.prod(lead[:-1]) * job.in_dims
    fraction = 1.0
    sub, a, b = (w0, s0, b0, w1, s1, b1, magnitude), job.a, job.b
    simple = (job.quantized and q_out == q_in and q_in.mode == "affine" and magnitude is None
              and b0 is not None)
    # The native sums (pyfuse.kernel.fidelity) measure the common case exactly at
    # memory speed: no sampling there.
    exact_is_cheap = simple and native_available()
    if plan.report_sample and not exact_is_cheap and per_row * out_rows > plan.report_sample:
        k = max(1, min(out_rows, -(-plan.report_sample // per_row)))
        idx = mx.array([int((i + 0.5) * out_rows / k) for i in range(k)], dtype=mx.int32)
        sub = tuple(None if x is None else mx.take(x, idx, axis=len(lead) - 1)
                    for x in (w0, s0, b0, w1, s1, b1))
        sub += (None if magnitude is None else mx.take(magnitude, idx, axis=-1),)
        b = mx.take(job.b, idx, axis=job.b.ndim - 2)
        fraction = k / out_rows
    sw0, ss0, sb0, sw1, ss1, sb1, smag = sub
    if simple:
        fid = tensor_fidelity((sw0, ss0, sb0), (sw1, ss1, sb1), a, b, scale=plan.scale,
                              group_size=q_in.group_size, bits=q_in.bits,
                              chunk_elements=FIDELITY_CHUNK_ELEMENTS).as_dict()
    else:
        view = _Job(path=job.path, kind=job.kind, quantized=job.quantized, q_in=q_in, q_out=q_out,
                    dtype=job.dtype, a=a, b=b, in_dims=job.in_dims)
        fid = _general_fidelity(view, plan, (sw0, ss0, sb0), (sw1, ss1, sb1), smag)
    if fraction < 1.0:  # sums -> whole-tensor estimates; ratios stay as they are
        fid["delta_norm"] /= math.sqrt(fraction)
        fid["change_norm"] /= math.sqrt(fraction)
        if fid.get("groups_refit") is not None:
            fid["groups_refit"] = int(round(fid["groups_refit"] / fraction))
        if fid.get("groups") is not None:
            fid["groups"] = int(round(fid["groups"] / fraction))
    rec.update(fid)
    rec["sampled"] = fraction
    return rec


def _general_fidelity(job: _Job, plan: _Plan, old, new, magnitude) -> dict:
    """The report's figures when :func:`pyfuse.kernel.fidelity.tensor_fidelity` does
    not apply (float weights, --dequantize, another precision, mx modes,
    DoRA): the intended change is ``target - W`` with ``target`` the exact
    (float32) fused weight, ``W + delta``, DoRA-rescaled when there is a
    magnitude; codes and groups are compared only when the grid is the same."""
    w0, s0, b0 = old
    w1, s1, b1 = new
    q_in, q_out = job.q_in, job.q_out
    same_grid = job.quantized and q_out == q_in
    sums = dict(dd=0.0, cc=0.0, cd=0.0, ww=0.0, wchg=0, cchg=0, refit=0, max_abs=0.0)
    lead = w0.shape[:-1]
    for rows in _row_chunks(lead, job.in_dims, stochastic=False, elements=FIDELITY_CHUNK_ELEMENTS):
        if job.quantized:
            before = _dequantize(w0[rows], s0[rows], b0[rows] if b0 is not None else None,
                                 q_in).astype(mx.float32)
        else:
            before = w0[rows].astype(mx.float32)
        if q_out is not None:
            after = _dequantize(w1[rows], s1[rows], b1[rows] if b1 is not None else None,
                                q_out).astype(mx.float32)
        else:
            after = w1[rows].astype(mx.float32)
        ac = job.a[rows] if job.kind == "switch" else job.a
        target = before + delta_f32(ac, job.b[rows], plan.scale)
        if magnitude is not None:
            target = _dora_rescale(target, magnitude[rows].astype(mx.float32))
        d = target - before
        change = after - before
        parts = [(change * change).sum(), (before * before).sum(), (before != after).sum(),
                 mx.abs(change).max(), (d * d).sum(), (change * d).sum()]
        if same_grid:
            from ..kernel.reference import unpack_codes
            parts.append((unpack_codes(w0[rows], q_in.group_size, q_in.bits)
                          != unpack_codes(w1[rows], q_in.group_size, q_in.bits)).sum())
            sb = s0[rows] != s1[rows]
            if b0 is not None:
                sb = sb | (b0[rows] != b1[rows])
            parts.append(sb.sum())
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


# -- the report --------------------------------------------------------------------------------


def _build_report(plan: _Plan, records, *, policy, seed, dequantize, requant_bits,
                  requant_group_size, only, written, seconds) -> dict:
    dd = sum(r["delta_norm"] ** 2 for r in records)
    cd = sum((r["retention"] or 0.0) * r["delta_norm"] ** 2 for r in records)
    resid = sum(((r["noise"] or 0.0) * r["delta_norm"]) ** 2 for r in records)
    # the residual sums add over tensors (each against its own retention)
    retention = cd / dd if dd > 0 else None
    noise = math.sqrt(resid) / math.sqrt(dd) if dd > 0 else None
    with_ret = [r for r in records if r["retention"] is not None]
    worst = min(with_ret, key=lambda r: r["retention"]) if with_ret else None
    n_weights = sum(math.prod(r["shape"]) for r in records)
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
        "weights_fused": n_weights,
        "delta_norm": math.sqrt(dd),
        "change_norm": math.sqrt(sum(r["change_norm"] ** 2 for r in records)),
        "retention": retention,
        "noise": noise,
        "min_retention": worst["retention"] if worst else None,
        "min_retention_tensor": worst["name"] if worst else None,
        "codes_changed": (sum(r["codes_changed"] * math.prod(r["shape"]) for r in coded) / n_coded
                          if n_coded else None),
        "groups_refit": sum(r["groups_refit"] for r in coded) if coded else None,
        "configured_without_weights": plan.configured_without_weights,
        "zero_modules": plan.zero_modules,
        "excluded_by_only": plan.excluded_by_only,
        "outside_config": plan.outside_config,
        "dequantized_modules": sum(1 for j in plan.jobs if j.kind == "dequantize"),
        "sampled_tensors": sum(1 for r in records if r.get("sampled", 1.0) < 1.0),
        "shards": written["shards"],
        "seconds": round(seconds, 3),
    }
    summary["warnings"] = _warnings(summary, records)
    return {"tensors": records, "summary": summary}


def _warnings(summary: dict, records) -> list[str]:
    out = []
    if not records:
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
    if summary["configured_without_weights"]:
        k = len(summary["configured_without_weights"])
        out.append(f"{k} module(s) named by the adapter config have no adapter weights and were "
                   "left unchanged (mlx_lm fuse would re-quantize them with a zero delta)")
    return out


def format_table(report: dict, max_rows: int = 12):
    """A short rich table of the report (the worst tensors first)."""
    from rich.table import Table

    recs = sorted(report["tensors"], key=lambda r: (r["retention"] is None, r["retention"] or 0.0))
    table = Table(title="pyfuse fuse: fidelity", title_justify="left")
    table.add_column("tensor", justify="left", no_wrap=True)
    for col in ("shape", "q", "|delta|", "|change|", "retention", "noise", "codes chg", "refit"):
        table.add_column(col, justify="right", no_wrap=True)

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in recs[:max_rows]:
        q = "float" if r["bits"] is None or r["policy"] == "none" else f"{r['bits']}b g{r['group_size']}"
        table.add_row(r["name"], "x".join(map(str, r["shape"])), q, num(r["delta_norm"], ".3g"),
                      num(r["change_norm"], ".3g"), num(r["retention"], ".3f"), num(r["noise"], ".3g"),
                      num(r["codes_changed"], ".2%") if r.get("codes_changed") is not None else "-",
                      num(r["groups_refit"], "d") if r.get("groups_refit") is not None else "-")
    if len(recs) > max_rows:
        table.add_row(f"... {len(recs) - max_rows} more (see --report)", *[""] * 8)
    s = report["summary"]
    if recs:
        table.add_row("[bold]all[/bold]", "", s["policy"], num(s["delta_norm"], ".3g"),
                      num(s["change_norm"], ".3g"), num(s["retention"], ".3f"), num(s["noise"], ".3g"),
                      num(s["codes_changed"], ".2%") if s["codes_changed"] is not None else "-",
                      num(s["groups_refit"], "d") if s["groups_refit"] is not None else "-")
    return table


__all__ = ["FuseResult", "ModelDir", "QParams", "fuse_model", "format_table", "SafetensorsError"]
