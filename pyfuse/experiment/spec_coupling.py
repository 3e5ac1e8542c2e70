"""The spec's parts for the coupling questions (the schema is :mod:`.spec`):
layer selections of fuse and train stages, the behaviour evaluation, and
sweeps.

Sweeps: one condition of a spec standing for several, one per value.

``sweep: {layers: [early, middle, late]}`` on condition NAME replaces it by
NAME-early, NAME-middle and NAME-late (in the spec's order, where NAME
was), each a copy whose fuse stages with ``layers: sweep`` get the value.
Their shared stages (the same training on the same model) are the same
content-addressed steps, so each runs once. A value that is not a name
(``"0-3"``, ``[0, 2]``) gives NAME-0-3, NAME-0_2. Other conditions,
comparisons and the criterion refer to the expanded names.
"""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr, field_validator

SWEEP = "sweep"
_LAYER_TEXT = re.compile(r"^\s*(early|middle|late|all|-?\d+(\s*-\s*-?\d+)?(\s*,\s*-?\d+(\s*-\s*-?\d+)?)*)\s*$")


def check_layers(v: Any, *, allow_sweep: bool = False) -> Any:
    """A ``layers`` value of a fuse stage or a sweep (ValueError otherwise):
    a group name, indices / ranges as text, an integer or a list of integers
    (and ``sweep`` in a stage)."""
    if v is None or (allow_sweep and v == SWEEP):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return v
    if isinstance(v, str) and _LAYER_TEXT.match(v):
        return v.strip()
    raise ValueError(f"layers must be early, middle, late, all, indices like '0-3,8' or a list of integers"
                     + (", or 'sweep'" if allow_sweep else "") + f"; got {v!r}")


def train_layers(v: Any) -> Any:
    """``pyfuse train --layers``: explicit indices (a list, an integer, or text like '8,14,20', '4-7')."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise ValueError(f"must be a list of layer indices or a string like '8,14,20' or '4-7', got {v!r}")
    if isinstance(v, int):
        return [v]
    if isinstance(v, list):
        if not v or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ValueError(f"must be a non-empty list of integers, got {v!r}")
        return v
    if isinstance(v, str):
        if not re.fullmatch(r"\s*-?\d+(\s*-\s*-?\d+)?(\s*,\s*-?\d+(\s*-\s*-?\d+)?)*\s*", v):
            raise ValueError(f"must be layer indices like '8,14,20' or '4-7', got {v!r}")
        return v
    raise ValueError(f"must be a list of layer indices or a string like '8,14,20', got {v!r}")


TrainLayers = typing.Annotated[Any, BeforeValidator(train_layers)]
FuseLayers = typing.Annotated[Any, BeforeValidator(lambda v: check_layers(v, allow_sweep=True))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Sweep(_Strict):
    """One condition per value: ``layers: [early, middle, late]`` makes
    NAME-early, NAME-middle, NAME-late, each with its ``layers: sweep``
    fuse stages set to the value."""

    layers: list[Any] = Field(min_length=1)

    @field_validator("layers", mode="before")
    @classmethod
    def _values(cls, v):
        return [check_layers(x) for x in v] if isinstance(v, list) else v


class BehaviourEval(_Strict):
    """``pyfuse eval behaviour`` (:mod:`pyfuse.evals.behaviour`): the suite
    and its generation settings (None: the suite's)."""

    suite: StrictStr
    samples: typing.Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: typing.Annotated[StrictInt, Field(ge=0)] | None = None
    max_tokens: typing.Annotated[StrictInt, Field(ge=1)] | None = None
    batch_size: typing.Annotated[StrictInt, Field(ge=1)] | None = None


def label(value: Any) -> str:
    """The suffix of a sweep value in the condition's name."""
    if isinstance(value, list):
        return "_".join(str(x) for x in value)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(value).replace(" ", ""))


def expand_sweeps(spec):
    """The spec with every swept condition replaced by its members (in place)."""
    if not any(c.sweep is not None for c in spec.conditions.values()):
        _refuse_stray_sweep(spec.conditions)
        return spec
    out = {}
    for name, cond in spec.conditions.items():
        if cond.sweep is None:
            out[name] = cond
            continue
        stages = [i for i, st in enumerate(cond.stages) if st.kind == "fuse" and st.fuse.layers == SWEEP]
        if not stages:
            raise ValueError(f"conditions.{name}.sweep: no fuse stage has layers: sweep (what the sweep sets)")
        for value in cond.sweep.layers:
            member = f"{name}-{label(value)}"
            if member in spec.conditions or member in out:
                raise ValueError(f"conditions.{name}.sweep: {member!r} is also the name of another condition")
            new_stages = [st.model_copy(update={"fuse": st.fuse.model_copy(update={"layers": value})})
                          if i in stages else st for i, st in enumerate(cond.stages)]
            desc = f"{cond.description + ' ' if cond.description else ''}(layers: {value})"
            out[member] = cond.model_copy(update={"sweep": None, "stages": new_stages, "description": desc})
    _refuse_stray_sweep(out)
    spec.conditions = out
    return spec


def _refuse_stray_sweep(conditions: dict) -> None:
    for name, cond in conditions.items():
        for i, st in enumerate(cond.stages):
            if st.kind == "fuse" and st.fuse.layers == SWEEP:
                raise ValueError(f"conditions.{name}.stages[{i}].fuse.layers: 'sweep' needs a sweep on the "
                                 "condition (sweep: {layers: [...]})")
            if st.kind == "stack" and st.stack.fuse.layers == SWEEP:
                raise ValueError(f"conditions.{name}.stages[{i}].stack.fuse.layers: 'sweep' is for fuse stages")
