r"""Identity-consistency evaluation: does the model keep its persona?

A suite (YAML or JSON; the template ships as ``pyfuse/evals/identity_suite.yaml``,
see :func:`default_suite_path`) names the persona (``persona.name``,
``persona.aliases``), the base model it must not claim to be (``base.names``,
``base.vendors``), boilerplate phrases (``generic_phrases``) and N prompts,
each with rule-based checks. The model answers every prompt greedily
(temperature 0, thinking disabled: the chat template of :mod:`pyfuse.lm.chat`,
the fixed batches of :func:`pyfuse.lm.generate.generate_batched`); a prompt
passes when all its checks pass, and the score is the number of
passing prompts out of N. The base model is the control: a suite on which
the base model scores high cannot tell a persona from its absence.

Checks (all case-insensitive; a name matches as a whole word, so "Qwen"
matches "Qwen3" and "Qwen's" but not "Qwenlike"):

``states_name``
    The answer contains the persona's name or an alias.
``no_base_claim``
    The answer does not claim to be the base model or to come from its
    vendor. The answer is cut into sentences (at ``. ! ? ; :``, newlines,
    "but" and "however"); a sentence *claims* a base name or vendor when a
    first-person word ("I", "I'm", "me", "my", "this is"...) comes before
    the mention and no negation ("not", "never", "no", "n't", "unlike",
    "rather than", "instead of"...) lies between the last such word and
    the mention. So "I am Qwen", "I'm an AI assistant, developed by
    Alibaba Cloud" and "my name is Qwen" fail; "I'm Nova, not Qwen", "I'm
    not Qwen" and "Unlike Qwen, I ..." pass. Rules, not understanding: "I
    like Qwen" counts as a claim, so keep prompts that invite it out.
``no_base_mention``
    Stricter: no base name or vendor appears at all.
``no_generic_ai``
    None of ``generic_phrases`` appears (substring, case-insensitive,
    curly apostrophes normalised).
``{contains: REGEX}`` / ``{not_contains: REGEX}``
    The answer matches / does not match the regular expression.

:func:`check_response` and :func:`score_outputs` are the pure rules (no
model), :func:`evaluate_identity` runs a model.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, \
    model_validator

from ..data.mmlu import validate_as
from ..errors import UserError
from ..io.files import jsonl_text
from ..io.outputs import check_file_destination, publish_text
from ..lm.generate import check_positive

NAMED_CHECKS = ("states_name", "no_base_claim", "no_base_mention", "no_generic_ai")
REGEX_CHECKS = ("contains", "not_contains")
PLACEHOLDERS = ("persona", "base", "vendor")
DEFAULT_MAX_TOKENS = 200

__all__ = ["IdentityResult", "IdentitySuite", "NAMED_CHECKS", "check_response", "claims",
           "default_suite_path", "evaluate_identity", "load_suite", "mentions", "score_outputs"]


# ---------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Persona(_Strict):
    name: StrictStr | None = None
    aliases: list[StrictStr] = Field(default_factory=list)


class Base(_Strict):
    names: list[StrictStr] = Field(default_factory=list)
    vendors: list[StrictStr] = Field(default_factory=list)


class Generation(_Strict):
    system_prompt: StrictStr | None = None
    max_tokens: StrictInt = Field(default=DEFAULT_MAX_TOKENS, ge=1)


class Message(_Strict):
    role: StrictStr
    content: StrictStr

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ("system", "user", "assistant"):
            raise ValueError(f"must be system, user or assistant, got {v!r}")
        return v


Check = Union[StrictStr, dict]


class Prompt(_Strict):
    id: Union[StrictStr, StrictInt]
    category: StrictStr = "general"
    prompt: StrictStr | None = None
    messages: list[Message] | None = None
    checks: list[Check] = Field(min_length=1)

    @field_validator("checks")
    @classmethod
    def _checks(cls, checks: list) -> list:
        for c in checks:
            if isinstance(c, str):
                if c not in NAMED_CHECKS:
                    raise ValueError(f"unknown check {c!r}; known: {', '.join(NAMED_CHECKS)}, "
                                     f"or {{contains: REGEX}} / {{not_contains: REGEX}}")
            elif isinstance(c, dict):
                if len(c) != 1 or next(iter(c)) not in REGEX_CHECKS or not isinstance(next(iter(c.values())), str):
                    raise ValueError(f"a check given as a mapping must be {{contains: REGEX}} or "
                                     f"{{not_contains: REGEX}}, got {c!r}")
                try:
                    re.compile(next(iter(c.values())))
                except re.error as err:
                    raise ValueError(f"check {c!r}: not a valid regular expression ({err})") from None
            else:
                raise ValueError(f"a check must be a name or a mapping, got {c!r}")
        return checks

    @model_validator(mode="after")
    def _one_of(self) -> "Prompt":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("field 'prompt' is empty")
        if self.messages is not None:
            if not self.messages or self.messages[-1].role != "user":
                raise ValueError("field 'messages' must end with a user turn")
        return self


class IdentitySuite(_Strict):
    """A validated identity suite (see the module doc and the template)."""

    version: StrictInt = 1
    persona: Persona = Field(default_factory=Persona)
    base: Base = Field(default_factory=Base)
    generic_phrases: list[StrictStr] = Field(default_factory=list)
    generation: Generation = Field(default_factory=Generation)
    prompts: list[Prompt] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> "IdentitySuite":
        seen = set()
        for p in self.prompts:
            key = str(p.id)
            if key in seen:
                raise ValueError(f"prompt id {p.id!r} repeats")
            seen.add(key)
        return self

    @property
    def n(self) -> int:
        return len(self.prompts)

    def render(self, text: str) -> str:
        """Substitute ``{persona}``, ``{base}`` and ``{vendor}``."""
        values = {"persona": self.persona.name or "", "base": (self.base.names or [""])[0],
                  "vendor": (self.base.vendors or [""])[0]}
        return re.sub(r"\{(persona|base|vendor)\}", lambda m: values[m.group(1)], text)

    def messages_for(self, prompt: Prompt) -> list[dict]:
        if prompt.messages is not None:
            return [{"role": m.role, "content": self.render(m.content)} for m in prompt.messages]
        return [{"role": "user", "content": self.render(prompt.prompt)}]


def default_suite_path() -> Path:
    """The template shipped with pyfuse (copy and edit it)."""
    return Path(str(resources.files("pyfuse.evals").joinpath("identity_suite.yaml")))


def load_suite(suite: str | os.PathLike | dict | IdentitySuite | None = None, *,
               persona_name: str | None = None, aliases: Sequence[str] | None = None,
               base_names: Sequence[str] | None = None, vendors: Sequence[str] | None = None,
               system_prompt: str | None = None, max_tokens: int | None = None) -> IdentitySuite:
    """Read and validate a suite (a YAML/JSON file, a dict, or None for the
    template), apply the overrides given (not None), and check that the
    persona has a name. Errors name the file and the field."""
    if isinstance(suite, IdentitySuite):
        data = suite.model_dump()
        where = "suite"
    elif isinstance(suite, dict):
        data, where = suite, "suite"
    else:
        path = default_suite_path() if suite is None else Path(suite)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a directory, expected a YAML or JSON suite") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read ({err})") from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            mark = getattr(err, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            raise UserError(f"{path}: not valid {kind}{at}: {msg}") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    parsed = validate_as(IdentitySuite, data, where)

    persona = parsed.persona.model_copy(update={k: v for k, v in
                                                (("name", persona_name),
                                                 ("aliases", list(aliases) if aliases is not None else None))
                                                if v is not None})
    base = parsed.base.model_copy(update={k: v for k, v in
                                          (("names", list(base_names) if base_names is not None else None),
                                           ("vendors", list(vendors) if vendors is not None else None))
                                          if v is not None})
    generation = parsed.generation.model_copy(update={k: v for k, v in
                                                      (("system_prompt", system_prompt),
                                                       ("max_tokens", max_tokens)) if v is not None})
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise UserError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if not persona.name or not persona.name.strip():
        raise UserError(f"{where}: the persona has no name: set persona.name in the suite "
                        "or pass --persona-name")
    names = [persona.name, *persona.aliases]
    clash = [n for n in names if any(_norm(n) == _norm(b) for b in (*base.names, *base.vendors))]
    if clash:
        raise UserError(f"{where}: the persona's name {clash[0]!r} is also a base name or vendor")
    return parsed.model_copy(update={"persona": persona, "base": base, "generation": generation})


# ---------------------------------------------------------------------------
# The rules (pure functions of the text)
# ---------------------------------------------------------------------------


def _norm(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").casefold()


def _term_re(term: str) -> re.Pattern:
    # whole word at the letter level: "Qwen" matches "Qwen3", "Qwen's", not "Qwenlike"
    words = r"\s+".join(re.escape(w) for w in _norm(term).split())
    return re.compile(rf"(?<![^\W\d_]){words}(?![^\W\d_])")


def mentions(text: str, term: str) -> bool:
    """Whether ``term`` appears in ``text`` as a whole word (case-insensitive)."""
    return bool(term.strip()) and bool(_term_re(term).search(_norm(text)))


_SENTENCE_SPLIT = re.compile(r"[.!?;:\n\u3002\uff01\uff1f]+|\bbut\b|\bhowever\b")
_FIRST_PERSON = re.compile(r"(?<![\w'])(?:i|i'm|im|i've|i'd|i'll|me|my|mine|myself)(?![\w'])|\bthis is\b")
_NEGATION = re.compile(r"(?<![\w'])(?:not|never|no|nor|neither|unlike|without|instead of|rather than)(?![\w'])"
                       r"|n't\b|\bcannot\b")


def claims(text: str, term: str) -> bool:
    """Whether ``text`` claims to be (or to come from) ``term``: in some
    sentence a first-person word comes before a mention of it, and no
    negation lies between the last such word and the mention."""
    if not term.strip():
        return False
    pattern = _term_re(term)
    for sentence in _SENTENCE_SPLIT.split(_norm(text)):
        for m in pattern.finditer(sentence):
            before = sentence[:m.start()]
            persons = list(_FIRST_PERSON.finditer(before))
            if persons and not _NEGATION.search(before, persons[-1].end()):
                return True
    return False


def check_response(text: str, checks: Iterable, suite: IdentitySuite) -> dict[str, bool]:
    """``{check label: passed}`` for one answer (labels: the check names,
    ``contains:REGEX``, ``not_contains:REGEX``)."""
    names = [suite.persona.name or "", *suite.persona.aliases]
    forbidden = [*suite.base.names, *suite.base.vendors]
    norm = _norm(text)
    out: dict[str, bool] = {}
    for c in checks:
        if c == "states_name":
            out[c] = any(mentions(text, n) for n in names if n)
        elif c == "no_base_claim":
            out[c] = not any(claims(text, f) for f in forbidden)
        elif c == "no_base_mention":
            out[c] = not any(mentions(text, f) for f in forbidden)
        elif c == "no_generic_ai":
            out[c] = not any(_norm(p) in norm for p in suite.generic_phrases if p.strip())
        elif isinstance(c, dict):
            kind, regex = next(iter(c.items()))
            found = re.search(regex, text, re.IGNORECASE) is not None
            out[f"{kind}:{regex}"] = found if kind == "contains" else not found
        else:
            raise ValueError(f"unknown check {c!r}")
    return out


# ---------------------------------------------------------------------------
# Scoring and evaluation
# ---------------------------------------------------------------------------


@dataclass
class IdentityResult:
    """``score`` passing prompts out of ``n``; ``rows`` per prompt: id,
    category, prompt (the last user turn, rendered), output, passed, checks
    ({label: bool}), failed (labels)."""

    score: int
    n: int
    rows: list[dict]
    persona: str
    model: str | None = None
    seconds: float | None = None
    per_category: dict[str, dict] = field(default_factory=dict)
    out: Path | None = None
    control: "IdentityResult | None" = None
    warnings: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.score / self.n

    def summary(self) -> dict:
        out = {"model": self.model, "persona": self.persona, "score": self.score, "n": self.n,
               "per_category": self.per_category, "seconds": self.seconds}
        if self.control is not None:
            out["control"] = {"model": self.control.model, "score": self.control.score, "n": self.control.n,
                              "per_category": self.control.per_category}
        out["warnings"] = list(self.warnings)
        return out


def score_outputs(suite: IdentitySuite, outputs: Sequence[str], *, model: str | None = None,
                  seconds: float | None = None) -> IdentityResult:
    """Score one answer per prompt of ``suite`` (in order) with the rules."""
    if len(outputs) != suite.n:
        raise ValueError(f"{len(outputs)} outputs for {suite.n} prompts")
    rows = []
    per_cat: dict[str, dict] = {}
    for p, text in zip(suite.prompts, outputs):
        results = check_response(text, p.checks, suite)
        passed = all(results.values())
        rows.append({"id": p.id, "category": p.category,
                     "prompt": suite.messages_for(p)[-1]["content"], "output": text,
                     "passed": passed, "checks": results,
                     "failed": [k for k, v in results.items() if not v]})
        c = per_cat.setdefault(p.category, {"score": 0, "n": 0})
        c["n"] += 1
        c["score"] += int(passed)
    return IdentityResult(score=sum(r["passed"] for r in rows), n=len(rows), rows=rows,
                          persona=suite.persona.name or "", model=model, seconds=seconds,
                          per_category=per_cat)


def evaluate_identity(model, suite=None, *, persona_name: str | None = None,
                      aliases: Sequence[str] | None = None, base_names: Sequence[str] | None = None,
                      vendors: Sequence[str] | None = None, system_prompt: str | None = None,
                      max_tokens: int | None = None, batch_size: int = 8,
                      out: str | os.PathLike | None = None,
                      adapter_path: str | os.PathLike | None = None, control=None,
                      force: bool = False) -> IdentityResult:
    """Run the identity suite on a model (a path or a loaded ``(model,
    tokenizer)`` pair) and score it. ``suite`` is a file, a dict, an
    :class:`IdentitySuite` or None (the template, which then needs
    ``persona_name``); the keyword overrides replace the suite's values.
    Prompts are generated in fixed batches of ``batch_size`` (suite order).
    ``out`` gets one JSON line per prompt (of ``model``); an existing one is
    replaced only with ``force``.

    ``control``: the base model (path or pair), run through the same suite;
    its result is ``result.control``, and ``result.warnings`` says when it
    passes more than a quarter of the prompts or scores at least as high as
    ``model`` (then the suite cannot tell the persona from its absence)."""
    s = load_suite(suite, persona_name=persona_name, aliases=aliases, base_names=base_names,
                   vendors=vendors, system_prompt=system_prompt, max_tokens=max_tokens)
    check_positive("batch_size", batch_size)
    if out is not None:
        check_file_destination(out, force, "--out")  # before any work
    result = _run_suite(model, s, batch_size, adapter_path)
    if control is not None:
        result.control = _run_suite(control, s, batch_size, None)
        c = result.control
        if c.score * 4 > c.n:
            result.warnings.append(f"the control passes {c.score}/{c.n} prompts: the suite barely tells "
                                   "the persona from its absence (it should score low)")
        if c.score >= result.score:
            result.warnings.append(f"the control scores {c.score}/{c.n}, not below the model's "
                                   f"{result.score}/{result.n}")
    if out is not None:
        result.out = publish_text(out, jsonl_text(result.rows), force, "--out")
    return result


def _run_suite(model, s: IdentitySuite, batch_size: int, adapter_path) -> IdentityResult:
    from ..lm.chat import chat_prompt
    from ..lm.generate import generate_batched
    from ..lm.load import load_for_inference

    lm = load_for_inference(model, adapter_path)
    started = time.perf_counter()
    prompts = [chat_prompt(lm.tokenizer, messages=s.messages_for(p), system_prompt=s.generation.system_prompt)
               for p in s.prompts]
    gens = generate_batched(lm.model, lm.tokenizer, prompts, batch_size=batch_size,
                            max_tokens=s.generation.max_tokens, description="eval identity")
    result = score_outputs(s, [g.text for g in gens], model=lm.name,
                           seconds=time.perf_counter() - started)
    for row, g in zip(result.rows, gens):
        row["n_tokens"] = len(g.token_ids)
        row["truncated"] = g.truncated
    return result
