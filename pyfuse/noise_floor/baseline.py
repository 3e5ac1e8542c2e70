"""The baselines of the noise floor: the settings to measure and the quantized
model at each.

* ``source = "quantized"``: a full-precision model, quantized here with
  mlx-lm's own ``quantize_model`` (the model's ``quant_predicate``, e.g. 8-bit
  MoE router gates, and mlx-lm's rule that a tensor whose input dimension is
  not a multiple of the group size stays in full precision: such tensors are
  listed as skipped);
* ``source = "model"``: a quantized model at its own settings, every module
  at its own bits and group size (config.json's per-module entries, as
  :class:`pyfuse.io.model_dir.ModelDir` reads them for the fuse: the module
  mlx-lm loads must agree, or the model is refused);
* ``source = "requantized"``: a quantized model at another setting: its
  weights are dequantized and quantized again at that setting (as above).
"""

from __future__ import annotations

from collections.abc import Mapping

import contextlib
import io
import math
from dataclasses import dataclass
from typing import Any, Iterable

import mlx.core as mx

from ..errors import UserError
from ..io.model_dir import ModelDir
from ..io.names import natural_key
from ..options import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, mode_defaults

__all__ = ["Baseline", "QModule", "Setting", "load_baseline", "model_quantization", "settings_for"]


@dataclass
class Setting:
    source: str  # "quantized" | "model" | "requantized"
    group_size: int
    bits: int

    @property
    def label(self) -> str:
        return f"{self.bits}-bit g{self.group_size} ({self.source})"


def model_quantization(model_dir: ModelDir) -> dict | None:
    """The model's default quantization (``bits``, ``group_size``, ...; no
    per-module entries), or None for a full-precision model."""
    declared = model_dir.declared_quantization
    if declared is None:
        return None
    model_dir.quantization  # refuses a default without bits and group size
    return {k: v for k, v in declared.items() if not isinstance(v, Mapping)}


def settings_for(quant: dict | None, group_sizes: Iterable[int], bits: Iterable[int]) -> list[Setting]:
    """Every requested (group size, bits); a quantized model also (and first
    among equals) at its own setting, as stored."""
    if quant is None:
        settings = [Setting("quantized", g, b) for g in group_sizes for b in bits]
    else:
        own = (int(quant["group_size"]), int(quant["bits"]))
        settings = [Setting("model", *own)]
        settings += [Setting("requantized", g, b) for g in group_sizes for b in bits if (g, b) != own]
    return sorted(settings, key=lambda s: (s.group_size, s.bits, s.source != "model"))


@dataclass
class QModule:
    """One affine-quantized module of a baseline that the kernel can fuse."""

    path: str
    module: Any
    group_size: int
    bits: int
    base: tuple  # (w, scales, biases)

    @property
    def in_dims(self) -> int:
        return self.base[0].shape[-1] * 32 // self.bits

    @property
    def weights(self) -> int:
        return math.prod(self.base[0].shape[:-1]) * self.in_dims


@dataclass
class Baseline:
    """The mlx-lm model graph holding the baseline of one setting, its
    measurable modules, and the (module path, reason) of weight-bearing
    layers that are not measured."""

    model: Any
    qmods: list[QModule]
    skipped: list[tuple[str, str]]


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())  # mlx-lm's "[INFO] Quantized model ..."


def load_baseline(model_dir: ModelDir, setting: Setting) -> Baseline:
    """The baseline of ``setting`` (see the module doc)."""
    from mlx_lm.utils import dequantize_model, quantize_model

    from ..lm.load import load_graph

    model, config = load_graph(model_dir.path)
    if setting.source == "model":
        _check_stored_quantization(model, model_dir)
    else:
        if setting.source == "requantized":
            model = dequantize_model(model)
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        with _quiet():
            model, _ = quantize_model(model, config, setting.group_size, setting.bits)
    return Baseline(model, _quantized_modules(model), _skipped(model, setting))


def _check_stored_quantization(model, model_dir: ModelDir) -> None:
    """Each quantized module of mlx-lm's graph at the bits, group size and
    mode that ModelDir (the fuse's reader) gives it. Graph modules whose
    tensors are stored under other names (a ``sanitize`` that renames) have
    nothing to compare with."""
    for name, m in model.named_modules():
        if not hasattr(m, "scales") or f"{name}.scales" not in model_dir.tensors:
            continue
        stored = model_dir.quant_params(name)
        loaded = loaded_quantization(m)
        if (stored.bits, stored.group_size, stored.mode) != loaded:
            raise UserError(f"{model_dir.path}: {name} is {stored.bits}-bit g{stored.group_size} "
                            f"({stored.mode}) by config.json and its stored shapes, but mlx-lm loads it as "
                            f"{loaded[0]}-bit g{loaded[1]} ({loaded[2]})")


def loaded_quantization(m) -> tuple[int, int, str]:
    """(bits, group size, mode) of a quantized module of mlx-lm's graph as
    MLX computes with it (a null group size is the mode's default)."""
    mode = getattr(m, "mode", "affine")
    bits, group_size = mode_defaults(mode)
    return (bits if m.bits is None else m.bits, group_size if m.group_size is None else m.group_size, mode)


def _measurable(m) -> bool:
    if not hasattr(m, "scales"):
        return False
    bits, group_size, mode = loaded_quantization(m)
    return (mode == "affine" and getattr(m, "biases", None) is not None
            and group_size in SUPPORTED_GROUP_SIZES and bits in SUPPORTED_BITS)


def _quantized_modules(model) -> list[QModule]:
    mods = []
    for name, m in model.named_modules():
        if _measurable(m):
            base = (m.weight, m.scales, m.biases)
            mx.eval(*base)  # one module at a time: no burst of float intermediates
            bits, group_size, _ = loaded_quantization(m)
            mods.append(QModule(name, m, group_size, bits, base))
    return sorted(mods, key=lambda q: natural_key(q.path))


def _skipped(model, setting: Setting) -> list[tuple[str, str]]:
    import mlx.nn as nn

    skipped = []
    for name, m in model.named_modules():
        if hasattr(m, "scales"):
            bits, group_size, mode = loaded_quantization(m)
            if mode != "affine" or getattr(m, "biases", None) is None:
                skipped.append((name, f"mode {mode} (pyfuse re-quantizes affine tensors only)"))
            elif group_size not in SUPPORTED_GROUP_SIZES or bits not in SUPPORTED_BITS:
                skipped.append((name, f"{bits}-bit g{group_size} is not supported by the kernel"))
        elif isinstance(m, (nn.Linear, nn.Embedding)) or hasattr(m, "to_quantized"):
            if "weight" not in m or m.weight.ndim < 2:
                continue
            if setting.source == "model":
                why = "not quantized in the model"
            elif m.weight.shape[-1] % setting.group_size:
                why = f"input dimension {m.weight.shape[-1]} is not a multiple of {setting.group_size}"
            else:
                why = "kept in full precision by the model's quant predicate"
            skipped.append((name, why))
    return sorted(skipped, key=lambda x: natural_key(x[0]))
