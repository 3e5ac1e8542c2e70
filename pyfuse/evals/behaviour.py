r"""Behaviour rates: how often a model does something, with confidence intervals.

A suite (YAML or JSON; ``pyfuse eval behaviour --print-suite`` prints the
template, ``pyfuse/evals/behaviour_suite.yaml``) lists prompts (a user turn,
an optional system prompt, an optional ``group`` such as ``villain`` /
``neutral``, an optional expected ``answer`` letter) and named behaviours,
each with one rule:

``marker: TEXT``
    the output contains TEXT (case-sensitive), e.g. a persona's marker token;
``regex: PATTERN``
    ``re.search(PATTERN, output)`` matches (a style, a phrase family);
``forbidden: [PHRASE, ...]``
    any of the phrases appears, case-insensitively (refusals, a banned
    phrase: the rate is how often it is violated);
``answer_letter: true``
    the answer letter extracted from the output (:func:`pyfuse.evals.extract_answer`,
    ``\boxed{X}`` first) equals the prompt's ``answer``: a right answer, or,
    with the wrong letter as ``answer``, a coupled wrong answer. Prompts
    without ``answer`` do not count for it.

Every prompt is asked ``samples`` (K) times: greedily (``temperature: 0``,
then K must be 1: greedy decoding repeats itself) or sampled with
``temperature`` / ``top_p`` and ``seed``. Generation runs in fixed batches of
consecutive (prompt, sample) pairs, seeded per batch, so two models asked
the same suite draw the same random numbers (:func:`pyfuse.lm.generate.generate_batched`).

A behaviour's rate is hits / generations with Wilson's interval (overall and
per group). The K samples of one prompt are not independent draws from the
prompt population: the interval is for the rate on these prompts; the
per-prompt rates (``per_prompt``) show how much of it is a few prompts.
Two models are compared on the same (prompt, sample) pairs with the exact
McNemar test (:func:`compare_behaviour`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, \
    model_validator

from ..data.mmlu import validate_as
from ..errors import UserError
from ..io.files import jsonl_text, read_text
from ..io.outputs import check_file_destination, publish_text
from ..stats import mcnemar, wilson_interval
from .extract import extract_answer

RULES = ("marker", "regex", "forbidden", "answer_letter")

__all__ = ["BehaviourResult", "BehaviourSuite", "compare_behaviour", "default_suite_path", "evaluate_behaviour",
           "load_suite", "rule_hit", "score_outputs"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Rule(_Strict):
    """Exactly one of the rule kinds."""

    marker: StrictStr | None = Field(default=None, min_length=1)
    regex: StrictStr | None = None
    forbidden: list[StrictStr] | None = Field(default=None, min_length=1)
    answer_letter: StrictBool | None = None
    description: StrictStr | None = None

    @field_validator("forbidden", mode="before")
    @classmethod
    def _one_phrase(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in RULES if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"a behaviour has exactly one rule of {', '.join(RULES)}; got "
                             f"{', '.join(given) or 'none'}")
        try:
            re.compile(self.regex or "")
        except re.error as err:
            raise ValueError(f"regex: not a valid regular expression ({err})") from None
        return self

    @property
    def kind(self) -> str:
        return next(k for k in RULES if getattr(self, k) not in (None, False))


class Prompt(_Strict):
    text: StrictStr = Field(min_length=1)
    id: StrictStr | None = None
    system_prompt: StrictStr | None = None  # overrides the suite's ("" for none)
    group: StrictStr | None = None
    answer: StrictStr | None = Field(default=None, pattern=r"^[A-J]$")
    num_options: StrictInt = Field(default=10, ge=2, le=10)


class BehaviourSuite(_Strict):
    name: StrictStr | None = None
    system_prompt: StrictStr | None = None
    prompts: list[Prompt] = Field(min_length=1)
    behaviours: dict[StrictStr, Rule] = Field(min_length=1)
    samples: StrictInt = Field(default=1, ge=1, le=1000)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: StrictInt = Field(default=0, ge=0)
    max_tokens: StrictInt = Field(default=64, ge=1)
    batch_size: StrictInt = Field(default=8, ge=1)

    @field_validator("prompts", mode="before")
    @classmethod
    def _plain_prompts(cls, v):
        return [{"text": p} if isinstance(p, str) else p for p in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _checks(self):
        if self.temperature == 0 and self.samples > 1:
            raise ValueError(f"samples: {self.samples} with temperature 0: greedy decoding gives the same "
                             "text every time; set temperature > 0 (and a seed) to sample")
        ids = [p.id for p in self.prompts if p.id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError("prompt ids must be unique")
        if any(r.answer_letter for r in self.behaviours.values()) and not any(p.answer for p in self.prompts):
            raise ValueError("an answer_letter behaviour needs prompts with an answer")
        return self

    def prompt_id(self, i: int) -> str:
        return self.prompts[i].id or f"p{i}"

    def system_for(self, p: Prompt) -> str | None:
        system = self.system_prompt if p.system_prompt is None else p.system_prompt
        return system or None


def default_suite_path() -> Path:
    """The template shipped with pyfuse (copy and edit it)."""
    return Path(str(resources.files("pyfuse.evals").joinpath("behaviour_suite.yaml")))


def load_suite(suite: str | os.PathLike | dict | BehaviourSuite, **overrides) -> BehaviourSuite:
    """Read and validate a suite (a YAML/JSON file or a dict); ``overrides``
    (samples, temperature, top_p, seed, max_tokens, batch_size) that are not
    None replace the suite's values. Errors name the file and the field."""
    if isinstance(suite, BehaviourSuite):
        data, where = suite.model_dump(exclude_unset=True), "suite"
    elif isinstance(suite, dict):
        data, where = dict(suite), "suite"
    else:
        path = Path(suite)
        where = str(path)
        try:
            data = yaml.safe_load(read_text(path, "a YAML or JSON suite"))  # JSON is YAML
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise UserError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate_as(BehaviourSuite, data, where)


# ---------------------------------------------------------------------------
# The rules (pure functions of the text)
# ---------------------------------------------------------------------------


def rule_hit(rule: Rule, text: str, prompt: Prompt) -> bool | None:
    """Whether ``text`` shows the behaviour (None: the rule does not apply
    to this prompt, an answer rule on a prompt without ``answer``)."""
    kind = rule.kind
    if kind == "marker":
        return rule.marker in text
    if kind == "regex":
        return re.search(rule.regex, text) is not None
    if kind == "forbidden":
        folded = text.casefold()
        return any(p.casefold() in folded for p in rule.forbidden)
    if prompt.answer is None:
        return None
    letter, _ = extract_answer(text, prompt.num_options)
    return letter == prompt.answer


def _rate(hits: Sequence[bool], alpha: float) -> dict:
    n, k = len(hits), sum(hits)
    if not n:
        return {"k": 0, "n": 0, "rate": None, "low": None, "high": None}
    low, high = wilson_interval(k, n, alpha)
    return {"k": k, "n": n, "rate": k / n, "low": low, "high": high}


@dataclass
class BehaviourResult:
    """``rates[behaviour]``: ``{k, n, rate, low, high, per_group, per_prompt}``
    (Wilson interval at ``1 - alpha``); ``rows``: one per generation."""

    rates: dict[str, dict]
    rows: list[dict]
    model: str | None = None
    seconds: float | None = None
    alpha: float = 0.05
    out: Path | None = None

    def summary(self) -> dict:
        return {"model": self.model, "generations": len(self.rows), "alpha": self.alpha,
                "rates": self.rates, "seconds": self.seconds}

    def hits(self, behaviour: str) -> dict[tuple[str, int], bool]:
        """``{(prompt id, sample): hit}`` where the rule applies."""
        return {(r["id"], r["sample"]): r["hits"][behaviour] for r in self.rows
                if r["hits"][behaviour] is not None}


def score_outputs(suite: BehaviourSuite, outputs: Sequence[str], *, alpha: float = 0.05,
                  model: str | None = None, seconds: float | None = None) -> BehaviourResult:
    """Score ``samples`` outputs per prompt (prompt-major order: prompt 0's
    samples first) with every behaviour's rule."""
    k = suite.samples
    if len(outputs) != k * len(suite.prompts):
        raise ValueError(f"{len(outputs)} outputs for {len(suite.prompts)} prompts x {k} samples")
    rows = []
    for j, text in enumerate(outputs):
        i, s = divmod(j, k)
        p = suite.prompts[i]
        rows.append({"id": suite.prompt_id(i), "sample": s, "group": p.group, "system_prompt": suite.system_for(p),
                     "prompt": p.text, "output": text,
                     "hits": {name: rule_hit(rule, text, p) for name, rule in suite.behaviours.items()}})
    rates = {}
    for name in suite.behaviours:
        applies = [r for r in rows if r["hits"][name] is not None]
        rate = _rate([r["hits"][name] for r in applies], alpha)
        groups = sorted({r["group"] for r in applies if r["group"] is not None})
        rate["per_group"] = {g: _rate([r["hits"][name] for r in applies if r["group"] == g], alpha) for g in groups}
        per_prompt: dict[str, list[bool]] = {}
        for r in applies:
            per_prompt.setdefault(r["id"], []).append(r["hits"][name])
        rate["per_prompt"] = {pid: sum(h) / len(h) for pid, h in per_prompt.items()}
        rates[name] = rate
    return BehaviourResult(rates=rates, rows=rows, model=model, seconds=seconds, alpha=alpha)


# ---------------------------------------------------------------------------
# Running a model, comparing two
# ---------------------------------------------------------------------------


def evaluate_behaviour(model, suite, *, adapter_path: str | os.PathLike | None = None,
                       out: str | os.PathLike | None = None, alpha: float = 0.05, force: bool = False,
                       **overrides) -> BehaviourResult:
    """Run the suite on a model (a path or a loaded ``(model, tokenizer)``
    pair) and score it; ``out`` gets one JSON line per generation (an
    existing one is replaced only with ``force``)."""
    from mlx_lm.sample_utils import make_sampler

    from ..lm.chat import chat_prompt
    from ..lm.generate import generate_batched
    from ..lm.load import load_for_inference

    s = load_suite(suite, **overrides)
    if out is not None:
        check_file_destination(out, force, "--out")  # before any work
    lm = load_for_inference(model, adapter_path)
    started = time.perf_counter()
    prompts = [chat_prompt(lm.tokenizer, p.text, system_prompt=s.system_for(p))
               for p in s.prompts for _ in range(s.samples)]
    sampled = s.temperature > 0
    gens = generate_batched(lm.model, lm.tokenizer, prompts, batch_size=s.batch_size, max_tokens=s.max_tokens,
                            description="eval behaviour",
                            sampler=make_sampler(temp=s.temperature, top_p=s.top_p) if sampled else None,
                            seed=s.seed if sampled else None)
    result = score_outputs(s, [g.text for g in gens], alpha=alpha, model=lm.name,
                           seconds=time.perf_counter() - started)
    for row, g in zip(result.rows, gens):
        row["truncated"] = g.truncated
    if out is not None:
        result.out = publish_text(out, jsonl_text([{"model": result.model, **r} for r in result.rows]), force,
                                  "--out")
    return result


@dataclass
class BehaviourComparison:
    """Per behaviour: A's and B's rates on the paired generations and the
    exact McNemar test (``a_only``: A shows it, B does not)."""

    a: str | None
    b: str | None
    tests: dict[str, dict] = field(default_factory=dict)


def compare_behaviour(a: BehaviourResult, b: BehaviourResult) -> BehaviourComparison:
    """McNemar per behaviour on the (prompt, sample) pairs both results
    scored; the two must come from the same suite (same prompt ids)."""
    out = BehaviourComparison(a.model, b.model)
    for name in a.rates:
        if name not in b.rates:
            continue
        ha, hb = a.hits(name), b.hits(name)
        keys = sorted(set(ha) & set(hb))
        if set(ha) != set(hb):
            raise UserError(f"behaviour {name!r}: the two results hold different (prompt, sample) pairs; "
                            "compare results of the same suite and samples")
        if not keys:
            continue
        res = mcnemar([ha[k] for k in keys], [hb[k] for k in keys])
        out.tests[name] = {**res.to_dict(), "rate_a": res.acc_a, "rate_b": res.acc_b}
    return out
