"""The one reader of an mlx-lm model directory.

Every part of pyfuse that needs to know what a model directory holds (fuse,
noise floor, evaluation, experiments) asks :class:`ModelDir`::

    with ModelDir(path) as model:      # UserError (one line) on anything wrong
        model.config                   # config.json, read-only (Mappings and tuples)
        model.quantization             # the default: QParams(bits, group_size, mode), or None
        model.declared_quantization    # the quantization block as config.json states it, or None
        model.module_quantization()    # {module path: QParams} of every quantized module
        model.quant_params(path)       # one module's QParams
        model.num_hidden_layers        # int or None
        model.tensors, model.read(name)  # the weights (headers parsed, data read on demand)
        model.read_module(path)        # (weight, scales or None, biases or None)

Opening is cheap: ``config.json`` is parsed and every shard's safetensors
header validated (offsets inside the file, sizes matching dtype x shape, the
index agreeing with the shards), so truncated or corrupt files are refused
before anything is computed; no weight data is read.

Where the quantization is read from: config.json's ``quantization`` (what
mlx-lm's loader reads); else an mlx-style ``quantization_config`` (with
``bits``; ``mlx_lm convert`` writes both), at the top level or under
``text_config`` (where mlx-lm's loader also looks for one). A Hugging Face
``quantization_config`` (``quant_method`` without ``bits``: AWQ, GPTQ, ...)
is refused. Entries of the block whose value is an object are per-module
overrides (mixed precision: ``"model.layers.0.mlp.down_proj": {"bits": 6,
"group_size": 32}``); the other entries are the default.

A module is quantized when the directory has ``<path>.scales`` next to
``<path>.weight``. Its bits, group size and mode come from its stored
shapes, read as config.json states them (its per-module entry, else the
default) when that reading fits the shapes, otherwise inferred from the
shapes alone (with the model's dimensions from config.json to break ties).
``mlx_lm.utils.load_model`` gives each module the same values
(tests/unit/test_model_dir.py). A module whose precision differs from the
default must therefore be named in config.json, as ``mlx_lm convert``
always does: without a model graph, a 6-bit g32 module of 64 inputs stored
without its entry in a 3-bit g64 model looks like a 3-bit g64 module of 128
inputs (mlx-lm's loader, which knows each module's input size, is not
fooled).

mlx-lm also loads Hugging Face ``quant_method`` configs (mxfp4, mxfp8,
AWQ, GPTQ, ...) by converting them as it loads; this reader refuses them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import mlx.core as mx

from ..errors import UserError
from ..options import MX_MODES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .checks import stated_quantization_problems
from .names import natural_key
from .safetensors import SafetensorsFile, TensorInfo

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")
_QUANT_KEYS = ("quantization", "quantization_config")

__all__ = ["CONFIG_FILE", "FLOAT_DTYPES", "INDEX_FILE", "ModelDir", "QParams"]


@dataclass(frozen=True)
class QParams:
    """How one module (or a model, by default) is quantized."""

    bits: int
    group_size: int
    mode: str = "affine"  # affine | mxfp4 | nvfp4 | mxfp8


class ModelDir:
    """An mlx-lm model directory, opened read-only and validated (see the
    module doc). Close it (or use ``with``) to release the shard files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"model path {self.path} does not exist")
        if not self.path.is_dir():
            raise UserError(f"model path {self.path} is not a directory")
        try:
            self.entries = sorted(os.listdir(self.path))
        except OSError as err:
            raise UserError(f"cannot read the model directory {self.path} ({err.strerror})") from None
        self.config_raw, config = _read_json(self.path / CONFIG_FILE, "config.json (model config)")
        self.config: Mapping = _frozen(config)
        self.index_raw = None
        self.index = None
        self.shards: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.where: dict[str, str] = {}  # tensor -> shard file name
        try:
            self._open_shards(self._shard_names())
        except BaseException:
            self.close()
            raise
        self._spec = _QuantSpec(config, self.path)
        problems = stated_quantization_problems(self.path / CONFIG_FILE, self._spec.default, self._spec.overrides,
                                                self.tensors)
        if problems:  # config.json must say what the tensors hold: it is copied into every output
            self.close()
            raise UserError(problems[0])
        self._modules: dict[str, QParams] | None = None

    # -- opening ----------------------------------------------------------------

    def _shard_names(self) -> list[str]:
        index_path = self.path / INDEX_FILE
        if index_path.exists():
            self.index_raw, self.index = _read_json(index_path, INDEX_FILE)
            weight_map = self.index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index_path}: no weight_map")
            names = sorted(set(weight_map.values()), key=natural_key)
        else:
            names = sorted((n for n in self.entries if n.startswith("model") and n.endswith(".safetensors")),
                           key=natural_key)
        if not names:
            raise UserError(f"{self.path}: no model*.safetensors weights (is this an mlx-lm model directory?)")
        return names

    def _open_shards(self, names: list[str]) -> None:
        index_path = self.path / INDEX_FILE
        for name in names:
            if "/" in name or name.startswith("."):
                raise UserError(f"{index_path}: unexpected shard name {name!r}")
            shard = SafetensorsFile(self.path / name)
            self.shards[name] = shard
            for t, info in shard.tensors.items():
                if t in self.tensors:
                    raise UserError(f"{self.path}: tensor {t} is in both {self.where[t]} and {name}")
                self.tensors[t] = info
                self.where[t] = name
        if self.index is not None:
            for t, shard_name in self.index["weight_map"].items():
                if self.where.get(t) != shard_name:
                    raise UserError(f"{index_path}: lists {t} in {shard_name}, but "
                                    + (f"it is in {self.where[t]}" if t in self.where else "no shard has it"))

    def read(self, name: str) -> mx.array:
        """One tensor (evaluated), read from its shard."""
        return self.shards[self.where[name]].read(name)

    def read_module(self, path: str) -> tuple[mx.array, mx.array | None, mx.array | None]:
        """``(weight, scales, biases)`` of module ``path`` as stored (None
        where absent: scales and biases of a float weight, biases of mx modes)."""
        def maybe(name):
            return self.read(name) if name in self.tensors else None

        return self.read(f"{path}.weight"), maybe(f"{path}.scales"), maybe(f"{path}.biases")

    def close(self):
        for shard in self.shards.values():
            shard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- what config.json says --------------------------------------------------

    @property
    def declared_quantization(self) -> Mapping | None:
        """The quantization block (default entries and per-module overrides)
        as config.json states it, read-only; None when it states none."""
        return _frozen(self._spec.block) if self._spec.present else None

    @property
    def quantization(self) -> QParams | None:
        """The model's default quantization, None for a full-precision model
        (config.json states no quantization)."""
        if not self._spec.present:
            return None
        bits, gs = self._spec.default.get("bits"), self._spec.default.get("group_size")
        if not (_is_int(bits) and _is_int(gs)):
            raise UserError(f"{self.path / CONFIG_FILE}: quantization must name bits and group_size")
        return QParams(bits, gs, self._spec.default.get("mode", "affine"))

    @property
    def num_hidden_layers(self) -> int | None:
        """The number of transformer blocks (top level or under text_config)."""
        n = self.config.get("num_hidden_layers")
        text = self.config.get("text_config")
        if n is None and isinstance(text, Mapping):
            n = text.get("num_hidden_layers")
        return n if _is_int(n) else None

    def known_dims(self) -> set[int]:
        """Integers in config.json (hidden sizes etc.) to disambiguate shapes."""
        dims = set()

        def walk(x):
            if isinstance(x, Mapping):
                for v in x.values():
                    walk(v)
            elif _is_int(x) and x > 0:
                dims.add(x)

        walk({k: v for k, v in self.config.items() if k not in _QUANT_KEYS})
        heads, head_dim = self.config.get("num_attention_heads"), self.config.get("head_dim")
        if isinstance(heads, int) and isinstance(head_dim, int):
            dims.add(heads * head_dim)
            kv = self.config.get("num_key_value_heads")
            if isinstance(kv, int):
                dims.add(kv * head_dim)
        return dims

    # -- per module -------------------------------------------------------------

    def module_quantization(self) -> dict[str, QParams]:
        """``{module path: QParams}`` of every quantized module (those with
        ``<path>.scales``), in natural order; a mixed-precision model's
        modules each with their own bits and group size."""
        if self._modules is None:
            paths = [n[: -len(".scales")] for n in self.tensors if n.endswith(".scales")]
            self._modules = {p: self.quant_params(p) for p in sorted(paths, key=natural_key)
                             if f"{p}.weight" in self.tensors}
        return dict(self._modules)

    def quant_params(self, path: str, in_dims: int | None = None) -> QParams:
        """Bits, group size and mode of the quantized module ``path`` (with
        ``<path>.scales``), from its stored shapes, as mlx-lm infers them;
        ``in_dims`` (known from an adapter) makes the inference exact."""
        w = self.tensors[f"{path}.weight"]
        s = self.tensors[f"{path}.scales"]
        stated = self._spec.overrides.get(path)
        if s.dtype == "U8":
            return self._mx_mode_params(path, w, s, stated, in_dims)
        if s.dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}.scales has dtype {s.dtype}; expected a float dtype")
        if in_dims is not None:
            return self._params_for_inputs(path, w, s, stated or self._spec.default, in_dims)
        return self._inferred_params(path, w, s, stated or self._spec.default or {})

    def _mx_mode_params(self, path, w: TensorInfo, s: TensorInfo, stated, in_dims) -> QParams:
        """mx modes (uint8 scales): one (bits, group size) each."""
        if f"{path}.global_scale" in self.tensors:
            raise UserError(f"{path}: nvfp4 with a global scale is not supported")
        packed, groups = w.shape[-1], s.shape[-1]
        candidates = []
        for mode, (bits, gs) in MX_MODES.items():
            if (packed * 32) % bits == 0 and (packed * 32 // bits) == groups * gs:
                if in_dims is None or packed * 32 // bits == in_dims:
                    candidates.append(QParams(bits, gs, mode))
        if stated and stated.get("mode") in MX_MODES:
            candidates = [c for c in candidates if c.mode == stated["mode"]] or candidates
        if len(candidates) != 1:
            raise UserError(f"{path}: cannot tell the quantization mode of uint8 scales "
                            f"(weight {list(w.shape)}, scales {list(s.shape)})")
        return candidates[0]

    @staticmethod
    def _params_for_inputs(path, w: TensorInfo, s: TensorInfo, stated: dict, in_dims: int) -> QParams:
        packed, groups = w.shape[-1], s.shape[-1]
        if (packed * 32) % in_dims or in_dims % groups:
            raise UserError(f"adapter does not fit the model: {path} takes {in_dims} inputs, "
                            f"but its quantized weight {list(w.shape)} with scales {list(s.shape)} "
                            "holds no whole number of codes/groups for that")
        q = QParams(packed * 32 // in_dims, in_dims // groups)
        # What config.json says (its per-module entry, else the default): when
        # its reading of the stored shapes is self-consistent and gives another
        # input size, the adapter is what does not fit.
        bits, gs = stated.get("bits"), stated.get("group_size")
        if isinstance(bits, int) and isinstance(gs, int) and (bits, gs) != (q.bits, q.group_size) \
                and (packed * 32) % bits == 0 and packed * 32 // bits == groups * gs:
            raise UserError(f"adapter does not fit the model: {path} takes "
                            f"{packed * 32 // bits} inputs ({bits}-bit, group size {gs} per "
                            f"config.json) but the adapter's lora_a has {in_dims}")
        return q

    def _inferred_params(self, path, w: TensorInfo, s: TensorInfo, stated: dict) -> QParams:
        """Without the input size: the (bits, group size) pairs that fit the
        shapes; config.json's reading first, then the model's dimensions."""
        packed, groups = w.shape[-1], s.shape[-1]
        order = [stated.get("bits")] + list(SUPPORTED_BITS)
        fits = []
        for bits in dict.fromkeys(b for b in order if b):
            if (packed * 32) % bits:
                continue
            n_in = packed * 32 // bits
            if n_in % groups or n_in // groups not in SUPPORTED_GROUP_SIZES:
                continue
            fits.append(QParams(bits, n_in // groups))
        if not fits:
            raise UserError(f"{path}: weight {list(w.shape)} and scales {list(s.shape)} fit no "
                            "supported bits/group size")
        if stated and QParams(stated.get("bits"), stated.get("group_size")) in fits:
            return QParams(stated["bits"], stated["group_size"])
        dims = self.known_dims()
        known = [q for q in fits if packed * 32 // q.bits in dims]
        if len(known) == 1:
            return known[0]
        if len(fits) == 1:
            return fits[0]
        raise UserError(f"{path}: cannot infer its bits and group size from weight {list(w.shape)} and "
                        f"scales {list(s.shape)} (candidates: "
                        + ", ".join(f"{q.bits}-bit g{q.group_size}" for q in fits)
                        + "); name it in config.json's quantization")


class _QuantSpec:
    """``quantization`` (or mlx-style ``quantization_config``) of config.json."""

    def __init__(self, config: dict, where: Path):
        q = config.get("quantization")
        qc = config.get("quantization_config")
        if q is None and qc is None and isinstance(config.get("text_config"), dict):
            qc = config["text_config"].get("quantization_config")  # as mlx-lm's loader
        if q is None and isinstance(qc, dict):
            if "quant_method" in qc and "bits" not in qc:
                raise UserError(f"{where / CONFIG_FILE}: quantization_config with quant_method "
                                f"{qc['quant_method']!r} is not an mlx-lm quantization; convert the "
                                "model with mlx_lm convert first")
            q = qc
        if q is not None and not isinstance(q, dict):
            raise UserError(f"{where / CONFIG_FILE}: quantization is not an object")
        self.present = q is not None
        self.block = q or {}
        self.default = {k: v for k, v in self.block.items() if not isinstance(v, dict)}
        self.overrides = {k: v for k, v in self.block.items() if isinstance(v, dict)}
        mode = self.default.get("mode", "affine")
        if mode not in ("affine", *MX_MODES):
            raise UserError(f"{where / CONFIG_FILE}: unsupported quantization mode {mode!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _frozen(x):
    """A read-only view of parsed JSON: objects as Mappings, arrays as tuples."""
    if isinstance(x, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in x.items()})
    if isinstance(x, list):
        return tuple(_frozen(v) for v in x)
    return x


def _read_json(path: Path, what: str):
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no {what}") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} ({err.strerror})") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: {what} is not a JSON object")
    return raw, data
