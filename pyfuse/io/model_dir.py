"""The one reader of an mlx-lm model directory.

``config.json`` (its ``quantization`` or mlx-style ``quantization_config``,
at the top level or under ``text_config``, with per-module overrides), the
safetensors shards and their index (``model.safetensors.index.json``),
whose headers are validated when the directory is opened, so that
truncated or corrupt files are refused before anything is computed.

:class:`ModelDir` answers, for every quantized module, its bits, group size
and mode (:meth:`ModelDir.quant_params`): from config.json's per-module
entry, else its default, checked against the stored shapes. Every part of
pyfuse that needs to know how a model is quantized (fuse, noise floor,
evaluation, experiments) asks it here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from ..options import MX_MODES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .names import natural_key
from .safetensors import SafetensorsFile, TensorInfo

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
FLOAT_DTYPES = ("F32", "F16", "BF16")



@dataclass(frozen=True)
class QParams:
    bits: int
    group_size: int
    mode: str = "affine"


class ModelDir:
    """An mlx-lm model directory, opened read-only and validated."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"model path {self.path} does not exist")
        if not self.path.is_dir():
            raise UserError(f"model path {self.path} is not a directory")
        try:
            self.entries = sorted(os.listdir(self.path))
        except OSError as err:
            raise UserError(f"cannot read the model directory {self.path} ({err.strerror})") from None
        self.config_raw, self.config = _read_json(self.path / CONFIG_FILE, "config.json (model config)")
        self.index_raw = None
        self.index = None
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
        self.shards: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.where: dict[str, str] = {}  # tensor -> shard file name
        try:
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
        except BaseException:
            self.close()
            raise
        self.quant = _QuantSpec(self.config, self.path)

    def read(self, name: str) -> mx.array:
        return self.shards[self.where[name]].read(name)

    def close(self):
        for shard in self.shards.values():
            shard.close()

    def known_dims(self) -> set[int]:
        """Integers in config.json (hidden sizes etc.) to disambiguate shapes."""
        dims = set()

        def walk(x):
            if isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, bool):
                pass
            elif isinstance(x, int) and x > 0:
                dims.add(x)

        walk({k: v for k, v in self.config.items() if k not in ("quantization", "quantization_config")})
        heads, head_dim = self.config.get("num_attention_heads"), self.config.get("head_dim")
        if isinstance(heads, int) and isinstance(head_dim, int):
            dims.add(heads * head_dim)
            kv = self.config.get("num_key_value_heads")
            if isinstance(kv, int):
                dims.add(kv * head_dim)
        return dims

    def quant_params(self, path: str, in_dims: int | None = None) -> QParams:
        """Bits, group size and mode of the quantized module ``path`` (with
        ``<path>.scales``), from its stored shapes, as mlx-lm infers them;
        ``in_dims`` (known from an adapter) makes the inference exact."""
        w = self.tensors[f"{path}.weight"]
        s = self.tensors[f"{path}.scales"]
        override = self.quant.overrides.get(path)
        packed, groups = w.shape[-1], s.shape[-1]
        if s.dtype == "U8":  # mx modes: one (bits, group size) each
            if f"{path}.global_scale" in self.tensors:
                raise UserError(f"{path}: nvfp4 with a global scale is not supported")
            candidates = []
            for mode, (bits, gs) in MX_MODES.items():
                if (packed * 32) % bits == 0 and (packed * 32 // bits) == groups * gs:
                    if in_dims is None or packed * 32 // bits == in_dims:
                        candidates.append(QParams(bits, gs, mode))
            if override and override.get("mode") in MX_MODES:
                candidates = [c for c in candidates if c.mode == override["mode"]] or candidates
            if len(candidates) != 1:
                raise UserError(f"{path}: cannot tell the quantization mode of uint8 scales "
                                f"(weight {list(w.shape)}, scales {list(s.shape)})")
            return candidates[0]
        if s.dtype not in FLOAT_DTYPES:
            raise UserError(f"{path}.scales has dtype {s.dtype}; expected a float dtype")
        if in_dims is not None:
            if (packed * 32) % in_dims or in_dims % groups:
                raise UserError(f"adapter does not fit the model: {path} takes {in_dims} inputs, "
                                f"but its quantized weight {list(w.shape)} with scales {list(s.shape)} "
                                "holds no whole number of codes/groups for that")
            q = QParams(packed * 32 // in_dims, in_dims // groups)
            # What config.json says (its per-module entry, else the default):
            # when its reading of the stored shapes is self-consistent and gives
            # another input size, the adapter is what does not fit.
            stated = override or self.quant.default
            bits, gs = stated.get("bits"), stated.get("group_size")
            if isinstance(bits, int) and isinstance(gs, int) and (bits, gs) != (q.bits, q.group_size) \
                    and (packed * 32) % bits == 0 and packed * 32 // bits == groups * gs:
                raise UserError(f"adapter does not fit the model: {path} takes "
                                f"{packed * 32 // bits} inputs ({bits}-bit, group size {gs} per "
                                f"config.json) but the adapter's lora_a has {in_dims}")
            return q
        first = override or self.quant.default or {}
        order = [first.get("bits")] + list(SUPPORTED_BITS)
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
        if first and QParams(first.get("bits"), first.get("group_size")) in fits:
            return QParams(first["bits"], first["group_size"])
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
        q = q or {}
        self.default = {k: v for k, v in q.items() if not isinstance(v, dict)}
        self.overrides = {k: v for k, v in q.items() if isinstance(v, dict)}
        mode = self.default.get("mode", "affine")
        if mode not in ("affine", *MX_MODES):
            raise UserError(f"{where / CONFIG_FILE}: unsupported quantization mode {mode!r}")


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
