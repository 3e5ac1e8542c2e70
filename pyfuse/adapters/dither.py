"""Dithered zero-delta fuses: draws of "what re-quantization alone does".

A stock fuse of a zero-delta adapter (the A0 control) re-fits each group's
grid and rounds every weight to the *nearest* code of the new grid: one
deterministic draw of the re-quantization noise. A dithered fuse rounds
the same weights onto the same new grid *stochastically* (seeded), so K
seeds give K draws of that noise, the same in size and all unbiased.

pyfuse does it with its own kernels, in two fuses: the stock fuse ``F`` of
the zero-delta adapter into the model ``M`` (the A0 step), then a
``stochastic`` fuse into ``F`` (which keeps F's grid: scale ``s`` and bias
``z`` of each group) of the residual ``R = dequantize(M) - dequantize(F)``.
The stochastic policy computes ``floor(q_F + R / s + u)``, and
``q_F + R / s = (dequantize(M) - z) / s``: the code of the original
weight on F's grid, rounded up with probability equal to its fraction.

:func:`dither_residual` writes ``R`` as an adapter of full rank
(``min(in, out)``, one factor the identity, scale 1) over the modules of
the zero-delta adapter, so that ``pyfuse fuse`` (and the experiment's fuse
step) can apply it. It is as large as those modules in float32; it is the
same for every seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from ..fuse.compute import dequantize
from ..fuse.mapping import is_embedding_name, match_module
from ..io.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter
from ..io.outputs import staged_dir
from ..io.model_dir import ModelDir
from ..io.safetensors import SafetensorsWriter
from .zero import is_zero_adapter

PROVENANCE = "dither_residual.json"

__all__ = ["DitherResult", "dither_residual"]


@dataclass
class DitherResult:
    out: Path
    modules: list[str] = field(default_factory=list)
    residual_max: float = 0.0  # the largest |R| / s (half a step at most, up to float noise)


def _residual(model: ModelDir, fused: ModelDir, path: str, mod) -> tuple[mx.array, mx.array]:
    """``(R / s as a check, R)`` of one module, R in float32."""
    if is_embedding_name(path):
        raise UserError(f"{path}: dithered fuses cover linear and expert modules, not embeddings")
    weight = model.tensors.get(f"{path}.weight")
    if weight is None or f"{path}.scales" not in model.tensors:
        raise UserError(f"{path}: dithering needs a quantized module in {model.path}")
    match = match_module(mod, weight)
    w0, s0, b0 = model.read_module(path)
    w1, s1, b1 = fused.read_module(path)
    q0 = model.quant_params(path, match.in_dims)
    q1 = fused.quant_params(path, match.in_dims)
    if (q0.bits, q0.group_size, q0.mode) != (q1.bits, q1.group_size, q1.mode) or q0.mode != "affine":
        raise UserError(f"{path}: the fused model's quantization differs from the model's: dither re-rounds "
                        "on the stock fuse's own grid (affine, same bits and group size)")
    r = dequantize(w0, s0, b0, q0).astype(mx.float32) - dequantize(w1, s1, b1, q1).astype(mx.float32)
    steps = mx.repeat(s1.astype(mx.float32), q1.group_size, axis=-1)
    mx.eval(r, steps)
    return mx.max(mx.abs(r) / steps), r


def _factors(r: mx.array) -> tuple[mx.array, mx.array, int]:
    """mlx-lm ``(lora_a, lora_b)`` with ``b @ a = r`` (kernel layout, scale 1),
    one of them the identity: rank ``min(in, out)``."""
    out_dims, in_dims = r.shape[-2], r.shape[-1]
    lead = r.shape[:-2]
    if in_dims <= out_dims:  # a = I [in, in], b = r
        a, b, rank = mx.broadcast_to(mx.eye(in_dims), (*lead, in_dims, in_dims)), r, in_dims
    else:  # a = r, b = I [out, out]
        a, b, rank = r, mx.broadcast_to(mx.eye(out_dims), (*lead, out_dims, out_dims)), out_dims
    if lead:
        return a, b, rank  # SwitchLinear: lora_a [E, r, in], lora_b [E, out, r]
    return a.T, b.T, rank  # Linear: lora_a [in, r], lora_b [r, out]


def dither_residual(model: str | os.PathLike, fused: str | os.PathLike, zero_adapter: str | os.PathLike,
                    out: str | os.PathLike) -> DitherResult:
    """Write the residual adapter ``dequantize(model) - dequantize(fused)``
    over the modules of ``zero_adapter`` (the zero-delta adapter that was
    stock-fused into ``model`` to give ``fused``); see the module doc."""
    adapter = read_adapter(zero_adapter)
    if not is_zero_adapter(zero_adapter):
        raise UserError(f"{zero_adapter} is not a zero-delta adapter: a dithered fuse re-rounds a zero-delta "
                        "fuse (make one with pyfuse zero-adapter)")
    final = Path(out)
    result = DitherResult(out=final)
    tensors, ranks = {}, []
    with ModelDir(model) as m, ModelDir(fused) as f:
        for path, mod in adapter.modules.items():
            if not mod.has_delta:
                continue
            steps, r = _residual(m, f, path, mod)
            a, b, rank = _factors(r)
            tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = a, b
            ranks.append(rank)
            result.modules.append(path)
            result.residual_max = max(result.residual_max, float(steps.item()))
    config = {"fine_tune_type": "lora", "num_layers": adapter.num_layers,
              "lora_parameters": {"rank": max(ranks, default=1), "scale": 1.0, "dropout": 0.0,
                                  "keys": adapter.keys}}
    with staged_dir(final, force=True) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        entries = [(name, "F32", tuple(t.shape)) for name, t in tensors.items()]
        with SafetensorsWriter(tmp / ADAPTER_WEIGHTS, entries, metadata={"format": "mlx"}) as w:
            for name, t in tensors.items():
                w.write(name, mx.contiguous(t.astype(mx.float32)))
        (tmp / PROVENANCE).write_text(json.dumps({
            "residual_of": {"model": str(Path(model).resolve()), "stock_fused": str(Path(fused).resolve()),
                            "zero_adapter": str(Path(zero_adapter).resolve())},
            "modules": result.modules, "max_residual_in_steps": result.residual_max}, indent=1) + "\n")
    return result
