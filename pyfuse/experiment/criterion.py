"""The pre-registered criterion: a small, unambiguous grammar evaluated exactly.

Grammar (keywords lower case; conditions by name)::

    criterion  := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" criterion ")" | comparison
    comparison := term OP term                 OP: >= > <= < == !=
    term       := NUMBER ["pp"] | STAT "(" NAME ["," NAME] ["@" DATASET] ")"

Statistics (accuracies and differences are proportions, 0..1; ``5pp`` is
0.05, i.e. percentage points):

==================  ===============================================================
``acc(A)``          accuracy of A on the multiple-choice items (exact fraction k/n)
``n(A)``            number of items A was scored on
``diff(A, B)``      ``acc(A) - acc(B)`` (exact fraction)
``mcnemar_p(A, B)`` exact McNemar test on the paired items, two-sided
``ztest_p(A, B)``   pooled two-proportion z-test, two-sided (the literature's test)
``ci_low(A, B)``    lower end of Newcombe's interval for diff(A, B) at 1 - alpha
``ci_high(A, B)``   upper end of that interval
``identity(A)``     identity-suite score of A (passing prompts)
``null_p(A, F)``    empirical p of acc(A) among the K members of the seeded condition F
                    (placebo or dithered): ``(1 + #{members at least as accurate}) / (K + 1)``
==================  ===============================================================

A multiple-choice statistic is taken on the primary dataset (the first of
``evaluation.mc``) unless ``@ DATASET`` names another: ``diff(A1, A0 @ holdout)``.
The p values (``mcnemar_p``, ``ztest_p``, ``null_p``) are Holm-adjusted
within the pre-registered family when it has more than one member.

Numbers are exact decimals (``0.05`` is 5/100, not the nearest float) and
every comparison is made between exact rationals (a float statistic is
taken at its exact binary value), so a threshold is never missed or met by
rounding. Example: ``diff(A1, A0) >= 0.05 and ztest_p(A1, A0) < 0.05``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Union

STATS = {
    "acc": 1, "n": 1, "identity": 1,
    "diff": 2, "mcnemar_p": 2, "ztest_p": 2, "ci_low": 2, "ci_high": 2, "null_p": 2,
}
P_STATS = ("mcnemar_p", "ztest_p", "null_p")  # p values: what a family of tests holds
TEST_DESCRIPTIONS = {
    "acc": "accuracy k/n on the multiple-choice items",
    "n": "number of multiple-choice items scored",
    "identity": "identity-suite score (prompts passing all their checks)",
    "diff": "difference of accuracies acc(A) - acc(B), exact",
    "mcnemar_p": "exact (binomial) McNemar test on paired items, two-sided "
                 "(statsmodels.stats.contingency_tables.mcnemar, exact=True)",
    "ztest_p": "pooled two-proportion z-test, two-sided (statsmodels proportions_ztest); "
               "p = 1 when every item has the same outcome in both conditions",
    "ci_low": "lower end of Newcombe's hybrid-score interval for acc(A) - acc(B) at level 1 - alpha",
    "ci_high": "upper end of Newcombe's hybrid-score interval for acc(A) - acc(B) at level 1 - alpha",
    "null_p": "empirical p of acc(A) among the members of a seeded condition (placebo or dithered "
              "controls): (1 + #{members at least as accurate}) / (K + 1), one-sided",
}
OPS: dict[str, Callable[[Fraction, Fraction], bool]] = {
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
_FLIP = {">=": "<=", ">": "<", "<=": ">=", "<": ">", "==": "==", "!=": "!="}

_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?P<unit>pp\b)?|(?P<op>>=|<=|==|!=|>|<)"
                    r"|(?P<punct>[(),@])|(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*))")


class CriterionError(ValueError):
    pass


@dataclass(frozen=True)
class Num:
    text: str  # as written, e.g. "0.05" or "5pp"
    value: Fraction

    def __str__(self):
        return self.text


@dataclass(frozen=True)
class Stat:
    func: str
    args: tuple[str, ...]
    dataset: str | None = None  # None: the primary dataset

    def __str__(self):
        on = f" @ {self.dataset}" if self.dataset is not None else ""
        return f"{self.func}({', '.join(self.args)}{on})"


Term = Union[Num, Stat]


@dataclass(frozen=True)
class Cmp:
    left: Term
    op: str
    right: Term

    def __str__(self):
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class Not:
    arg: "Node"

    def __str__(self):
        inner = str(self.arg)
        return f"not ({inner})" if isinstance(self.arg, (And, Or)) else f"not {inner}"


@dataclass(frozen=True)
class And:
    args: tuple["Node", ...]

    def __str__(self):
        return " and ".join(f"({a})" if isinstance(a, Or) else str(a) for a in self.args)


@dataclass(frozen=True)
class Or:
    args: tuple["Node", ...]

    def __str__(self):
        return " or ".join(str(a) for a in self.args)


Node = Union[Cmp, Not, And, Or]


@dataclass(frozen=True)
class Criterion:
    root: Node
    source: str

    def __str__(self):
        return str(self.root)

    def comparisons(self) -> list[Cmp]:
        out: list[Cmp] = []

        def walk(n):
            if isinstance(n, Cmp):
                out.append(n)
            elif isinstance(n, Not):
                walk(n.arg)
            else:
                for a in n.args:
                    walk(a)

        walk(self.root)
        return out

    def stats(self) -> list[Stat]:
        seen = {}
        for c in self.comparisons():
            for t in (c.left, c.right):
                if isinstance(t, Stat):
                    seen[str(t)] = t
        return list(seen.values())

    def pairs(self) -> list[tuple[str, str]]:
        """Condition pairs the two-argument statistics compare (not ``null_p``'s
        condition and family)."""
        return list(dict.fromkeys(s.args for s in self.stats() if len(s.args) == 2 and s.func != "null_p"))

    def pvalues(self) -> list[Stat]:
        """The p-valued statistics (the default family of tests)."""
        return [s for s in self.stats() if s.func in P_STATS]

    def thresholds(self) -> list[dict]:
        """``statistic op value`` for every comparison of a statistic with a
        number (normalised so the statistic is on the left)."""
        out = []
        for c in self.comparisons():
            if isinstance(c.left, Stat) and isinstance(c.right, Num):
                out.append({"statistic": str(c.left), "op": c.op, "value": c.right.text})
            elif isinstance(c.left, Num) and isinstance(c.right, Stat):
                out.append({"statistic": str(c.right), "op": _FLIP[c.op], "value": c.left.text})
        return out

    def evaluate(self, lookup: Callable[[Stat], Union[Fraction, float, int]]) -> "Evaluation":
        observed: dict[str, Union[Fraction, float, int]] = {}
        atoms: list[tuple[str, bool]] = []

        def value(t: Term) -> Fraction:
            if isinstance(t, Num):
                return t.value
            key = str(t)
            if key not in observed:
                observed[key] = lookup(t)
            v = observed[key]
            return v if isinstance(v, Fraction) else Fraction(v)

        def ev(n) -> bool:
            if isinstance(n, Cmp):
                r = OPS[n.op](value(n.left), value(n.right))
                atoms.append((str(n), r))
                return r
            if isinstance(n, Not):
                return not ev(n.arg)
            results = [ev(a) for a in n.args]  # every atom, no short cut: all are reported
            return all(results) if isinstance(n, And) else any(results)

        passed = ev(self.root)
        return Evaluation(passed=passed, observed=observed, atoms=atoms)


@dataclass
class Evaluation:
    passed: bool
    observed: dict
    atoms: list[tuple[str, bool]]


def _number(text: str, unit: str | None) -> Num:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise CriterionError(f"bad number {text!r}") from None
    if unit == "pp":
        value /= 100
    return Num(text + (unit or ""), value)


def parse(text: str) -> Criterion:
    if not isinstance(text, str) or not text.strip():
        raise CriterionError("the criterion is empty")
    return _Parser(text).criterion()


def parse_pvalue(text: str) -> Stat:
    """One p-valued statistic, e.g. ``mcnemar_p(A1, A0)`` (a member of a
    family of tests)."""
    if not isinstance(text, str) or not text.strip():
        raise CriterionError("an empty test")
    parser = _Parser(text)
    t = parser.peek("name")
    if t is None or t[1] not in P_STATS:
        raise CriterionError("a family holds p values: mcnemar_p(A, B), ztest_p(A, B) or null_p(A, F)")
    stat = parser.p_stat(t[1])
    if parser.i != len(parser.tokens):
        raise CriterionError(f"unexpected {parser.tokens[parser.i][1]!r} after {stat}")
    return stat


def _tokens(text: str) -> list[tuple[str, str]]:
    """``(kind, value)``: num (``"0.05\\0pp"``: number, NUL, unit), op, ``(``, ``)``, ``,``, kw, name."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise CriterionError(f"unexpected {text[pos:].strip()[:12]!r} at character {pos + 1} "
                                 f"of {text!r}")
        if m.group("num") is not None:
            tokens.append(("num", m.group("num") + "\0" + (m.group("unit") or "")))
        elif m.group("op"):
            tokens.append(("op", m.group("op")))
        elif m.group("punct"):
            tokens.append((m.group("punct"), m.group("punct")))
        else:
            name = m.group("name")
            tokens.append(("kw" if name in ("and", "or", "not") else "name", name))
        pos = m.end()
    return tokens


# The values a statistic can take: a threshold outside them is never met (or
# always met): a typo (``500pp``) the pre-registration must not lock in.
_RANGES = {"acc": (0, 1), "diff": (-1, 1), "ci_low": (-1, 1), "ci_high": (-1, 1),
           **{p: (0, 1) for p in P_STATS}}


def _check_ranges(crit: Criterion) -> None:
    for t in crit.thresholds():
        func = t["statistic"].split("(", 1)[0]
        lo, hi = _RANGES.get(func, (0, None))
        value = _threshold_value(t["value"])
        if value < lo or (hi is not None and value > hi):
            span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise CriterionError(f"{t['statistic']} {t['op']} {t['value']}: {func} lies in {span}, so this "
                                 "threshold can never be crossed (a typo?)")


def _threshold_value(text: str) -> Fraction:
    unit = "pp" if text.endswith("pp") else None
    return _number(text[:-2] if unit else text, unit).value


class _Parser:
    """Recursive descent over :func:`_tokens`, one method per rule of the grammar."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0

    def criterion(self) -> Criterion:
        root = self.p_or()
        if self.i != len(self.tokens):
            raise CriterionError(f"unexpected {self.tokens[self.i][1].replace(chr(0), '')!r} after {root}")
        crit = Criterion(root=root, source=self.text)
        _check_ranges(crit)
        return crit

    def peek(self, kind=None, val=None):
        if self.i >= len(self.tokens):
            return None
        t = self.tokens[self.i]
        if kind is not None and t[0] != kind:
            return None
        if val is not None and t[1] != val:
            return None
        return t

    def _found(self) -> str:
        return self.tokens[self.i][1].replace("\0", "") if self.i < len(self.tokens) else "the end"

    def take(self, kind, val=None, what=None):
        t = self.peek(kind, val)
        if t is None:
            raise CriterionError(f"expected {what or val or kind} but found {self._found()!r} in {self.text!r}")
        self.i += 1
        return t

    def _joined(self, word: str, operand, node):
        """``operand (word operand)*``: one operand as is, several as ``node``."""
        args = [operand()]
        while self.peek("kw", word):
            self.take("kw", word)
            args.append(operand())
        return args[0] if len(args) == 1 else node(tuple(args))

    def p_or(self):
        return self._joined("or", self.p_and, Or)

    def p_and(self):
        return self._joined("and", self.p_not, And)

    def p_not(self):
        if self.peek("kw", "not"):
            self.take("kw", "not")
            return Not(self.p_not())
        if self.peek("("):
            self.take("(")
            inner = self.p_or()
            self.take(")", what="')'")
            return inner
        return self.p_cmp()

    def p_term(self):
        t = self.peek()
        if t is None:
            raise CriterionError(f"{self.text!r} ends early: expected a statistic or a number")
        if t[0] == "num":
            self.i += 1
            num, unit = t[1].split("\0")
            return _number(num, unit or None)
        if t[0] == "name":
            return self.p_stat(t[1])
        raise CriterionError(f"expected a statistic or a number but found {t[1]!r} in {self.text!r}")

    def p_stat(self, func: str) -> Stat:
        if func not in STATS:
            raise CriterionError(f"unknown statistic {func!r} (one of {', '.join(STATS)})")
        self.i += 1
        self.take("(", what=f"'(' after {func}")
        args = [self.take("name", what="a condition name")[1]]
        while self.peek(","):
            self.take(",")
            args.append(self.take("name", what="a condition name")[1])
        dataset = None
        if self.peek("@"):
            self.take("@")
            dataset = self.take("name", what="a dataset name after '@'")[1]
            if func == "identity":
                raise CriterionError("identity(...) takes no dataset: the identity suite is not multiple choice")
        self.take(")", what="')'")
        if len(args) != STATS[func]:
            raise CriterionError(f"{func} takes {STATS[func]} condition name"
                                 f"{'s' if STATS[func] > 1 else ''}, got {len(args)}")
        if len(args) == 2 and args[0] == args[1]:
            raise CriterionError(f"{func}({args[0]}, {args[1]}) compares a condition with itself")
        return Stat(func, tuple(args), dataset)

    def p_cmp(self):
        left = self.p_term()
        op = self.peek("op")
        if op is None:
            raise CriterionError(f"expected a comparison (>=, >, <=, <, ==, !=) after {left} but found "
                                 f"{self._found()!r}")
        self.take("op")
        right = self.p_term()
        if isinstance(left, Num) and isinstance(right, Num):
            raise CriterionError(f"{left} {op[1]} {right} compares two numbers")
        if self.peek("op"):
            raise CriterionError(f"chained comparison after {left} {op[1]} {right}: use 'and'")
        return Cmp(left, op[1], right)
