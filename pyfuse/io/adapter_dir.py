"""The one reader of an mlx-lm adapter directory.

An adapter directory, as written by ``mlx_lm lora`` (and mlx-lm-lora, which
uses the same loader), holds

* ``adapter_config.json``: ``fine_tune_type`` (``lora`` | ``dora`` |
  ``full``), ``num_layers`` (the last N transformer blocks; <= 0 means all),
  ``lora_parameters`` ``{rank, scale, dropout, keys?}`` (mlx-lm-lora also
  marks DoRA with ``use_dora: true`` there);
* ``full`` (a full fine-tune): ``adapters.safetensors`` holds the trained
  parameters themselves, under the model's names (they replace the base's);
* ``adapters.safetensors``: ``<module>.lora_a`` / ``<module>.lora_b`` (and
  ``<module>.m`` for DoRA), ``<module>`` being the base module's path, e.g.
  ``model.layers.3.mlp.switch_mlp.down_proj``.

How the tensors map onto the base model's: :mod:`pyfuse.fuse.mapping`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from .checks import check_finite, finite_number
from .safetensors import SafetensorsFile, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
LEAVES = ("lora_a", "lora_b", "m")


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
    fine_tune_type: str  # "lora" | "dora" | "full"
    scale: float
    rank: int | None
    num_layers: int | None
    keys: list[str] | None
    modules: dict[str, AdapterModule] = field(default_factory=dict)
    full_weights: dict[str, mx.array] = field(default_factory=dict)  # "full": name -> trained tensor

    @property
    def is_dora(self) -> bool:
        return self.fine_tune_type == "dora"

    @property
    def is_full(self) -> bool:
        return self.fine_tune_type == "full"


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


def is_dora_config(config: dict) -> bool:
    """Whether an adapter_config.json says DoRA: fine_tune_type dora, or
    mlx-lm-lora's marker lora_parameters.use_dora true."""
    params = config.get("lora_parameters")
    return config.get("fine_tune_type") == "dora" or (isinstance(params, dict) and params.get("use_dora") is True)


def read_adapter(path: str | Path) -> Adapter:
    """Read and check an mlx-lm adapter directory (UserError on bad input)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter path {path} does not exist")
    if not path.is_dir():
        raise UserError(f"adapter path {path} is not a directory")
    config = _load_json(path / ADAPTER_CONFIG, ADAPTER_CONFIG)
    fine_tune_type = config.get("fine_tune_type", "lora")
    num_layers = config.get("num_layers", config.get("lora_layers"))
    if fine_tune_type == "full":
        return _read_full(path, config, num_layers)
    if fine_tune_type not in ("lora", "dora"):
        raise UserError(f"{path}: unsupported fine_tune_type {fine_tune_type!r} (lora, dora or full)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise UserError(f"{path / ADAPTER_CONFIG}: no lora_parameters object")
    if is_dora_config(config):
        fine_tune_type = "dora"
    if "scale" not in params:
        hint = " (it has 'alpha': mlx-lm's LoRA config uses 'scale')" if "alpha" in params else ""
        raise UserError(f"{path / ADAPTER_CONFIG}: lora_parameters has no 'scale'{hint}")
    where = f"{path / ADAPTER_CONFIG}: lora_parameters"
    scale = finite_number(params["scale"], f"{where}.scale")
    for key in ("alpha", "dropout"):
        if params.get(key) is not None:
            finite_number(params[key], f"{where}.{key}")
    if params.get("rank") is not None:
        finite_number(params["rank"], f"{where}.rank", integer=True, positive=True)
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
                                f"is {fine_tune_type!r} (and lora_parameters has no use_dora: true)")
            _check_float(info, weights_path)
            grouped.setdefault(module, {})[leaf] = arr = f.read(name)
            check_finite(arr, f"{weights_path}: {name}", "; the adapter is damaged (or its training diverged)")
    for module, leaves in grouped.items():
        if "lora_b" in leaves and "lora_a" not in leaves:
            raise UserError(f"{weights_path}: {module} has lora_b but no lora_a")
        adapter.modules[module] = AdapterModule(module, leaves.get("lora_a"), leaves.get("lora_b"),
                                                leaves.get("m"))
    return adapter


def _read_full(path: Path, config: dict, num_layers) -> Adapter:
    """A full fine-tune: every tensor is a trained parameter of the model."""
    weights_path = path / ADAPTER_WEIGHTS
    if not weights_path.exists():
        raise UserError(f"{weights_path}: no adapter weights ({ADAPTER_WEIGHTS})")
    adapter = Adapter(path=path, config=config, fine_tune_type="full", scale=1.0, rank=None,
                      num_layers=num_layers, keys=None)
    with SafetensorsFile(weights_path) as f:
        for name, info in f.tensors.items():
            _check_float(info, weights_path)
            adapter.full_weights[name] = arr = f.read(name)
            check_finite(arr, f"{weights_path}: {name}", "; the adapter is damaged (or its training diverged)")
    if not adapter.full_weights:
        raise UserError(f"{weights_path}: a full fine-tune with no tensors")
    return adapter


def _check_float(info: TensorInfo, where: Path) -> None:
    if info.dtype not in ("F32", "F16", "BF16"):
        raise UserError(f"{where}: {info.name} has dtype {info.dtype}; adapter tensors are floating point")
