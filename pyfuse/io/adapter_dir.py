"""mlx-lm adapter directories: read them, and map their tensors onto the
base model's tensors by name (no model graph needed).

An adapter directory, as written by ``mlx_lm lora`` (and mlx-lm-lora, which
uses the same loader), holds

* ``adapter_config.json``: ``fine_tune_type`` (``lora`` | ``dora`` |
  ``full``), ``num_layers`` (the last N transformer blocks; <= 0 means all),
  ``lora_parameters`` ``{rank, scale, dropout, keys?}``;
* ``adapters.safetensors``: ``<module>.lora_a`` / ``<module>.lora_b`` (and
  ``<module>.m`` for DoRA), ``<module>`` being the base module's path, e.g.
  ``model.layers.3.mlp.switch_mlp.down_proj``.

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
so ``b`` = lora_a and ``a`` = lora_b). DoRA's ``m`` is ``[out]`` (``[vocab]``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from .safetensors import SafetensorsFile, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
LEAVES = ("lora_a", "lora_b", "m")

# Module names that are embeddings (used only when the shapes fit both a
# Linear and an Embedding, i.e. a square table).
_EMBEDDING_NAME = re.compile(r"(^|\.)(embed_tokens|wte|tok_embeddings|embeddings?|word_embeddings|embed)$")
_LAYER = re.compile(r"^(.*?\blayers)\.(\d+)\.")


@dataclass
class AdapterModule:
    """The adapter tensors of one base module, in mlx-lm's layout."""

    path: str
    lora_a: mx.array | None
    lora_b: mx.array | None
    magnitude: mx.array | None = None  # DoRA ``m``

    @property
    def has_delta(self) -> bool:
        return self.lora_a is not None and self.lora_b is not None


@dataclass
class Adapter:
    path: Path
    config: dict
    fine_tune_type: str  # "lora" | "dora"
    scale: float
    rank: int | None
    num_layers: int | None
    keys: list[str] | None
    modules: dict[str, AdapterModule] = field(default_factory=dict)

    @property
    def is_dora(self) -> bool:
        return self.fine_tune_type == "dora"


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no {what} (is this an mlx-lm adapter directory?)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read {what} ({err})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return data


def read_adapter(path: str | Path) -> Adapter:
    """Read and check an mlx-lm adapter directory (UserError on bad input)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter path {path} does not exist")
    if not path.is_dir():
        raise UserError(f"adapter path {path} is not a directory")
    config = _load_json(path / ADAPTER_CONFIG, ADAPTER_CONFIG)
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type == "full":
        raise UserError(f"{path}: fine_tune_type 'full' holds whole weights, not a LoRA/DoRA "
                        "adapter; pyfuse fuses lora and dora adapters only")
    if fine_tune_type not in ("lora", "dora"):
        raise UserError(f"{path}: unsupported fine_tune_type {fine_tune_type!r} (lora or dora)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise UserError(f"{path / ADAPTER_CONFIG}: no lora_parameters object")
    if "scale" not in params:
        hint = " (it has 'alpha': mlx-lm's LoRA config uses 'scale')" if "alpha" in params else ""
        raise UserError(f"{path / ADAPTER_CONFIG}: lora_parameters has no 'scale'{hint}")
    try:
        scale = float(params["scale"])
    except (TypeError, ValueError):
        raise UserError(f"{path / ADAPTER_CONFIG}: lora_parameters.scale is not a number") from None
    num_layers = config.get("num_layers", config.get("lora_layers"))
    keys = params.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise UserError(f"{path / ADAPTER_CONFIG}: lora_parameters.keys must be a list of names")
    adapter = Adapter(path=path, config=config, fine_tune_type=fine_tune_type, scale=scale,
                      rank=params.get("rank"), num_layers=num_layers, keys=keys)

    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise UserError(f"{weights_path}: no adapter weights ({ADAPTER_WEIGHTS})")
    with SafetensorsFile(weights_path) as f:
        grouped: dict[str, dict[str, mx.array]] = {}
        for name, info in f.tensors.items():
            module, _, leaf = name.rpartition(".")
            if leaf not in LEAVES or not module:
                raise UserError(f"{weights_path}: {name} is not an adapter parameter "
                                "(expected <module>.lora_a, .lora_b or .m)")
            if leaf == "m" and not adapter.is_dora:
                raise UserError(f"{weights_path}: {name} is a DoRA magnitude but fine_tune_type "
                                f"is {fine_tune_type!r}")
            _check_float(info, weights_path)
            grouped.setdefault(module, {})[leaf] = f.read(name)
    for module, leaves in grouped.items():
        if "lora_b" in leaves and "lora_a" not in leaves:
            raise UserError(f"{weights_path}: {module} has lora_b but no lora_a")
        adapter.modules[module] = AdapterModule(module, leaves.get("lora_a"), leaves.get("lora_b"),
                                                leaves.get("m"))
    return adapter


def _check_float(info: TensorInfo, where: Path) -> None:
    if info.dtype not in ("F32", "F16", "BF16"):
        raise UserError(f"{where}: {info.name} has dtype {info.dtype}; adapter tensors are floating point")


# -- mapping onto base tensors ---------------------------------------------------


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
        if m is not None:
            bad("DoRA is not supported on SwitchLinear (mlx-lm cannot train it either)")
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


def layer_prefix(tensor_names) -> tuple[str | None, set[int]]:
    """The ``...layers`` prefix of the transformer blocks (the one with the
    most blocks) and the block indices present."""
    found: dict[str, set[int]] = {}
    for name in tensor_names:
        m = _LAYER.match(name)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not found:
        return None, set()
    prefix = max(found, key=lambda p: (len(found[p]), -len(p)))
    return prefix, found[prefix]


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
    prefix, indices = layer_prefix(modules_with_dot(modules))
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
        m = _LAYER.match(path + ".")
        if m and m.group(1) == prefix:
            if int(m.group(2)) < first:
                continue
            rel = path[m.end():]
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


def modules_with_dot(modules):
    return [p + "." for p in modules]


def natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
