"""The weight level of the noise floor: fuse a zero delta (and an adapter's
real delta) into every measurable tensor of a baseline, one policy at a time.

A zero delta goes through the native kernel (:func:`pyfuse.kernel.ops.fuse_requant`,
one call per tensor, all experts of a SwitchLinear at once) ``rounds`` times
in a row (what stacking ``rounds`` adapters does; round ``r`` of
``stochastic`` uses seed ``seed + r - 1``), and each round is compared with
the baseline. An adapter is fused once into the baseline (same kernel and
policy) for its retention and noise; with held-out calibration sums
``X^T X`` per module (:mod:`pyfuse.calibration`), also its output error and
output retention (:func:`pyfuse.calibration.fidelity.output_fidelity`, the
fuse report's figures).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from ..errors import UserError
from ..kernel.fidelity import tensor_fidelity
from ..kernel.ops import fuse_requant
from .baseline import QModule
from .sums import AdapterSums, Sums, WeightNorms, identical, zero_factors, zero_fidelity

__all__ = ["PolicyFuse", "adapter_factors", "fuse_policy", "read_adapter"]


# -- the adapter ------------------------------------------------------------------------------


def read_adapter(adapter_path):
    """The adapter (:func:`pyfuse.io.adapter_dir.read_adapter`), refused when
    it has no LoRA delta to measure."""
    from ..io.adapter_dir import read_adapter as read

    adapter = read(adapter_path)
    if adapter.is_dora:
        raise UserError(f"{adapter_path}: DoRA adapters are not supported by noise-floor "
                        "(retention is defined on the LoRA delta); use pyfuse fuse --report")
    if not any(m.has_delta for m in adapter.modules.values()):
        raise UserError(f"{adapter_path}: the adapter has no module with both lora_a and lora_b")
    return adapter


def adapter_factors(adapter, qmods: dict[str, QModule], all_modules: set[str]):
    """``{module path: (a, b)}`` in the kernel layout for the adapter modules
    that are quantized at this setting, and the adapted modules that are not."""
    from ..fuse.mapping import kernel_factors, match_module

    found, unquantized = {}, []
    for path, mod in adapter.modules.items():
        if not mod.has_delta:
            continue
        if path not in all_modules:
            raise UserError(f"adapter does not fit the model: it has weights for {path}, "
                            "which the model does not have")
        q = qmods.get(path)
        if q is None:
            unquantized.append(path)
            continue
        match = match_module(mod, q.base[0])  # only the stored rows/experts are used
        if match.in_dims != q.in_dims:
            raise UserError(f"adapter does not fit the model: {path} takes {match.in_dims} inputs, "
                            f"the model's layer {q.in_dims}")
        found[path] = kernel_factors(mod, match.kind)
    return found, unquantized


# -- one policy over the tensors of a baseline ---------------------------------------------------


@dataclass
class PolicyFuse:
    """What fusing every tensor of a baseline with one policy gave."""

    rounds: list[Sums]  # the zero-delta sums after round 1, 2, ...
    adapter: AdapterSums
    tensors: list[dict] = field(default_factory=list)  # per-tensor records
    params: list[tuple[str, mx.array]] = field(default_factory=list)  # fused (after all rounds), if kept
    adapter_params: list[tuple[str, mx.array]] = field(default_factory=list)  # the adapter's fuse, if kept
    identical: bool = True  # every fused tensor bit-identical to its baseline


def _zero_rounds(q: QModule, policy: str, rounds: int, seed: int, norms: WeightNorms):
    """The tensor after each zero-delta fuse, and its figures per round."""
    za, zb = zero_factors(q.base, q.in_dims)
    cur, figures = q.base, []
    for r in range(rounds):
        cur = fuse_requant(*cur, za, zb, scale=1.0, group_size=q.group_size, bits=q.bits,
                           policy=policy, seed=(seed + r) % 2**32)
        mx.eval(*cur)
        if identical(q.base, cur):
            fid = zero_fidelity(cur[0], q.group_size, q.bits)
        else:
            fid = tensor_fidelity(q.base, cur, group_size=q.group_size, bits=q.bits)
            norms.learn(q.path, fid)
        figures.append(fid)
    return cur, figures


def _adapter_fuse(q: QModule, factors, scale: float, policy: str, seed: int):
    """The fused tensors and their weight-level figures."""
    a, b = factors
    fused = fuse_requant(*q.base, a, b, scale=scale, group_size=q.group_size, bits=q.bits,
                         policy=policy, seed=seed)
    mx.eval(*fused)
    return fused, tensor_fidelity(q.base, fused, a, b, scale=scale, group_size=q.group_size, bits=q.bits)


def _output_fidelity(q: QModule, fused, factors, scale: float, held_out: mx.array) -> dict:
    """Output error and retention of one fused module on held-out ``X^T X``."""
    from ..calibration.fidelity import output_fidelity

    def weights(e):
        pick = (lambda x: x) if e is None else (lambda x: x[e])
        return (mx.dequantize(*(pick(x) for x in q.base), group_size=q.group_size, bits=q.bits),
                mx.dequantize(*(pick(x) for x in fused), group_size=q.group_size, bits=q.bits))

    experts = q.base[0].shape[0] if q.base[0].ndim == 3 else None
    return output_fidelity(weights, experts, *factors, scale, held_out)


def fuse_policy(qmods: list[QModule], policy: str, *, rounds: int, seed: int, norms: WeightNorms,
                record: dict, factors: dict, adapter_scale: float | None, keep_params: bool,
                advance: Callable[[], None], held_out: dict | None = None) -> PolicyFuse:
    """Fuse every tensor with ``policy``; ``record`` heads each tensor's
    record (the setting); ``keep_params`` keeps the fused tensors (zero
    delta and adapter) for the output level; ``held_out``: ``{module path:
    held-out X^T X}`` for the adapter's output error and retention."""
    out = PolicyFuse(rounds=[Sums() for _ in range(rounds)], adapter=AdapterSums())
    for q in qmods:
        cur, per_round = _zero_rounds(q, policy, rounds, seed, norms)
        for sums, fid in zip(out.rounds, per_round):
            sums.add(q.path, fid, q.weights)
        last = per_round[-1]
        rec = {**record, "policy": policy, "module": q.path, "shape": [*q.base[0].shape[:-1], q.in_dims],
               "group_size": q.group_size, "bits": q.bits, "weights_changed": last.weights_changed,
               "codes_changed": last.codes_changed, "rel_error": last.rel_error, "max_abs": last.max_abs,
               "groups_refit": last.groups_refit, "retention": None, "noise": None, "delta_norm": None,
               "output_error": None, "output_retention": None}
        if q.path in factors:
            fused, afid = _adapter_fuse(q, factors[q.path], adapter_scale, policy, seed)
            out.adapter.add(afid)
            rec.update(retention=afid.retention, noise=afid.noise, delta_norm=afid.delta_norm)
            if held_out and held_out.get(q.path) is not None:
                rec.update(_output_fidelity(q, fused, factors[q.path], adapter_scale, held_out[q.path]))
            if keep_params:
                out.adapter_params += [(f"{q.path}.{n}", x)
                                       for n, x in zip(("weight", "scales", "biases"), fused)]
        out.tensors.append(rec)
        out.identical = out.identical and last.codes_changed == 0 and last.groups_refit == 0
        if keep_params:
            out.params += [(f"{q.path}.weight", cur[0]), (f"{q.path}.scales", cur[1]),
                           (f"{q.path}.biases", cur[2])]
        advance()
    return out
