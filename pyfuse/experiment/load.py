"""Reading a spec file: YAML (duplicate keys refused, errors with their
line), the schema of :mod:`.spec` (pydantic's errors reworded, one line
each, named by the field's dotted path), then the cross-checks of
:mod:`.validate`; every problem at once, as one :class:`SpecError`."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from ..io.files import read_text
from .spec import MC_TAGS, Spec, SpecError
from .validate import check_references, check_suite, missing_paths


# ---------------------------------------------------------------------------
# pydantic's errors, reworded
# ---------------------------------------------------------------------------


def format_loc(loc) -> str:
    out = ""
    for i, part in enumerate(loc):
        if part in MC_TAGS and i and loc[i - 1] == "mc":
            continue  # the tag of evaluation.mc's one-or-several union is not a field
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(loc) -> type[BaseModel] | None:
    """The pydantic model class at ``loc`` (for 'unknown field' hints)."""
    tp: Any = Spec
    for i, part in enumerate(loc):
        if part in MC_TAGS and i and loc[i - 1] == "mc":
            continue
        tp = _unwrap(tp, indexed=isinstance(part, int))
        if tp is None:
            return None
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = None
            for name, f in tp.model_fields.items():
                if part in (name, f.alias):
                    field = f
                    break
            if field is None:
                return None
            tp = field.annotation
            continue
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is dict:
            tp = args[1]
        elif origin is list:
            tp = args[0]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp, indexed: bool = False):
    """``tp`` without Annotated and Optional; of a one-or-several union
    (``evaluation.mc``) the list when the location goes on with an index,
    else the single."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) > 1:
                lists = [a for a in args if typing.get_origin(_unwrap(a)) is list]
                args = lists if indexed and lists else [a for a in args if a not in lists] or args
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(err: dict) -> str:
    kind = err["type"]
    value = err.get("input")
    scalar = not isinstance(value, (dict, list))
    got = f" (got {_short(value)})" if scalar else ""
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        model = _model_at(err["loc"][:-1])
        if model is not None:
            known = [f.alias or n for n, f in model.model_fields.items()]
            return f"unknown field (known: {', '.join(known)})" if known else "unknown field (this takes no options)"
        return "unknown field"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'\"") for c in re.split(r",\s*|\s+or\s+", expected) if c.strip()]
        return f"must be one of {', '.join(choices)}{got}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be an integer{got}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number{got}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false{got}"
    if kind == "string_type":
        return f"must be a string{got}"
    if kind == "list_type":
        return f"must be a list{got}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping{got}"
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = msg.replace("Input should be", "must be").replace("Dictionary", "mapping")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short",
                "too_long"):
        msg += got
    return msg


def validation_problems(err: ValidationError) -> list[tuple[str, str]]:
    seen = set()
    out = []
    for e in err.errors():
        loc = e["loc"]
        # Stage's before-validator errors come at the stage itself
        item = (format_loc(loc), _message(e))
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node, deep=False):
    keys = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {keys[key] + 1})", key_node.start_mark)
        keys[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        raise UserError(f"{source}: not valid YAML ({where}{problem}"
                        + (f", {context}" if context and "duplicate" not in problem else "") + ")") from None


def load_spec(path: str | Path, *, check_paths: bool = True) -> Spec:
    """Read, validate and cross-check a spec file. Raises :class:`SpecError`
    listing every problem (one line each, named by field path); with
    ``check_paths`` missing model/data/suite paths are problems too (else
    see :func:`~pyfuse.experiment.validate.missing_paths`)."""
    path = Path(path)
    raw = parse_yaml(read_text(path, "a YAML spec"), str(path))
    return spec_from_dict(raw, source=str(path), path=path, check_paths=check_paths)


def spec_from_dict(raw: Any, *, source: str = "spec", path: Path | None = None,
                   check_paths: bool = True) -> Spec:
    if raw is None:
        raise SpecError(source, [("", "the spec is empty")])
    if not isinstance(raw, dict):
        raise SpecError(source, [("", f"the spec must be a YAML mapping, got {type(raw).__name__}")])
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(source, validation_problems(err)) from None
    spec._path = path.resolve() if path is not None else None
    problems = check_references(spec)
    if check_paths:
        problems += [(p, f"{what} does not exist: {resolved}") for p, what, resolved in missing_paths(spec)]
    if problems:
        raise SpecError(source, problems)
    return spec


def load_checked_spec(path: str | Path, *, check_paths: bool = True) -> Spec:
    """:func:`load_spec`, then the identity suite's own checks: the spec
    that ``pyfuse experiment validate`` accepts and ``run`` runs."""
    spec = load_spec(path, check_paths=check_paths)
    problems = check_suite(spec)
    if problems:
        raise SpecError(str(path), problems)
    return spec
