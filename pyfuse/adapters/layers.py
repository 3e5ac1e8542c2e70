"""Inserting LoRA/DoRA layers into an mlx-lm model, and loading an adapter
directory, as mlx-lm's ``linear_to_lora_layers`` / ``load_adapters`` do,
with pyfuse's DoRA layers (:mod:`.dora`) where mlx-lm's refuse (MoE experts)
or mis-size (3, 5 and 6-bit layers). LoRA layers and DoRA on embeddings
are mlx-lm's own. The adapter format is mlx-lm's, so an adapter trained
here loads with mlx-lm wherever mlx-lm has the layer, and with
:func:`load_adapters` everywhere."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["load_adapters", "to_adapter_layers"]


def _to_dora(layer, config: dict):
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    from mlx_lm.tuner.dora import DoRAEmbedding

    from .dora import DoRALinear, DoRASwitchLinear

    if isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
        cls = DoRALinear
    elif isinstance(layer, (SwitchLinear, QuantizedSwitchLinear)):
        cls = DoRASwitchLinear
    elif isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
        cls = DoRAEmbedding
    else:
        raise ValueError(f"Can't convert layer of type {type(layer).__name__} to DoRA")
    return cls.from_base(layer, r=config["rank"], scale=config["scale"], dropout=config["dropout"])


def _default_keys(model) -> set[str]:
    """mlx-lm's default keys: every LoRA-able module name inside a block."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear, nn.Embedding,
             nn.QuantizedEmbedding)
    keys = set()
    for block in model.layers:
        keys.update(k for k, m in block.named_modules() if hasattr(m, "to_lora") or isinstance(m, kinds))
    return keys


def to_adapter_layers(model, num_layers: int, config: dict, use_dora: bool = False) -> None:
    """mlx-lm's ``linear_to_lora_layers(model, num_layers, config,
    use_dora)``: ``config["keys"]`` (default: every LoRA-able module) are
    matched against the module names inside each of the last
    ``num_layers`` blocks and against the model's full module paths. DoRA
    uses pyfuse's layers for Linear and SwitchLinear."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if not use_dora:
        linear_to_lora_layers(model, num_layers, config, use_dora=False)
        return
    if "scale" not in config:
        raise KeyError("LoRA config is missing required key 'scale'.")
    keys = config.get("keys")
    keys = _default_keys(model) if keys is None else set(keys)
    for block in model.layers[-max(num_layers, 0):]:
        pairs = [(k, _to_dora(m, config)) for k, m in block.named_modules() if k in keys]
        if pairs:
            block.update_modules(tree_unflatten(pairs))
    pairs = [(k, _to_dora(m, config)) for k, m in model.named_modules() if k in keys]
    if pairs:
        model.update_modules(tree_unflatten(pairs))


def load_adapters(model, adapter_path) -> None:
    """mlx-lm's ``load_adapters``: the layers of ``adapter_config.json``,
    then ``adapters.safetensors`` (non-strict, as mlx-lm)."""
    path = Path(adapter_path)
    with open(path / "adapter_config.json", encoding="utf-8") as f:
        config = json.load(f)
    fine_tune_type = config.get("fine_tune_type", "lora")
    if fine_tune_type != "full":
        to_adapter_layers(model, config["num_layers"], config["lora_parameters"],
                          use_dora=fine_tune_type == "dora")
    model.load_weights(str(path / "adapters.safetensors"), strict=False)
