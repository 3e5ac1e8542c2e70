"""The plan of a fuse, made before anything is written: one :class:`Job` per
module whose tensors are recomputed (fused, or dequantized under
``--dequantize``) with its input and output precision and the tensors it
reads and writes, what the adapter covers and does not, and the changes to
config.json (``--dequantize`` drops the quantization; ``--requant-bits``
records each fused module's new precision as a per-module entry).

Every check that can refuse the input (shapes, dtypes, modes, options that
cannot apply to a module) happens here, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import UserError
from ..io.adapter_dir import Adapter, AdapterModule
from ..io.model_dir import FLOAT_DTYPES, MX_MODES, ModelDir, QParams
from ..io.names import natural_key
from ..io.safetensors import dtype_of
from .mapping import (ModuleMatch, configured_modules, incompatible_modules, kernel_factors, match_module,
                      refusal)


@dataclass
class Job:
    """One module whose tensors are recomputed (fused or dequantized)."""

    path: str
    kind: str  # linear | switch | embedding | dequantize (untouched, --dequantize) | replace (full fine-tune)
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
    replacement: dict[str, mx.array] | None = None  # kind "replace": the trained tensors

    @property
    def fuses(self) -> bool:
        return self.kind not in ("dequantize", "replace", "requantize")


@dataclass
class Plan:
    jobs: list[Job]
    configured_without_weights: list[str]
    zero_modules: list[str]  # lora_a without lora_b: a zero delta, nothing to fuse
    excluded_by_only: list[str]
    outside_config: list[str]
    incompatible: dict[str, str]  # module -> why mlx-lm's loader refuses it (fused: --lenient)
    config_changes: dict | None  # new config.json dict, or None to copy it
    is_dora: bool
    scale: float


def make_plan(mdir: ModelDir, adapter: Adapter, *, policy: str, dequantize: bool,
              requant_bits: int | None, requant_group_size: int | None,
              only_re: re.Pattern | None, lenient: bool = False) -> Plan:
    """The plan of fusing ``adapter`` into ``mdir`` (UserError when it cannot
    work, or when mlx-lm's loader would refuse the adapter and not ``lenient``)."""
    if adapter.is_full:
        jobs = _replace_jobs(mdir, adapter, dequantize=dequantize, requant_bits=requant_bits,
                             requant_group_size=requant_group_size)
        if dequantize:
            jobs += _dequantize_jobs(mdir, {j.path for j in jobs})
        return Plan(jobs=jobs, configured_without_weights=[], zero_modules=[], excluded_by_only=[],
                    outside_config=[], incompatible={}, config_changes=_config_changes(mdir, jobs, dequantize),
                    is_dora=False, scale=1.0)
    jobs, zero, excluded = _fuse_jobs(mdir, adapter, policy=policy, dequantize=dequantize,
                                      requant_bits=requant_bits, requant_group_size=requant_group_size,
                                      only_re=only_re)
    kinds = {p: "switch" if len(mdir.tensors[f"{p}.weight"].shape) == 3 else "2d" for p in adapter.modules}
    incompatible = incompatible_modules(adapter, mdir.tensors, mdir.num_hidden_layers, kinds)
    if incompatible and not lenient:
        raise refusal(adapter, incompatible)
    if dequantize:  # every other quantized module is written in full precision too
        jobs += _dequantize_jobs(mdir, {j.path for j in jobs})
    without, outside = _coverage(mdir, adapter)
    return Plan(jobs=jobs, configured_without_weights=without, zero_modules=zero,
                excluded_by_only=excluded, outside_config=outside, incompatible=incompatible,
                config_changes=_config_changes(mdir, jobs, dequantize),
                is_dora=adapter.is_dora, scale=adapter.scale)


def _fuse_jobs(mdir: ModelDir, adapter: Adapter, *, only_re, **options):
    """The jobs of the adapter's modules, and the modules left out (a zero
    delta; not matching ``--only``)."""
    jobs: list[Job] = []
    zero, excluded = [], []
    for path in sorted(adapter.modules, key=natural_key):
        mod = adapter.modules[path]
        weight = mdir.tensors.get(f"{path}.weight")
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
        jobs.append(_fuse_job(mdir, adapter, mod, match_module(mod, weight), **options))
    return jobs, zero, excluded


def _fuse_job(mdir: ModelDir, adapter: Adapter, mod: AdapterModule, match: ModuleMatch, *, policy,
              dequantize, requant_bits, requant_group_size) -> Job:
    path = mod.path
    quantized = f"{path}.scales" in mdir.tensors
    q_in, dtype = _input_precision(mdir, adapter, match, quantized, policy)
    if match.kind == "embedding" and mod.magnitude is not None and quantized:
        raise UserError(f"{path}: DoRA on a quantized embedding is not supported (mlx-lm "
                        "cannot fuse it either)")
    q_out = None
    if quantized and not dequantize:
        q_out = _output_precision(path, q_in, match.in_dims, requant_bits, requant_group_size)
    a, b = kernel_factors(mod, match.kind)
    job = Job(path=path, kind=match.kind, quantized=quantized, q_in=q_in, q_out=q_out,
              dtype=dtype, mod=mod, a=a, b=b, magnitude=mod.magnitude, in_dims=match.in_dims)
    _plan_outputs(job, mdir)
    return job


def _input_precision(mdir: ModelDir, adapter: Adapter, match: ModuleMatch, quantized: bool,
                     policy: str) -> tuple[QParams | None, str]:
    """The module's quantization (None: a float weight) and the dtype its
    fused weight is computed in."""
    path, weight = match.path, mdir.tensors[f"{match.path}.weight"]
    if not quantized:
        if weight.dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}.weight has dtype {weight.dtype}: not a float weight")
        if weight.shape[-1] != match.in_dims:
            raise UserError(f"adapter does not fit the model: {path} takes {match.in_dims} "
                            f"inputs but its weight is {list(weight.shape)}")
        return None, weight.dtype
    _check_dora_sizing(mdir, adapter, path, match.in_dims)
    q_in = mdir.quant_params(path, match.in_dims)
    if q_in.mode == "affine":
        return q_in, mdir.tensors[f"{path}.scales"].dtype
    if policy != "stock":
        raise UserError(f"{path} is quantized with mode {q_in.mode}: --policy {policy} "
                        "works on affine quantization only (use --policy stock or "
                        "--dequantize)")
    return q_in, "BF16"  # mx modes dequantize to bfloat16 (as in mlx-lm)


def _output_precision(path: str, q_in: QParams, in_dims: int, requant_bits, requant_group_size) -> QParams:
    if requant_bits is None and requant_group_size is None:
        return q_in
    q_out = QParams(requant_bits or q_in.bits,
                    requant_group_size or (q_in.group_size if q_in.mode == "affine" else 64))
    if in_dims % q_out.group_size:
        raise UserError(f"{path} has {in_dims} inputs, not a multiple of "
                        f"--requant-group-size {q_out.group_size}")
    return q_out


def _plan_outputs(job: Job, model: ModelDir) -> None:
    """The tensors ``job`` reads and the (dtype, shape) of those it writes."""
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


def _replace_jobs(mdir: ModelDir, adapter: Adapter, *, dequantize: bool, requant_bits, requant_group_size
                  ) -> list[Job]:
    """A full fine-tune: its tensors replace the model's of the same name and
    shape, as mlx-lm's loader loads them (which refuses any other tensor).
    The trained float weight of a module the model stores quantized (a full
    fine-tune of the float model: mlx-lm cannot train or load it on the
    quantized one) is quantized at the module's precision by the policy."""
    bad, by_module, jobs = [], {}, []
    for name in sorted(adapter.full_weights, key=natural_key):
        arr, info = adapter.full_weights[name], mdir.tensors.get(name)
        module = name.rsplit(".", 1)[0]
        if info is None:
            bad.append(f"{name} (not a parameter of the model)")
        elif tuple(info.shape) == tuple(arr.shape):
            by_module.setdefault(module, []).append(name)
        elif name.endswith(".weight") and f"{module}.scales" in mdir.tensors \
                and tuple(arr.shape[:-1]) == tuple(info.shape[:-1]):
            q_in = mdir.quant_params(module, arr.shape[-1])
            q_out = None if dequantize else _output_precision(module, q_in, arr.shape[-1], requant_bits,
                                                              requant_group_size)
            job = Job(path=module, kind="requantize", quantized=True, q_in=q_in, q_out=q_out,
                      dtype=mdir.tensors[f"{module}.scales"].dtype if q_in.mode == "affine" else "BF16",
                      in_dims=arr.shape[-1], replacement={name: arr})
            _plan_outputs(job, mdir)
            jobs.append(job)
        else:
            bad.append(f"{name} (shape {list(arr.shape)}, the model's {list(info.shape)})")
    if bad:
        raise UserError(f"full fine-tune {adapter.path} has {len(bad)} tensor(s) mlx-lm's loader refuses "
                        f"(incompatible tensors): " + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else ""))
    return jobs + [Job(path=module, kind="replace", quantized=False, q_in=None, q_out=None, dtype="",
                       inputs=names, replacement={n: adapter.full_weights[n] for n in names},
                       out={n: (dtype_of(adapter.full_weights[n]), tuple(adapter.full_weights[n].shape))
                            for n in names})
                   for module, names in by_module.items()]


def _dequantize_jobs(mdir: ModelDir, fused: set[str]) -> list[Job]:
    """``--dequantize``: a job for every quantized module that is not fused."""
    jobs = []
    for name in mdir.tensors:
        if not name.endswith(".scales"):
            continue
        path = name[: -len(".scales")]
        if path in fused or f"{path}.weight" not in mdir.tensors:
            continue
        q = mdir.quant_params(path)
        dtype = "BF16" if q.mode != "affine" else mdir.tensors[name].dtype
        w = mdir.tensors[f"{path}.weight"]
        job = Job(path=path, kind="dequantize", quantized=True, q_in=q, q_out=None, dtype=dtype,
                  in_dims=w.shape[-1] * 32 // q.bits)
        _plan_outputs(job, mdir)
        jobs.append(job)
    return jobs


def _coverage(mdir: ModelDir, adapter: Adapter) -> tuple[list[str], list[str]]:
    """The modules the adapter config names without weights, and those with
    weights that its config does not name."""
    configured = configured_modules(adapter, mdir.tensors, mdir.num_hidden_layers)
    configured_set = set(configured)
    with_weights = {p for p, m in adapter.modules.items() if m.has_delta or m.magnitude is not None}
    without = [p for p in configured if p not in with_weights]
    outside = [p for p in sorted(with_weights, key=natural_key) if p not in configured_set]
    return without, outside


def _config_changes(mdir: ModelDir, jobs: list[Job], dequantize: bool) -> dict | None:
    """The new config.json (None: copy it byte for byte)."""
    if dequantize:
        if mdir.declared_quantization is None:
            return None
        return {k: v for k, v in json.loads(mdir.config_raw).items()
                if k not in ("quantization", "quantization_config")}
    changed = [j for j in jobs if j.kind != "dequantize" and j.q_out is not None and j.q_out != j.q_in]
    if not changed:
        return None
    config = json.loads(mdir.config_raw)
    keys = [k for k in ("quantization", "quantization_config")
            if isinstance(config.get(k), dict) and "bits" in config[k]]
    for k in keys:
        for j in changed:
            entry = {"group_size": j.q_out.group_size, "bits": j.q_out.bits}
            if "mode" in config[k] or j.q_in.mode != "affine":
                entry["mode"] = j.q_out.mode
            config[k][j.path] = entry
    return config


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
