"""Names of tensors and modules: natural sort order and the transformer
blocks' ``...layers.N.`` prefix."""

from __future__ import annotations

import re

_LAYER = re.compile(r"^(.*?\blayers)\.(\d+)\.")


def natural_key(name: str):
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def layer_index(path: str) -> tuple[str, int, str] | None:
    """``(prefix, index, rest)`` of a module path inside a transformer block
    (``model.layers.3.mlp.gate`` -> ``("model.layers", 3, "mlp.gate")``), or
    None outside the blocks."""
    m = _LAYER.match(path + ".")
    return (m.group(1), int(m.group(2)), path[m.end():]) if m else None


def layer_prefix(paths) -> tuple[str | None, set[int]]:
    """The ``...layers`` prefix of the transformer blocks (the one with the
    most blocks) among module paths, and the block indices present."""
    found: dict[str, set[int]] = {}
    for path in paths:
        hit = layer_index(path)
        if hit:
            found.setdefault(hit[0], set()).add(hit[1])
    if not found:
        return None, set()
    prefix = max(found, key=lambda p: (len(found[p]), -len(p)))
    return prefix, found[prefix]
