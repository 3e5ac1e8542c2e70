"""The persona check: does the model answer in the persona's voice or like a
generic assistant?

A suite (YAML or JSON, or the built-in example: the three validation
prompts of the users' persona recipe) lists prompts, each with a GOOD and a
BAD example reply, and the rules a reply must keep:

    forbidden: ["Great question", "I understand", "Let me help", ...]
    markers: []          # phrases of which a reply must hold one (none: no rule)
    max_words: 25        # a reply longer than this fails (null: no rule)
    system_prompt: null
    max_tokens: 48
    prompts:
      - prompt: The PR is ready for review.
        good: Merge it.
        bad: Awesome work! I'd be happy to review it for you!

Two measurements per prompt:

* ``passes``: the model's greedy reply (thinking off) holds no forbidden
  phrase (case-insensitive), one of the markers if any are listed, and at
  most ``max_words`` words;
* ``prefers_good``: ``log P(good | prompt) > log P(bad | prompt)`` (sums
  over the reply tokens, one forward pass each): which voice the model
  leans to, measurable even when its generations are poor.

The examples are checked against the rules first: a GOOD example that
breaks them, or a BAD one that keeps them all, makes the suite unable to
tell the two apart, and is reported as a warning.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

__all__ = ["BUILTIN_SUITE", "PersonaResult", "check_reply", "evaluate_persona", "load_persona_suite"]

BUILTIN_SUITE = {
    "name": "persona recipe: validation prompts",
    "forbidden": ["Great question", "I understand", "Let me help", "I'd be happy to", "Awesome work",
                  "Let's break down", "As an AI"],
    "markers": [],
    "max_words": 25,
    "system_prompt": None,
    "max_tokens": 48,
    "prompts": [
        {"prompt": "The deploy failed with a 503 error on the staging server.",
         "good": "Show me the logs. What changed since last deploy?",
         "bad": "I understand that must be frustrating! Let me help you troubleshoot..."},
        {"prompt": "Should we refactor the auth module or just patch the bug?",
         "good": "Patch it. Ship the fix, then refactor next sprint.",
         "bad": "Great question! Let's break down the pros and cons..."},
        {"prompt": "The PR is ready for review.",
         "good": "Merge it.",
         "bad": "Awesome work! I'd be happy to review it for you!"},
    ],
}
_KEYS = {"name", "forbidden", "markers", "max_words", "system_prompt", "max_tokens", "prompts"}


@dataclass
class PersonaSuite:
    name: str
    forbidden: list[str]
    markers: list[str]
    max_words: int | None
    system_prompt: str | None
    max_tokens: int
    prompts: list[dict]


def _strings(value, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"persona suite: {what} must be a list of non-empty strings")
    return list(value)


def load_persona_suite(suite=None) -> PersonaSuite:
    """A suite file (YAML/JSON), a dict, or None (the built-in example)."""
    if suite is None:
        data = BUILTIN_SUITE
    elif isinstance(suite, dict):
        data = suite
    else:
        import yaml

        path = Path(suite)
        if not path.is_file():
            raise UserError(f"persona suite {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping with prompts, forbidden, markers, max_words")
    unknown = set(data) - _KEYS
    if unknown:
        raise UserError(f"persona suite: unknown key(s) {', '.join(sorted(unknown))} ({', '.join(sorted(_KEYS))})")
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or not prompts:
        raise UserError("persona suite: prompts must be a non-empty list of {prompt, good, bad}")
    for i, p in enumerate(prompts):
        if not isinstance(p, dict) or set(p) - {"prompt", "good", "bad"} or not all(
                isinstance(p.get(k), str) and p[k].strip() for k in ("prompt", "good", "bad")):
            raise UserError(f"persona suite: prompts[{i}] must have non-empty prompt, good and bad strings")
    max_words = data.get("max_words")
    if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1):
        raise UserError(f"persona suite: max_words must be a positive integer or null, got {max_words!r}")
    max_tokens = data.get("max_tokens", 48)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserError(f"persona suite: max_tokens must be a positive integer, got {max_tokens!r}")
    return PersonaSuite(name=str(data.get("name", "persona")), forbidden=_strings(data.get("forbidden", []),
                        "forbidden"), markers=_strings(data.get("markers", []), "markers"), max_words=max_words,
                        system_prompt=data.get("system_prompt"), max_tokens=max_tokens, prompts=list(prompts))


def _has(text: str, phrase: str) -> bool:
    norm = lambda s: re.sub(r"\s+", " ", s.replace("\u2019", "'")).strip().lower()  # noqa: E731
    return norm(phrase) in norm(text)


def check_reply(text: str, suite: PersonaSuite) -> dict:
    """The rules for one reply: ``forbidden`` (the phrases found), ``marker``,
    ``words``, ``too_long`` and ``passes``."""
    found = [f for f in suite.forbidden if _has(text, f)]
    marker = not suite.markers or any(_has(text, m) for m in suite.markers)
    words = len(text.split())
    too_long = suite.max_words is not None and words > suite.max_words
    return {"forbidden": found, "marker": marker, "words": words, "too_long": too_long,
            "passes": not found and marker and not too_long and bool(text.strip())}


@dataclass
class PersonaResult:
    suite: str
    model: str
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(r["passes"] for r in self.rows)

    @property
    def prefers_good(self) -> int:
        return sum(r["prefers_good"] for r in self.rows)

    def summary(self) -> dict:
        n = len(self.rows)
        return {"suite": self.suite, "model": self.model, "n": n, "passed": self.passed,
                "prefers_good": self.prefers_good,
                "mean_margin": sum(r["margin"] for r in self.rows) / n if n else None,
                "mean_words": sum(r["words"] for r in self.rows) / n if n else None,
                "forbidden_hits": sum(bool(r["forbidden"]) for r in self.rows)}


def _example_warnings(suite: PersonaSuite) -> list[str]:
    out = []
    for i, p in enumerate(suite.prompts):
        if not check_reply(p["good"], suite)["passes"]:
            out.append(f"prompts[{i}]: its GOOD example breaks the suite's rules")
        if check_reply(p["bad"], suite)["passes"]:
            out.append(f"prompts[{i}]: its BAD example keeps every rule (add forbidden phrases or max_words)")
    return out


def _reply_logp(model, tokenizer, prompt_ids: list[int], reply: str) -> float:
    """``log P(reply | prompt)``: the reply's tokens right after the
    generation prompt, as greedy decoding would have to produce them."""
    import mlx.core as mx

    reply_ids = list(tokenizer.encode(reply, add_special_tokens=False))
    full = list(prompt_ids) + reply_ids
    logits = model(mx.array([full[:-1]])).astype(mx.float32)[0]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    start = len(prompt_ids)
    return mx.take_along_axis(logp[start - 1:], mx.array(reply_ids)[:, None], axis=-1).sum().item()


def evaluate_persona(model, suite=None, *, adapter_path: str | os.PathLike | None = None,
                     batch_size: int = 8) -> PersonaResult:
    """Run the persona check on a model (path, or ``(model, tokenizer)``)."""
    from ..lm.chat import chat_prompt
    from ..lm.generate import generate_batched
    from ..lm.load import load_for_inference

    s = load_persona_suite(suite)
    lm = load_for_inference(model, adapter_path)
    msgs = [[{"role": "user", "content": p["prompt"]}] for p in s.prompts]
    prompts = [chat_prompt(lm.tokenizer, messages=m, system_prompt=s.system_prompt) for m in msgs]
    gens = generate_batched(lm.model, lm.tokenizer, prompts, batch_size=batch_size, max_tokens=s.max_tokens,
                            description="eval persona")
    rows = []
    for p, ids, g in zip(s.prompts, prompts, gens):
        good = _reply_logp(lm.model, lm.tokenizer, ids, p["good"])
        bad = _reply_logp(lm.model, lm.tokenizer, ids, p["bad"])
        rows.append({"prompt": p["prompt"], "output": g.text, **check_reply(g.text, s), "logp_good": good,
                     "logp_bad": bad, "margin": good - bad, "prefers_good": good > bad})
    return PersonaResult(suite=s.name, model=lm.name, rows=rows, warnings=_example_warnings(s))
