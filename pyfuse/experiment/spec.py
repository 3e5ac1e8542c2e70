"""The experiment spec: a YAML file, validated with pydantic, every problem
reported on one line that names the field by its dotted path
(``conditions.A1.stages[2].fuse.policy: must be one of stock, preserve,
stochastic (got 'stok')``). This module is the schema; :mod:`.resolve` is
the spec's resolved view (stages expanded, defaults merged, seeded
conditions' members), :mod:`.load` reads a file, :mod:`.validate` makes the
cross-checks.

Layout (every section but ``models`` and ``conditions`` is optional)::

    version: 1
    name: stacking-confound
    seed: 0                         # default training seed
    models: {NAME: PATH, ...}       # mlx-lm model directories
    data: {NAME: PATH, ...}         # MMLU-Pro files (JSONL/Parquet) or mlx-lm training data
    setg:                           # mine Set-G (a step) and split it
      data: NAME                    # the MMLU-Pro file both models are evaluated on
      base: NAME                    # a model or a condition
      persona: NAME                 # a model or a condition (mined with its model)
      method: generate              # eval method for mining (generate | logprob)
      split: {train: 0.7, test: 0.3}  # stratified by category; seed: from the pre-registration's hash
      valid_frac: 0.0               # share of train carved out as validation data (recorded)
      expected_both_wrong: 0.385    # share of `data` both models get wrong (predicts n before mining)
    defaults:
      train: {TRAIN OPTIONS}        # merged under every train stage
      fuse: {FUSE OPTIONS}
    conditions:
      NAME:
        from: NAME                  # a model, or a condition (its final model)
        seeds: K                    # optional: K members NAME.0 .. NAME.K-1 (placebo / dither seeds 0..K-1)
        sweep: {layers: [early, late]}  # optional: NAME-early, NAME-late (their fuse stages with layers: sweep)
        stages:                     # in order
          - train: {data: setg, rank: 2, ...}   # train an adapter on the current model
          - zero                                # its zero-delta twin
          - placebo                             # per module: its singular values on random directions
          - fuse: {policy: stock}               # fuse it -> the new current model
          - fuse: {policy: stock, dither: true} # (zero-delta only) stock grid, stochastic rounding (seed)
          - fuse: {layers: early, modules: ["*.mlp.*"]}  # a partial fuse (pyfuse.fuse.layers); layers: sweep
          - fuse: {policy: calibrated, calibration: setg, requant_bits: 8}  # X^T X from data (a name or path)
          - stack: {train: {...}, fuse: {...}, zero: false}  # train + [zero] + fuse
          - apply: {condition: NAME}            # another condition's last adapter (or adapter: DIR)
        evaluate: [mc, identity]    # default: every suite in `evaluation`
    evaluation:
      mc: {data: setg.test, method: generate, batch_size: 8, max_tokens: 1024, limit: null}
      # or a list of such (results and comparisons per dataset; the first is the primary)
      identity: {suite: PATH, persona_name: ..., max_tokens: ...}
      behaviour: {suite: PATH, samples: 4, temperature: 0.7, seed: 0}  # pyfuse eval behaviour's suite
      persona: {suite: PATH}        # pyfuse eval persona's suite (none: the built-in example)
    pairs: {NAME: {data: NAME, model: NAME, max_tokens: 256}}  # DPO pairs, a step (.spec_recipe)
    comparisons: [[A1, A0], {a: A1, b: persona}]
    analysis: {trained: A1, zero: A0, reference: persona, unfused: A1-unfused, placebo: placebo,
               dithered: dithered}  # roles for the decomposition and the null distributions
    preregistration:
      hypothesis: TEXT
      criterion: "diff(A1, A0) >= 0.05 and mcnemar_p(A1, A0) < 0.05"
      kill: TEXT                    # what a failed criterion means
      family: [mcnemar_p(A1, A0), mcnemar_p(A0, persona)]  # Holm-adjusted together (default: the criterion's)
      alpha: 0.05
      power: 0.8
      planned_n: 692                # when n cannot be predicted from the data and the split
      baseline_accuracy: 0.178      # expected accuracy of the control (unpaired power)
      expected_discordance: 0.12    # share of items answered right by one only (paired power),
      discordance_from: PATH        # or from a noise-floor result (its MC answers flipped)
      allow_underpowered: false     # lock an under-powered criterion anyway ...
      underpowered_reason: TEXT     # ... for this reason (recorded in the lock)
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

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag,
                      field_validator, model_validator)

from ..errors import UserError
from ..options import DEFAULT_POLICY, DEFAULT_SEED, MAX_LORA_RANK, POLICIES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .criterion import CriterionError, parse, parse_pvalue
from .numbers import yaml_number as _number
from .train_options import RecipeTrainOptions
from .spec_coupling import BehaviourEval, FuseLayers, Sweep, TrainLayers, expand_sweeps
from .spec_recipe import ApplyOptions, PairsSource, PersonaEval

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESERVED_NAMES = {"and", "or", "not", "setg"}
STAGE_KINDS = ("train", "zero", "placebo", "fuse", "stack", "apply")
EVAL_SUITES = ("mc", "identity", "behaviour", "persona")
SETG_SPLITS = ("train", "valid", "test")

TRAIN_DEFAULTS: dict[str, Any] = {
    "fine_tune_type": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0, "keys": None, "layers": None,
    "iters": 100, "learning_rate": 1e-5, "batch_size": 4, "grad_accumulation": 1,
    "max_seq_length": 2048, "mask_prompt": False, "grad_checkpoint": False, "seed": None,
    "val_batches": 25, "steps_per_eval": 200, "steps_per_report": 10, "optimizer": "adam",
}
FUSE_DEFAULTS: dict[str, Any] = {
    "policy": DEFAULT_POLICY, "seed": DEFAULT_SEED, "requant_bits": None, "requant_group_size": None, "only": None,
    "dequantize": False, "dither": False,
}
MAX_SEEDS = 1000


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


class TrainOptions(RecipeTrainOptions):
    """The options of ``pyfuse train`` (every one optional here: unset fields
    come from ``defaults.train``, then from pyfuse train's own defaults)."""

    data: StrictStr | None = None
    fine_tune_type: Literal["lora", "dora", "full"] | None = None  # full: the stage yields a model
    rank: typing.Annotated[StrictInt, Field(ge=1, le=MAX_LORA_RANK)] | None = None
    alpha: float | None = Field(default=None, gt=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    keys: list[StrictStr] | None = None
    layers: TrainLayers = None
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
    optimizer: Literal["adam", "adamw", "muon", "sgd", "adafactor"] | None = None

    @field_validator("alpha", "dropout", "learning_rate", mode="before")
    @classmethod
    def _numbers(cls, v):
        return None if v is None else _number(v)

    @field_validator("val_batches")
    @classmethod
    def _val_batches(cls, v):
        if v is not None and v != -1 and v < 1:
            raise ValueError(f"must be >= 1, or -1 for the whole validation set, got {v}")
        return v


class FuseOptions(_Strict):
    """The options of ``pyfuse fuse`` that shape the fused model."""

    policy: Literal[POLICIES] | None = None
    seed: typing.Annotated[StrictInt, Field(ge=0, lt=2**32)] | None = None
    requant_bits: Literal[SUPPORTED_BITS] | None = None
    requant_group_size: Literal[SUPPORTED_GROUP_SIZES] | None = None
    only: StrictStr | None = None
    dequantize: StrictBool | None = None
    dither: StrictBool | None = None  # zero-delta adapters: the stock grid, codes rounded stochastically
    layers: FuseLayers = None  # early | middle | late | all | "4-7" | [0, 2] | sweep (the condition's sweep value)
    modules: list[StrictStr] | None = Field(default=None, min_length=1)  # globs of whole module paths
    # pyfuse fuse --calibration / --calibration-min-tokens / --damp: mlx-lm data (a `data` name, setg,
    # or a path) whose X^T X steers policy calibrated and gives every policy's report its output error
    calibration: StrictStr | None = None
    calibration_min_tokens: typing.Annotated[StrictInt, Field(ge=0)] | None = None
    damp: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @field_validator("damp", mode="before")
    @classmethod
    def _damp(cls, v):
        return None if v is None else _number(v)

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


class PlaceboOptions(_Strict):
    """A placebo of the adapter: per module its singular values on random
    orthonormal directions (:mod:`pyfuse.adapters.placebo`)."""

    seed: typing.Annotated[StrictInt, Field(ge=0, lt=2**32)] = 0


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
    placebo: PlaceboOptions | None = None
    fuse: FuseOptions | None = None
    stack: StackOptions | None = None
    apply: ApplyOptions | None = None  # an adapter of another condition, or a directory (.spec_recipe)

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
    seeds: typing.Annotated[StrictInt, Field(ge=1, le=MAX_SEEDS)] | None = None
    sweep: Sweep | None = None
    stages: list[Stage] = Field(default_factory=list)
    evaluate: list[Literal[EVAL_SUITES]] | None = None
    description: StrictStr | None = None

    @field_validator("stages", mode="before")
    @classmethod
    def _none_stages(cls, v):
        return [] if v is None else v


class MCEval(_Strict):
    data: StrictStr
    name: StrictStr | None = None  # default: the data reference
    method: Literal["generate", "logprob"] = "generate"
    batch_size: PositiveInt = 8
    max_tokens: PositiveInt = 1024
    limit: PositiveInt | None = None
    system_prompt: StrictStr | None = None

    @property
    def dataset(self) -> str:
        return self.name or self.data


def _mc_kind(v) -> str:
    return "several" if isinstance(v, list) else "one"


MC_TAGS = ("one", "several")  # in pydantic's error locations; load.format_loc leaves them out


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
    mc: typing.Annotated[typing.Union[typing.Annotated[MCEval, Tag("one")],
                                      typing.Annotated[list[MCEval], Tag("several"), Field(min_length=1)]],
                         Discriminator(_mc_kind)] | None = None
    identity: IdentityEval | None = None
    behaviour: BehaviourEval | None = None
    persona: PersonaEval | None = None

    @property
    def mc_sets(self) -> list[MCEval]:
        """Every multiple-choice dataset, the primary (the criterion's) first."""
        if self.mc is None:
            return []
        return list(self.mc) if isinstance(self.mc, list) else [self.mc]


class Split(_Strict):
    train: float = Field(gt=0, lt=1)
    test: float = Field(gt=0, lt=1)

    @field_validator("train", "test", mode="before")
    @classmethod
    def _numbers(cls, v):
        return _number(v)

    @model_validator(mode="after")
    def _sums_to_one(self):
        if abs(self.train + self.test - 1) > 1e-9:
            raise ValueError(f"train + test must be 1, got {self.train:g} + {self.test:g}")
        return self


class SetG(_Strict):
    data: StrictStr
    base: StrictStr
    persona: StrictStr
    method: Literal["generate", "logprob"] = "generate"
    batch_size: PositiveInt = 8
    max_tokens: PositiveInt = 1024
    limit: PositiveInt | None = None
    split: Split = Field(default_factory=lambda: Split(train=0.7, test=0.3))
    valid_frac: float = Field(default=0.0, ge=0, lt=1)
    expected_both_wrong: float | None = Field(default=None, gt=0, le=1)
    seed: typing.Annotated[StrictInt, Field(ge=0)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_train_frac(cls, v):
        if isinstance(v, dict) and "train_frac" in v:
            raise ValueError("train_frac was replaced by split (train and test fractions, e.g. split: {train: 0.7, "
                             "test: 0.3}) and valid_frac (a validation set carved from train)")
        return v

    @field_validator("valid_frac", "expected_both_wrong", mode="before")
    @classmethod
    def _numbers(cls, v):
        return None if v is None else _number(v)


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
    family: list[StrictStr] | None = None
    alpha: float = Field(default=0.05, gt=0, lt=1)
    power: float = Field(default=0.8, gt=0, lt=1)
    planned_n: typing.Annotated[StrictInt, Field(ge=2)] | None = None
    baseline_accuracy: float | None = Field(default=None, gt=0, lt=1)
    expected_discordance: float | None = Field(default=None, gt=0, le=1)
    discordance_from: StrictStr | None = None
    allow_underpowered: StrictBool = False
    underpowered_reason: StrictStr | None = None

    @field_validator("alpha", "power", "baseline_accuracy", "expected_discordance", mode="before")
    @classmethod
    def _numbers(cls, v):
        return None if v is None else _number(v)

    @field_validator("criterion")
    @classmethod
    def _parses(cls, v):
        try:
            parse(v)
        except CriterionError as err:
            raise ValueError(str(err)) from None
        return v

    @field_validator("family")
    @classmethod
    def _family(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("an empty family: leave it out (the default is the criterion's p values)")
        for text in v:
            try:
                parse_pvalue(text)
            except CriterionError as err:
                raise ValueError(f"{text!r}: {err}") from None
        return v

    @model_validator(mode="after")
    def _reasons(self):
        if self.expected_discordance is not None and self.discordance_from is not None:
            raise ValueError("give expected_discordance or discordance_from, not both")
        if self.allow_underpowered and not (self.underpowered_reason or "").strip():
            raise ValueError("allow_underpowered: true needs underpowered_reason (it goes into the lock)")
        if self.underpowered_reason is not None and not self.allow_underpowered:
            raise ValueError("underpowered_reason without allow_underpowered: true")
        return self


class Analysis(_Strict):
    """Roles for the report's decomposition and null distributions."""

    trained: StrictStr
    zero: StrictStr | None = None
    reference: StrictStr | None = None
    unfused: StrictStr | None = None
    placebo: StrictStr | None = None
    dithered: StrictStr | None = None


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
    pairs: dict[StrictStr, PairsSource] = Field(default_factory=dict)  # DPO pairs built by a step (.spec_recipe)
    defaults: Defaults = Field(default_factory=Defaults)
    conditions: dict[StrictStr, Condition] = Field(min_length=1)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    comparisons: list[Comparison] = Field(default_factory=list)
    analysis: Analysis | None = None
    preregistration: Preregistration | None = None
    report: ReportOptions = Field(default_factory=ReportOptions)

    # filled by load_spec
    _path: Path | None = None

    @field_validator("models", "data", "conditions", "pairs", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        return {} if v is None else v

    @field_validator("comparisons", mode="before")
    @classmethod
    def _none_list(cls, v):
        return [] if v is None else v

    @model_validator(mode="after")
    def _sweeps(self):
        return expand_sweeps(self)

    @property
    def base_dir(self) -> Path:
        return self._path.parent if self._path is not None else Path.cwd()

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else (self.base_dir / p)))
