"""Which modules get adapters: layer indices, module keys, DoRA's limits,
and the ``lora_parameters`` that make mlx-lm apply exactly those modules.

How the layers are written so that mlx-lm applies exactly them:

* ``layers=None`` (all layers): the standard form, ``num_layers`` = the
  model's layer count and ``keys`` the module names inside a layer
  (``self_attn.q_proj``, ``mlp.switch_mlp.down_proj``...).
* explicit layers: ``keys`` are the **full module paths** of the selected
  modules (``model.layers.8.mlp.switch_mlp.down_proj``...) and ``layers``
  lists the indices. mlx-lm's ``linear_to_lora_layers`` (used by
  ``load_adapters``, hence by ``mlx_lm fuse``) matches ``keys`` against
  the names inside each of the last ``num_layers`` layers *and* against the
  model's full module paths; full paths match only the second way, so
  exactly the trained modules get LoRA layers (checked in the tests with
  mlx-lm 0.32.2) and ``mlx_lm fuse`` re-quantizes nothing else.
  ``num_layers`` is set to cover the lowest selected layer (``n_layers -
  min(layers)``) for tools that read it as "the last N layers".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import UserError
from ..io.names import natural_key

__all__ = ["Targets", "check_dora", "parse_layers", "resolve_targets"]


def _parse_layer_spec(spec: str, original) -> list[int]:
    """``"8,14,20"`` / ``"4-7,10"`` -> indices (unsorted, maybe repeated)."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise UserError(f"layers {original!r}: empty item")
        try:
            if "-" in part[1:]:  # a range; a leading "-" is a negative index
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise UserError(f"layers {original!r}: range {part} is empty")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"layers {original!r}: {part!r} is not an index or a range like 4-7") from None
    return out


def parse_layers(layers, n_layers: int) -> list[int] | None:
    """``None``/``"all"`` -> None (every layer); ``[8, 14, 20]``, ``"8,14,20"``,
    ``"4-7,10"`` -> sorted unique indices (negative ones count from the end)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        if layers.strip().lower() == "all":
            return None
        layers = _parse_layer_spec(layers.strip(), layers)
    try:
        items = list(layers)
    except TypeError:
        raise UserError(f"layers must be a list of indices, got {layers!r}") from None
    if not items:
        raise UserError("layers is empty")
    result = set()
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise UserError(f"layers: {i!r} is not an integer")
        if not -n_layers <= i < n_layers:
            raise UserError(f"layer {i} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
        result.add(i % n_layers)
    return sorted(result)


def _lora_types():
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear, nn.Embedding,
            nn.QuantizedEmbedding)


def _is_lora_target(module) -> bool:
    return hasattr(module, "to_lora") or isinstance(module, _lora_types())


def _layer_targets(layer) -> dict[str, Any]:
    """LoRA-able modules inside one transformer block, by relative name."""
    return {name: m for name, m in layer.named_modules() if name and _is_lora_target(m)}


def _relative_keys(keys, available: list[str], explicit_layers: bool) -> list[str]:
    """``keys`` (a list or ``"a,b"``; None: every available one), checked."""
    if keys is None:
        return available
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",") if k.strip()]
    rel_keys = list(dict.fromkeys(keys))
    if not rel_keys:
        raise UserError("keys is empty")
    unknown = [k for k in rel_keys if k not in available]
    if unknown:
        where = "the selected layers" if explicit_layers else "the model's layers"
        raise UserError(f"key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                        f"match{'' if len(unknown) > 1 else 'es'} no Linear/SwitchLinear/Embedding "
                        f"module in {where}; available: {', '.join(available)}")
    return rel_keys


@dataclass
class Targets:
    """The modules to train. ``layers``: the selected indices (None: all);
    ``keys``: module names inside a layer; ``modules``: ``{full path:
    module}``; ``num_layers`` / ``lora_keys``: what ``adapter_config.json``
    says so that mlx-lm applies exactly these modules (see the module doc)."""

    layers: list[int] | None
    keys: list[str]
    modules: dict[str, Any]
    num_layers: int
    lora_keys: list[str]


def _last_n(layers, n: int) -> int | None:
    """``"last:N"`` (mlx-lm's ``num_layers N``) -> N, checked as mlx-lm does."""
    if not (isinstance(layers, str) and layers.startswith("last:")):
        return None
    try:
        count = int(layers[5:])
    except ValueError:
        raise UserError(f"layers {layers!r}: expected last:N with N an integer") from None
    if not 0 < count <= n:
        raise UserError(f"num_layers {count}: requested to train {count} layers but the model has {n} "
                        "(-1 trains all)")
    return count


def resolve_targets(model, layers, keys: Sequence[str] | str | None) -> Targets:
    """The modules of ``model`` that ``layers`` (see :func:`parse_layers`;
    ``"last:N"``: mlx-lm's ``num_layers``) and ``keys`` (default: every
    Linear, SwitchLinear and Embedding, as mlx-lm) select."""
    n = len(model.layers)
    last = _last_n(layers, n)
    selected = list(range(n - last, n)) if last is not None and last < n else \
        None if last is not None else parse_layers(layers, n)
    indices = list(range(n)) if selected is None else selected
    path_of = {id(m): p for p, m in model.named_modules()}
    per_layer = {i: _layer_targets(model.layers[i]) for i in indices}
    available = sorted({k for t in per_layer.values() for k in t})
    rel_keys = _relative_keys(keys, available, selected is not None)
    modules = {}
    for i in indices:
        prefix = path_of.get(id(model.layers[i]))
        if prefix is None:
            raise UserError("cannot locate the model's layers among its modules")
        for k in rel_keys:
            if k in per_layer[i]:
                modules[f"{prefix}.{k}"] = per_layer[i][k]
    if not modules:
        raise UserError("no module to train: the keys match nothing in the selected layers")
    if selected is None:
        num_layers, lora_keys = n, rel_keys
    elif last is not None:  # mlx-lm's own form: the last N layers, relative keys
        num_layers, lora_keys = last, rel_keys
    else:
        num_layers, lora_keys = n - min(selected), sorted(modules, key=natural_key)
    return Targets(layers=selected, keys=rel_keys, modules=modules, num_layers=num_layers, lora_keys=lora_keys)


def check_dora(modules: dict[str, Any]) -> None:
    """Refuse the modules DoRA cannot train: quantized embeddings (mlx-lm's
    DoRAEmbedding reads their packed codes as weights). Linear and
    SwitchLinear at every bits take pyfuse's DoRA layers."""
    import mlx.nn as nn

    for path, m in modules.items():
        if isinstance(m, nn.QuantizedEmbedding):
            raise UserError(f"DoRA on the quantized embedding {path} is not supported (mlx-lm's DoRAEmbedding "
                            "cannot hold one); use lora, or keys without the embedding")
