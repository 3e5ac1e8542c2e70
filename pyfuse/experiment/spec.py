"""The experiment spec: a YAML file, validated with pydantic, every problem
reported on one line that names the field by its dotted path
(``conditions.A1.stages[2].fuse.policy: must be one of stock, preserve,
stochastic (got 'stok')``).

Layout (every section but ``models`` and ``conditions`` is optional)::

    version: 1
    name: stacking-confound
    seed: 0                         # default training seed
    models: {NAME: PATH, ...}       # mlx-lm model directories
    data: {NAME: PATH, ...}         # MMLU-Pro files (JSONL/Parquet) or mlx-lm training data
    setg:                           # mine Set-G (a step) and split it
      data: NAME                    # the MMLU-Pro file both models are evaluated on
      base: NAME                    # a model or a condition
      persona: NAME                 # a model or a condition (mined with its model; the condition
                                    # is scored on setg.test like any other)
      method: generate              # eval method for mining (generate | logprob)
      train_frac: 0.7               # split seed: from the pre-registration's hash
    defaults:
      train: {TRAIN OPTIONS}        # merged under every train stage
      fuse: {FUSE OPTIONS}
    conditions:
      NAME:
        from: NAME                  # a model, or a condition (its final model)
        stages:                     # in order
          - train: {data: setg, rank: 2, ...}   # train an adapter on the current model
          - zero                                # its zero-delta twin
          - fuse: {policy: stock}               # fuse it -> the new current model
          - stack: {train: {...}, fuse: {...}, zero: false}  # train + [zero] + fuse
        evaluate: [mc, identity]    # default: every suite in `evaluation`
    evaluation:
      mc: {data: setg.test, method: generate, batch_size: 8, max_tokens: 1024, limit: null}
      identity: {suite: PATH, persona_name: ..., max_tokens: ...}
    comparisons: [[A1, A0], {a: A1, b: persona}]
    preregistration:
      hypothesis: TEXT
      criterion: "diff(A1, A0) >= 0.05 and ztest_p(A1, A0) < 0.05"
      kill: TEXT                    # what a failed criterion means
      alpha: 0.05
      power: 0.8
      planned_n: 692
      baseline_accuracy: 0.178      # expected accuracy of the control (power analysis)
    report: {noise_floor: true, noise_floor_outputs: true}

Paths resolve relative to the spec file. Data references: a name from
``data``, or ``setg`` / ``setg.train`` (the Set-G training directory:
train.jsonl + valid.jsonl) and ``setg.test`` / ``setg.valid`` /
``setg.train`` as multiple-choice items for evaluation.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from ..errors import UserError
from ..io.files import read_text

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_NAMES = {"and", "or", "not", "setg"}
STAGE_KINDS = ("train", "zero", "fuse", "stack")
EVAL_SUITES = ("mc", "identity")
POLICIES = ("stock", "preserve", "stochastic")
SETG_SPLITS = ("train", "valid", "test")

TRAIN_DEFAULTS: dict[str, Any] = {
    "fine_tune_type": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "keys": None, "layers": None,
    "iters": 100, "learning_rate": 1e-5, "batch_size": 4, "grad_accumulation": 1,
    "max_seq_length": 2048, "mask_prompt": False, "grad_checkpoint": False, "seed": None,
    "val_batches": 25, "steps_per_eval": 200, "steps_per_report": 10, "optimizer": "adam",
}
FUSE_DEFAULTS: dict[str, Any] = {
    "policy": "stock", "seed": 0, "requant_bits": None, "requant_group_size": None, "only": None,
    "dequantize": False,
}


class SpecError(UserError):
    """A spec that does not validate: ``problems`` is ``[(path, message), ...]``."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{p}: {m}" if p else m for p, m in problems]
        head = f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(head + "\n  " + "\n  ".join(lines) if len(lines) > 1 else f"{source}: {lines[0]}")


# ---------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


PositiveInt = typing.Annotated[StrictInt, Field(ge=1)]


def _number(v: Any) -> Any:
    # YAML 1.1 reads 5e-6 (no dot) as a string: accept numeric strings
    if isinstance(v, bool):
        raise ValueError(f"must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"must be a number, got {v!r}") from None
    return v


class TrainOptions(_Strict):
    """The options of ``pyfuse train`` (every one optional here: unset fields
    come from ``defaults.train``, then from pyfuse train's own defaults)."""

    data: StrictStr | None = None
    fine_tune_type: Literal["lora", "dora"] | None = None
    rank: PositiveInt | None = None
    alpha: float | None = Field(default=None, gt=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    keys: list[StrictStr] | None = None
    layers: Any = None
    iters: PositiveInt | None = None
    learning_rate: float | None = Field(default=None, gt=0)
    batch_size: PositiveInt | None = None
    grad_accumulation: PositiveInt | None = None
    max_seq_length: typing.Annotated[StrictInt, Field(ge=2)] | None = None
    mask_prompt: StrictBool | None = None
    grad_checkpoint: StrictBool | None = None
    seed: typing.Annotated[StrictInt, Field(ge=0)] | None = None
    val_batches: StrictInt | None = None
    steps_per_eval: PositiveInt | None = None
    steps_per_report: PositiveInt | None = None
    optimizer: Literal["adam", "adamw", "sgd", "adafactor"] | None = None

    @field_validator("alpha", "dropout", "learning_rate", mode="before")
    @classmethod
    def _numbers(cls, v):
        return None if v is None else _number(v)

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, v):
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

    @field_validator("val_batches")
    @classmethod
    def _val_batches(cls, v):
        if v is not None and v != -1 and v < 1:
            raise ValueError(f"must be >= 1, or -1 for the whole validation set, got {v}")
        return v


class FuseOptions(_Strict):
    """The options of ``pyfuse fuse`` that shape the fused model."""

    policy: Literal["stock", "preserve", "stochastic"] | None = None
    seed: typing.Annotated[StrictInt, Field(ge=0, lt=2**32)] | None = None
    requant_bits: Literal[2, 3, 4, 5, 6, 8] | None = None
    requant_group_size: Literal[32, 64, 128] | None = None
    only: StrictStr | None = None
    dequantize: StrictBool | None = None

    @field_validator("only")
    @classmethod
    def _regex(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return v


class ZeroOptions(_Strict):
    pass


class StackOptions(_Strict):
    """Train a second adapter on the current model and fuse it (with
    ``zero: true``: fuse its zero-delta twin)."""

    train: TrainOptions
    fuse: FuseOptions = Field(default_factory=FuseOptions)
    zero: StrictBool = False

    @field_validator("fuse", mode="before")
    @classmethod
    def _none_fuse(cls, v):
        return {} if v is None else v


class Stage(_Strict):
    train: TrainOptions | None = None
    zero: ZeroOptions | None = None
    fuse: FuseOptions | None = None
    stack: StackOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, v):
        if isinstance(v, str):
            if v not in STAGE_KINDS:
                raise ValueError(f"unknown stage {v!r} (one of {', '.join(STAGE_KINDS)})")
            return {v: {}}
        if not isinstance(v, dict):
            raise ValueError(f"a stage is a mapping like {{fuse: {{policy: stock}}}} or the word "
                             f"'zero', got {v!r}")
        unknown = [k for k in v if k not in STAGE_KINDS]
        if unknown:
            raise ValueError(f"unknown stage {unknown[0]!r} (one of {', '.join(STAGE_KINDS)})")
        if len(v) != 1:
            raise ValueError(f"a stage has exactly one of {', '.join(STAGE_KINDS)}; got {', '.join(v)}")
        (kind, opts), = v.items()
        return {kind: {} if opts is None else opts}

    @property
    def kind(self) -> str:
        for k in STAGE_KINDS:
            if getattr(self, k) is not None:
                return k
        raise AssertionError("empty stage")


class Condition(_Strict):
    from_: StrictStr = Field(alias="from")
    stages: list[Stage] = Field(default_factory=list)
    evaluate: list[Literal["mc", "identity"]] | None = None
    description: StrictStr | None = None

    @field_validator("stages", mode="before")
    @classmethod
    def _none_stages(cls, v):
        return [] if v is None else v


class MCEval(_Strict):
    data: StrictStr
    method: Literal["generate", "logprob"] = "generate"
    batch_size: PositiveInt = 8
    max_tokens: PositiveInt = 1024
    limit: PositiveInt | None = None
    system_prompt: StrictStr | None = None


class IdentityEval(_Strict):
    suite: StrictStr | None = None  # None: the template (needs persona_name)
    persona_name: StrictStr | None = None
    aliases: list[StrictStr] | None = None
    base_names: list[StrictStr] | None = None
    vendors: list[StrictStr] | None = None
    system_prompt: StrictStr | None = None
    max_tokens: PositiveInt | None = None
    batch_size: PositiveInt = 8


class Evaluation(_Strict):
    mc: MCEval | None = None
    identity: IdentityEval | None = None


class SetG(_Strict):
    data: StrictStr
    base: StrictStr
    persona: StrictStr
    method: Literal["generate", "logprob"] = "generate"
    batch_size: PositiveInt = 8
    max_tokens: PositiveInt = 1024
    limit: PositiveInt | None = None
    train_frac: float = Field(default=0.7, gt=0, lt=1)
    seed: typing.Annotated[StrictInt, Field(ge=0)] | None = None

    @field_validator("train_frac", mode="before")
    @classmethod
    def _tf(cls, v):
        return _number(v)


class Comparison(_Strict):
    a: StrictStr
    b: StrictStr

    @model_validator(mode="before")
    @classmethod
    def _pair(cls, v):
        if isinstance(v, (list, tuple)):
            if len(v) != 2:
                raise ValueError(f"a comparison is a pair [A, B] or {{a: A, b: B}}, got {v!r}")
            return {"a": v[0], "b": v[1]}
        return v


class Preregistration(_Strict):
    hypothesis: StrictStr = Field(min_length=1)
    criterion: StrictStr = Field(min_length=1)
    kill: StrictStr | None = None
    alpha: float = Field(default=0.05, gt=0, lt=1)
    power: float = Field(default=0.8, gt=0, lt=1)
    planned_n: typing.Annotated[StrictInt, Field(ge=2)] | None = None
    baseline_accuracy: float | None = Field(default=None, gt=0, lt=1)

    @field_validator("alpha", "power", "baseline_accuracy", mode="before")
    @classmethod
    def _numbers(cls, v):
        return None if v is None else _number(v)

    @field_validator("criterion")
    @classmethod
    def _parses(cls, v):
        from .criterion import CriterionError, parse

        try:
            parse(v)
        except CriterionError as err:
            raise ValueError(str(err)) from None
        return v


class Defaults(_Strict):
    train: TrainOptions = Field(default_factory=TrainOptions)
    fuse: FuseOptions = Field(default_factory=FuseOptions)


class ReportOptions(_Strict):
    noise_floor: StrictBool = True
    noise_floor_outputs: StrictBool = True


class Spec(_Strict):
    version: Literal[1] = 1
    name: StrictStr | None = None
    description: StrictStr | None = None
    seed: typing.Annotated[StrictInt, Field(ge=0)] = 0
    models: dict[StrictStr, StrictStr] = Field(min_length=1)
    data: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    setg: SetG | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    conditions: dict[StrictStr, Condition] = Field(min_length=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    comparisons: list[Comparison] = Field(default_factory=list)
    preregistration: Preregistration | None = None
    report: ReportOptions = Field(default_factory=ReportOptions)

    # filled by load_spec
    _path: Path | None = None

    @field_validator("models", "data", "conditions", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return {} if v is None else v

    @field_validator("comparisons", mode="before")
    @classmethod
    def _none_list(cls, v):
        return [] if v is None else v

    @property
    def base_dir(self) -> Path:
        return self._path.parent if self._path is not None else Path.cwd()

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else (self.base_dir / p)))


# ---------------------------------------------------------------------------
# Errors, reformatted
# ---------------------------------------------------------------------------


def format_loc(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_at(loc) -> type[BaseModel] | None:
    """The pydantic model class at ``loc`` (for 'unknown field' hints)."""
    tp: Any = Spec
    for part in loc:
        tp = _unwrap(tp)
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


def _unwrap(tp):
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
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


def load_spec(path: str | Path, *, check_paths: bool = True) -> "Spec":
    """Read, validate and cross-check a spec file. Raises :class:`SpecError`
    listing every problem (one line each, named by field path); with
    ``check_paths`` missing model/data/suite paths are problems too (else
    see :func:`missing_paths`)."""
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


# ---------------------------------------------------------------------------
# Cross-checks: names, references, stage order, cycles
# ---------------------------------------------------------------------------


def _data_ref_problem(spec: Spec, ref: str, *, training: bool) -> str | None:
    if ref in spec.data:
        return None
    if ref.startswith("setg") and ref in ({"setg", "setg.train"} if training else
                                          {f"setg.{s}" for s in SETG_SPLITS}):
        return None if spec.setg is not None else f"{ref!r} needs a setg section"
    known = sorted(spec.data) + (["setg"] if training else [f"setg.{s}" for s in SETG_SPLITS])
    return f"unknown data {ref!r} (known: {', '.join(known)})"


def condition_stages(spec: Spec, name: str) -> list[tuple[str, str, dict]]:
    """The condition's stages expanded (``stack`` -> train, [zero], fuse) as
    ``(path, kind, options)`` with options resolved against the defaults."""
    out = []
    cond = spec.conditions[name]
    for i, st in enumerate(cond.stages):
        where = f"conditions.{name}.stages[{i}]"
        kind = st.kind
        if kind == "train":
            out.append((f"{where}.train", "train", resolve_train(spec, st.train)))
        elif kind == "zero":
            out.append((f"{where}.zero", "zero", {}))
        elif kind == "fuse":
            out.append((f"{where}.fuse", "fuse", resolve_fuse(spec, st.fuse)))
        else:
            out.append((f"{where}.stack.train", "train", resolve_train(spec, st.stack.train)))
            if st.stack.zero:
                out.append((f"{where}.stack.zero", "zero", {}))
            out.append((f"{where}.stack.fuse", "fuse", resolve_fuse(spec, st.stack.fuse)))
    return out


def _merged(defaults: BaseModel, stage: BaseModel, builtin: dict) -> dict:
    out = dict(builtin)
    for src in (defaults, stage):
        for k in src.model_fields_set:
            v = getattr(src, k)
            if v is not None:
                out[k] = v
    return out


def resolve_train(spec: Spec, opts: TrainOptions) -> dict:
    out = _merged(spec.defaults.train, opts, {"data": None, **TRAIN_DEFAULTS})
    if out["seed"] is None:
        out["seed"] = spec.seed
    for k in ("alpha", "dropout", "learning_rate"):
        out[k] = float(out[k])
    return out


def resolve_fuse(spec: Spec, opts: FuseOptions) -> dict:
    return _merged(spec.defaults.fuse, opts, FUSE_DEFAULTS)


def evaluated_suites(spec: Spec, name: str) -> list[str]:
    cond = spec.conditions[name]
    if cond.evaluate is not None:
        return list(dict.fromkeys(cond.evaluate))
    return [s for s in EVAL_SUITES if getattr(spec.evaluation, s) is not None]


def check_references(spec: Spec) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for section in ("models", "data", "conditions"):
        for name in getattr(spec, section):
            if not NAME_RE.match(name):
                problems.append((f"{section}.{name}", "a name is letters, digits, '_' and '-' "
                                 "(starting with a letter or digit)"))
            elif name.lower() in RESERVED_NAMES:
                problems.append((f"{section}.{name}", f"{name!r} is a reserved word"))
    for name in spec.conditions:
        if name in spec.models:
            problems.append((f"conditions.{name}", f"{name!r} is also a model name; a condition needs "
                             "its own name"))

    # `from` references and stage order
    for name, cond in spec.conditions.items():
        src = cond.from_
        if src not in spec.models and src not in spec.conditions:
            problems.append((f"conditions.{name}.from", f"unknown model or condition {src!r} (models: "
                             f"{', '.join(spec.models)}; conditions: {', '.join(spec.conditions)})"))
        elif src in spec.conditions and ends_with_adapter(spec, src):
            problems.append((f"conditions.{name}.from", f"condition {src!r} ends with an unfused adapter; "
                             "a condition can only start from a model (add a fuse stage to it)"))
        pending = False
        for where, kind, opts in condition_stages(spec, name):
            if kind == "train":
                if pending:
                    problems.append((where, "the previous stage's adapter is not fused yet; add a fuse "
                                     "stage before training another adapter"))
                if opts["data"] is None:
                    problems.append((f"{where}.data", "required (here or in defaults.train)"))
                else:
                    p = _data_ref_problem(spec, opts["data"], training=True)
                    if p:
                        problems.append((f"{where}.data", p))
                pending = True
            elif kind in ("zero", "fuse"):
                if not pending:
                    problems.append((where, f"a {kind} stage needs an adapter: put it after a train stage"))
                if kind == "fuse":
                    pending = False
        for i, suite in enumerate(cond.evaluate or []):
            if getattr(spec.evaluation, suite) is None:
                problems.append((f"conditions.{name}.evaluate[{i}]", f"no evaluation.{suite} is defined"))

    # setg
    if spec.setg is not None:
        if spec.setg.data not in spec.data:
            problems.append(("setg.data", f"unknown data {spec.setg.data!r} (known: {', '.join(spec.data) or 'none'})"))
        for role in ("base", "persona"):
            ref = getattr(spec.setg, role)
            if ref not in spec.models and ref not in spec.conditions:
                problems.append((f"setg.{role}", f"unknown model or condition {ref!r}"))
        if spec.preregistration is not None and spec.setg.seed is not None:
            problems.append(("setg.seed", "the split seed is derived from the pre-registration's hash; "
                             "remove setg.seed"))

    # evaluation data
    if spec.evaluation.mc is not None:
        p = _data_ref_problem(spec, spec.evaluation.mc.data, training=False)
        if p:
            problems.append(("evaluation.mc.data", p))
    if spec.evaluation.identity is not None:
        ident = spec.evaluation.identity
        if ident.suite is None and ident.persona_name is None:
            problems.append(("evaluation.identity", "give a suite (a YAML file) or persona_name (for the "
                             "built-in template)"))

    # comparisons
    mc_conditions = {n for n in spec.conditions if "mc" in evaluated_suites(spec, n)}
    for i, cmp in enumerate(spec.comparisons):
        for side in ("a", "b"):
            ref = getattr(cmp, side)
            if ref not in spec.conditions:
                problems.append((f"comparisons[{i}].{side}", f"unknown condition {ref!r}"))
            elif ref not in mc_conditions:
                problems.append((f"comparisons[{i}].{side}", f"condition {ref!r} is not evaluated on "
                                 "multiple choice (evaluation.mc)"))
        if cmp.a == cmp.b:
            problems.append((f"comparisons[{i}]", "compares a condition with itself"))

    # the criterion's names
    if spec.preregistration is not None:
        from .criterion import parse

        crit = parse(spec.preregistration.criterion)
        ident_conditions = {n for n in spec.conditions if "identity" in evaluated_suites(spec, n)}
        for stat in crit.stats():
            for ref in stat.args:
                if ref not in spec.conditions:
                    problems.append(("preregistration.criterion", f"{stat}: unknown condition {ref!r}"))
                elif stat.func == "identity" and ref not in ident_conditions:
                    problems.append(("preregistration.criterion", f"{stat}: condition {ref!r} has no "
                                     "identity evaluation"))
                elif stat.func != "identity" and ref not in mc_conditions:
                    problems.append(("preregistration.criterion", f"{stat}: condition {ref!r} is not "
                                     "evaluated on multiple choice (evaluation.mc)"))

    if not problems:
        cycle = find_cycle(spec)
        if cycle:
            problems.append(cycle)
    return problems


def ends_with_adapter(spec: Spec, name: str) -> bool:
    stages = condition_stages(spec, name)
    pending = False
    for _, kind, _ in stages:
        if kind == "train":
            pending = True
        elif kind == "fuse":
            pending = False
    return pending


def dependencies(spec: Spec) -> dict[str, dict[str, str]]:
    """The entity graph: ``node -> {node it needs: the field that says so}``.

    Nodes: ``model:NAME`` (a condition's model: its ``from``, then its
    stages), ``eval:NAME`` (the condition's evaluations, of that model) and
    ``setg`` (both Set-G models evaluated on ``setg.data``, then mined and
    split). A condition's model and its evaluations are separate nodes: Set-G
    is mined with the *models* of ``setg.base`` and ``setg.persona``, so those
    conditions can be evaluated on ``setg.*`` like any other (their models
    come first, their evaluations after the split); a condition whose model
    needs Set-G (a stage that trains on it) while Set-G needs that model is a
    real cycle."""
    deps: dict[str, dict[str, str]] = {}
    for name, cond in spec.conditions.items():
        d: dict[str, str] = {}
        if cond.from_ in spec.conditions:
            d[f"model:{cond.from_}"] = f"conditions.{name}.from"
        for where, kind, opts in condition_stages(spec, name):
            if kind == "train" and opts["data"] in ("setg", "setg.train"):
                d.setdefault("setg", f"{where}.data")
        deps[f"model:{name}"] = d
        e = {f"model:{name}": f"conditions.{name}"}
        if spec.evaluation.mc is not None and spec.evaluation.mc.data.startswith("setg.") \
                and spec.evaluation.mc.data not in spec.data and "mc" in evaluated_suites(spec, name):
            e["setg"] = "evaluation.mc.data"
        deps[f"eval:{name}"] = e
    if spec.setg is not None:
        d = {}
        for role in ("base", "persona"):
            ref = getattr(spec.setg, role)
            if ref in spec.conditions:
                d.setdefault(f"model:{ref}", f"setg.{role}")
        deps["setg"] = d
    return deps


def _node_label(node: str) -> str:
    kind, _, name = node.partition(":")
    return {"model": name, "eval": f"{name} (evaluation)"}.get(kind, node)


def _edge_reason(src: str, dst: str) -> str:
    s, d = _node_label(src), _node_label(dst)
    if dst == "setg":
        return f"{s} {'trains' if src.startswith('model:') else 'is evaluated'} on Set-G"
    if src == "setg":
        return f"Set-G is mined with {d}'s model"
    return f"{s} starts from {d}"


def find_cycle(spec: Spec) -> tuple[str, str] | None:
    """The first circular reference of :func:`dependencies`, as ``(field,
    message)``: the field is that of the cycle's first edge (e.g.
    ``conditions.C1.from``; through Set-G, the field that needs Set-G, e.g.
    ``conditions.P.stages[0].train.data``)."""
    deps = dependencies(spec)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == 1:
                ring = stack[stack.index(nxt):]
                if "setg" in ring:  # start at what needs Set-G: the field that closes the loop
                    i = (ring.index("setg") - 1) % len(ring)
                    ring = ring[i:] + ring[:i]
                cyc = ring + [ring[0]]
                edges = list(zip(cyc, cyc[1:]))
                text = "circular reference: " + " -> ".join(_node_label(n) for n in cyc)
                if "setg" in cyc:
                    text += " (" + "; ".join(_edge_reason(a, b) for a, b in edges) + ")"
                return deps[edges[0][0]][edges[0][1]], text
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(deps):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def missing_paths(spec: Spec) -> list[tuple[str, str, Path]]:
    """``(field path, what, resolved path)`` of every path that does not exist."""
    out = []
    for name, p in spec.models.items():
        r = spec.resolve(p)
        if not r.is_dir():
            out.append((f"models.{name}", "model directory" if not r.exists() else "model directory (not a "
                        "directory)", r))
    for name, p in spec.data.items():
        r = spec.resolve(p)
        if not r.exists():
            out.append((f"data.{name}", "data path", r))
    ident = spec.evaluation.identity
    if ident is not None and ident.suite is not None:
        r = spec.resolve(ident.suite)
        if not r.is_file():
            out.append(("evaluation.identity.suite", "identity suite", r))
    return out


def check_suite(spec: Spec) -> list[tuple[str, str]]:
    """Load the identity suite (when it exists) with the spec's overrides."""
    ident = spec.evaluation.identity
    if ident is None:
        return []
    path = spec.resolve(ident.suite) if ident.suite is not None else None
    if path is not None and not path.is_file():
        return []
    from ..evals.identity import load_suite

    try:
        load_suite(path, persona_name=ident.persona_name, aliases=ident.aliases, base_names=ident.base_names,
                   vendors=ident.vendors, system_prompt=ident.system_prompt, max_tokens=ident.max_tokens)
    except UserError as err:
        return [("evaluation.identity.suite", str(err))]
    return []
