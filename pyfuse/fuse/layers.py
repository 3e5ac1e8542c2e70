"""Which modules a partial fuse touches: layer groups, index ranges and
module globs, turned into the ``only`` regular expression of
:func:`pyfuse.fuse.api.fuse_model` (so the plan, the report and the
experiment steps see one filter).

``layers``:

* ``early`` / ``middle`` / ``late``: the first, second and last third of
  the ``N`` transformer blocks, cut at ``round(N/3)`` and ``round(2N/3)``
  (48 blocks: 0-15, 16-31, 32-47; 4 blocks: 0, 1-2, 3; 2 blocks: 0, none, 1:
  an empty group is an error, not a silent no-op);
* ``all``;
* indices: ``"8,14,20"``, ``"4-7"`` (inclusive), negative ones counted from
  the end (``"-1"`` is the last block), or a list of integers.

``modules``: globs matched against the whole module path with
:func:`fnmatch.fnmatchcase` (``*`` crosses dots): ``["*.self_attn.*"]``,
``["*.mlp.switch_mlp.down_proj"]``. A module is fused when it is in the
selected layers, matches one of the globs (when given) and matches ``only``
(when given).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from ..errors import UserError

GROUPS = ("early", "middle", "late", "all")
_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")


def group_bounds(n_layers: int) -> dict[str, range]:
    """The layer groups of an ``n_layers``-block model."""
    a, b = round(n_layers / 3), round(2 * n_layers / 3)
    return {"early": range(0, a), "middle": range(a, b), "late": range(b, n_layers), "all": range(n_layers)}


def select_layers(layers: str | int | Sequence[int], n_layers: int) -> list[int]:
    """The block indices ``layers`` names in an ``n_layers``-block model
    (sorted; UserError when a name or index does not fit)."""
    if isinstance(layers, bool):
        raise UserError(f"layers: expected a group ({', '.join(GROUPS)}), indices like '4-7' or a list, "
                        f"got {layers!r}")
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, str) and layers.strip() in GROUPS:
        picked = list(group_bounds(n_layers)[layers.strip()])
        if not picked:
            raise UserError(f"layers: {layers!r} selects no block of a {n_layers}-block model "
                            f"(groups: {_describe(n_layers)})")
        return picked
    if isinstance(layers, str):
        indices = []
        for part in layers.split(","):
            m = _RANGE.match(part)
            if not m:
                raise UserError(f"layers: {part.strip()!r} is not a group ({', '.join(GROUPS)}), an index or "
                                "a range like '4-7'")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            lo, hi = _absolute(lo, n_layers), _absolute(hi, n_layers)
            if hi < lo:
                raise UserError(f"layers: the range {part.strip()!r} is empty")
            indices += range(lo, hi + 1)
        return sorted(set(indices))
    return sorted({_absolute(i, n_layers) for i in layers})


def _absolute(i: int, n_layers: int) -> int:
    j = i + n_layers if i < 0 else i
    if not 0 <= j < n_layers:
        raise UserError(f"layers: index {i} is outside the model's {n_layers} blocks (0-{n_layers - 1})")
    return j


def _describe(n_layers: int) -> str:
    parts = []
    for name, r in group_bounds(n_layers).items():
        if name != "all":
            parts.append(f"{name} " + (f"{r.start}-{r.stop - 1}" if len(r) else "empty"))
    return ", ".join(parts)


def selection_only(only: str | None, *, layers=None, modules: Sequence[str] | None = None,
                   prefix: str | None = None, n_layers: int | None = None) -> str | None:
    """The ``only`` regular expression (``re.search``) equivalent to ``only``
    AND ``layers`` (of the blocks under ``prefix``, e.g. ``model.layers``)
    AND ``modules``; ``only`` itself when neither is given."""
    if layers is None and not modules:
        return only
    parts = []
    if only is not None:
        parts.append(f"(?=.*?(?:{only}))")
    if layers is not None:
        if prefix is None or not n_layers:
            raise UserError("layers: the model has no numbered transformer blocks (...layers.N...) to select")
        picked = select_layers(layers, n_layers)
        parts.append(f"(?={re.escape(prefix)}\\.(?:{'|'.join(map(str, picked))})\\.)")
    if modules:
        parts.append("(?:" + "|".join(fnmatch.translate(g) for g in modules) + ")")
    return "^" + "".join(parts)
