"""Map an adapter's tensors onto the base model's tensors by name (no model
graph needed): which module each adapter module fuses into, in which layout.

mlx-lm's layouts and their mapping onto the kernel's ``a [..., r, in]``,
``b [..., out, r]`` (``delta = scale * b @ a``):

============================  ==================  ==================  =====================
layer                         lora_a              lora_b              kernel (a, b)
============================  ==================  ==================  =====================
LoRALinear / DoRALinear       ``[in, r]``         ``[r, out]``        (lora_a.T, lora_b.T)
LoRASwitchLinear              ``[E, r, in]``      ``[E, out, r]``     (lora_a, lora_b)
LoRAEmbedding / DoRAEmbedding ``[vocab, r]``      ``[r, dims]``       (lora_b, lora_a)
============================  ==================  ==================  =====================

(an embedding's delta is ``(scale * lora_a) @ lora_b``: rows are the vocabulary,
so ``b`` = lora_a and ``a`` = lora_b). DoRA's ``m`` is ``[out]`` (``[vocab]``; ``[E, out]`` for pyfuse's DoRASwitchLinear).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx

from ..errors import UserError
from ..io.adapter_dir import Adapter, AdapterModule
from ..io.names import layer_index, layer_prefix, natural_key
from ..io.safetensors import TensorInfo

_EMBEDDING_NAME = re.compile(r"(^|\.)(embed_tokens|wte|tok_embeddings|embeddings?|word_embeddings|embed)$")


@dataclass
class ModuleMatch:
    """How one adapter module fits its base module."""

    path: str
    kind: str  # "linear" | "switch" | "embedding"
    in_dims: int
    out_dims: int  # rows (per expert)
    experts: int | None
    rank: int


def is_embedding_name(path: str) -> bool:
    return bool(_EMBEDDING_NAME.search(path))


def match_module(mod: AdapterModule, weight: TensorInfo, lead_rows: int | None = None) -> ModuleMatch:
    """Classify an adapter module against its base ``<path>.weight`` and check
    every shape (UserError naming both shapes when they do not fit).

    ``weight`` is the stored tensor: ``[out, in]`` / ``[E, out, in]`` for a
    float weight, packed ``[.., out, in*bits/32]`` for a quantized one; only
    its rows (and experts) are used here, ``in`` comes from the adapter."""
    a, b, m = mod.lora_a, mod.lora_b, mod.magnitude
    shape = weight.shape

    def bad(why: str):
        la = list(a.shape) if a is not None else None
        lb = list(b.shape) if b is not None else None
        raise UserError(f"adapter does not fit the model: {mod.path}: {why} "
                        f"(lora_a {la}, lora_b {lb}, model weight {list(shape)})")

    if a is None or b is None:
        raise ValueError("match_module needs lora_a and lora_b")
    if len(shape) == 3:
        experts, rows = shape[0], shape[1]
        if a.ndim != 3 or b.ndim != 3:
            bad("a SwitchLinear adapter needs lora_a [E, r, in] and lora_b [E, out, r]")
        if a.shape[0] != experts or b.shape[0] != experts:
            bad(f"expert count differs from the model's {experts}")
        if b.shape[1] != rows:
            bad(f"lora_b has {b.shape[1]} output rows, the model {rows}")
        if a.shape[1] != b.shape[2]:
            bad("lora_a and lora_b ranks differ")
        if m is not None and tuple(m.shape) != (experts, rows):  # pyfuse's DoRASwitchLinear
            bad(f"DoRA magnitude m has shape {list(m.shape)}, expected [{experts}, {rows}]")
        return ModuleMatch(mod.path, "switch", a.shape[2], rows, experts, a.shape[1])
    if len(shape) != 2:
        bad("the base tensor is neither 2-D nor 3-D")
    if a.ndim != 2 or b.ndim != 2:
        bad("expected 2-D lora_a and lora_b")
    rows = shape[0]
    if a.shape[1] != b.shape[0]:
        bad("lora_a and lora_b ranks differ")
    fits_linear = b.shape[1] == rows
    fits_embedding = a.shape[0] == rows
    if fits_linear and fits_embedding:
        kind = "embedding" if is_embedding_name(mod.path) else "linear"
    elif fits_linear:
        kind = "linear"
    elif fits_embedding:
        kind = "embedding"
    else:
        bad(f"neither a Linear ([in, r], [r, {rows}]) nor an Embedding ([{rows}, r], [r, dims]) layout")
    if kind == "linear":
        match = ModuleMatch(mod.path, kind, a.shape[0], rows, None, a.shape[1])
    else:
        match = ModuleMatch(mod.path, kind, b.shape[1], rows, None, a.shape[1])
    if m is not None and tuple(m.shape) != (rows,):
        bad(f"DoRA magnitude m has shape {list(m.shape)}, expected [{rows}]")
    return match


def kernel_factors(mod: AdapterModule, kind: str) -> tuple[mx.array, mx.array]:
    """``(a, b)`` in the kernel layout (``a [..., r, in]``, ``b [..., out, r]``)
    as views of the adapter tensors: the same products mlx-lm's fuse forms."""
    if kind == "linear":
        return mod.lora_a.T, mod.lora_b.T
    if kind == "switch":
        return mod.lora_a, mod.lora_b
    if kind == "embedding":
        return mod.lora_b, mod.lora_a
    raise ValueError(f"unknown module kind {kind!r}")


# -- which modules mlx-lm would wrap -------------------------------------------


def configured_modules(adapter: Adapter, tensors: dict[str, TensorInfo],
                       num_hidden_layers: int | None = None) -> list[str]:
    """The module paths ``mlx_lm fuse`` would turn into LoRA layers (and
    re-quantize) for this adapter config: ``keys`` (or every Linear,
    SwitchLinear and Embedding) in the last ``num_layers`` blocks, plus
    top-level modules named in ``keys``. Worked out from tensor names, so it
    is a close approximation of mlx-lm's graph walk (weights with 2+ dims
    stand for the layers it converts)."""
    modules = {}
    for name, info in tensors.items():
        if name.endswith(".weight"):
            modules[name[: -len(".weight")]] = info
    prefix, indices = layer_prefix(modules)
    if prefix is None:
        return []
    n_blocks = num_hidden_layers or (max(indices) + 1)
    num_layers = adapter.num_layers
    if not isinstance(num_layers, int) or num_layers <= 0 or num_layers > n_blocks:
        first = 0
    else:
        first = n_blocks - num_layers
    keys = adapter.keys
    out = []
    for path, info in modules.items():
        # mlx-lm matches keys both relative to each of the last num_layers
        # blocks and as full module paths anywhere in the model (the form
        # `pyfuse train --layers` writes).
        if keys is not None and path in keys:
            out.append(path)
            continue
        hit = layer_index(path)
        if hit and hit[0] == prefix:
            if hit[1] < first:
                continue
            rel = hit[2]
            if keys is not None:
                if rel in keys:
                    out.append(path)
            elif _is_lora_target(path, info, tensors):
                out.append(path)
    return sorted(out, key=natural_key)


def _is_lora_target(path: str, weight: TensorInfo, tensors) -> bool:
    """Whether mlx-lm would convert the module (Linear, SwitchLinear,
    Embedding, quantized or not) when the adapter config names no keys.
    Quantized modules always are; float ones by weight rank, minus convolutions
    (an MLX Conv1d weight ``[out, kernel, in]`` looks like a SwitchLinear's)."""
    if f"{path}.scales" in tensors:
        return True
    if len(weight.shape) == 2:
        return True
    return len(weight.shape) == 3 and "conv" not in path.rsplit(".", 1)[-1]


# -- what mlx-lm's loader refuses ----------------------------------------------

# How many offending tensors an error names (mlx-lm names them all).
NAMED_OFFENDERS = 5


def incompatible_modules(adapter: Adapter, tensors: dict[str, TensorInfo],
                         num_hidden_layers: int | None, kinds: dict[str, str]) -> dict[str, str]:
    """``{module: why}`` for the adapter modules ``mlx_lm.load(model,
    adapter_path=...)`` refuses ("incompatible tensors" or a DoRA layer it
    cannot build), by the rule of mlx-lm's ``load_adapters`` and
    ``linear_to_lora_layers``:

    * every tensor must be a LoRA/DoRA parameter of a layer the config
      converts: a module in ``keys`` (or every Linear, SwitchLinear and
      Embedding when there are none) inside the last ``num_layers`` blocks,
      or a full module path in ``keys``;
    * ``fine_tune_type: dora`` converts a SwitchLinear into nothing mlx-lm
      can load (it raises "doesn't support DoRA"); pyfuse fuses DoRA there
      only when the adapter holds the magnitudes ``m`` it was trained with.

    ``kinds`` is each matched module's kind (:func:`match_module`)."""
    configured = set(configured_modules(adapter, tensors, num_hidden_layers))
    out = {}
    for path in sorted(adapter.modules, key=natural_key):
        mod = adapter.modules[path]
        if path not in configured:
            out[path] = (f"not an adapter parameter of the layers the config converts "
                         f"(num_layers {adapter.num_layers}, keys "
                         f"{'default' if adapter.keys is None else adapter.keys})")
        elif adapter.is_dora and kinds.get(path) == "switch" and mod.magnitude is None:
            out[path] = "fine_tune_type dora on a SwitchLinear without its magnitude m"
    return out


def refusal(adapter: Adapter, incompatible: dict[str, str]) -> UserError:
    """The error for adapters mlx-lm's loader refuses: the first offenders by
    name, the count, and the way out."""
    first = list(incompatible.items())[:NAMED_OFFENDERS]
    named = "; ".join(f"{path} ({why})" for path, why in first)
    more = len(incompatible) - len(first)
    return UserError(f"adapter {adapter.path} has {len(incompatible)} module(s) mlx-lm's loader refuses "
                     f"(mlx_lm.load(..., adapter_path=...) reports incompatible tensors): {named}"
                     + (f"; and {more} more" if more > 0 else "")
                     + "; pass --lenient to fuse them anyway")
