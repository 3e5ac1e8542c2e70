"""``results.json``: assembled from the step outputs only (no timings), with
sorted keys, so a resumed run writes exactly what an uninterrupted one does.

Shape (tools read it)::

    {"conditions": {NAME: {"accuracy": float, "n": int, "correct": [0/1 per item, item order],
                           "identity": int | null, "identity_n": int | null,
                           "model": path, "adapter": path | null, "ids": [item ids]}},
     "comparisons": [{"a", "b", "diff", "mcnemar_p", "ztest_p", "ci": [low, high],
                      "n", "flips": {"both_correct", "a_only", "b_only", "both_wrong"},
                      "changed_predictions"}],
     "prereg": {"sha256", "criterion", "split_seed"} | null,
     "verdict": {"passed", "text", "criterion", "observed", "atoms", "warnings"} | null}

Conditions not evaluated on multiple choice have ``accuracy``/``n``/``correct``
null. Paths of models the run made are relative to the run directory
(``steps/fuse-<key>/model``; the directory may have been pruned).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

from ..errors import UserError
from ..stats import diff_confint, mcnemar, two_proportion_ztest
from .criterion import Stat, parse
from .layout import RESULTS_FILE, step_dir
from .plan import Plan
from .prereg import Lock, power_warnings
from .steps import read_rows, read_summary


def _ztest_p(k1, n1, k2, n2) -> float:
    try:
        return two_proportion_ztest(k1, n1, k2, n2).pvalue
    except UserError:  # every item has the same outcome in both: no evidence of a difference
        return 1.0


def compare(a: dict, b: dict, alpha: float) -> dict:
    ca, cb = a["correct"], b["correct"]
    if a["ids"] != b["ids"]:
        raise UserError("the compared conditions were scored on different items")
    k1, n1, k2, n2 = sum(ca), len(ca), sum(cb), len(cb)
    mc = mcnemar([bool(x) for x in ca], [bool(x) for x in cb])
    ci = diff_confint(k1, n1, k2, n2, alpha=alpha)
    return {
        "diff": k1 / n1 - k2 / n2,
        "mcnemar_p": mc.pvalue,
        "ztest_p": _ztest_p(k1, n1, k2, n2),
        "ci": [ci.low, ci.high],
        "ci_level": 1 - alpha,
        "n": n1,
        "flips": {"both_correct": mc.both_correct, "a_only": mc.a_only, "b_only": mc.b_only,
                  "both_wrong": mc.both_wrong},
    }


def _pct_points(x: float) -> str:
    return f"{x * 100:+.2f} points"


def _fmt_observed(stat: str, value, conds: dict) -> str:
    if isinstance(value, Fraction):
        if stat.startswith("diff("):
            a, b = [x.strip() for x in stat[5:-1].split(",")]
            ka, na = sum(conds[a]["correct"]), conds[a]["n"]
            kb, nb = sum(conds[b]["correct"]), conds[b]["n"]
            return f"{stat} = {_pct_points(float(value))} ({ka}/{na} vs {kb}/{nb})"
        return f"{stat} = {float(value):.2%} ({value.numerator}/{value.denominator})" \
            if stat.startswith("acc(") else f"{stat} = {float(value):.4g}"
    if isinstance(value, float):
        return f"{stat} = {value:.3g}"
    return f"{stat} = {value}"


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."


def verdict(results: dict, lock: Lock) -> dict:
    """Evaluate exactly the locked criterion on the results."""
    doc = lock.document
    crit = parse(doc["criterion"])
    conds = results["conditions"]
    alpha = doc["alpha"]
    pair_cache: dict[tuple[str, str], dict] = {}

    def pair(a, b):
        if (a, b) not in pair_cache:
            pair_cache[(a, b)] = compare(conds[a], conds[b], alpha)
        return pair_cache[(a, b)]

    def lookup(stat: Stat):
        f, args = stat.func, stat.args
        if f == "identity":
            v = conds[args[0]]["identity"]
            if v is None:
                raise UserError(f"{stat}: {args[0]} has no identity score")
            return v
        for a in args:
            if conds[a]["correct"] is None:
                raise UserError(f"{stat}: {a} has no multiple-choice results")
        if f == "acc":
            c = conds[args[0]]
            return Fraction(sum(c["correct"]), c["n"])
        if f == "n":
            return conds[args[0]]["n"]
        a, b = args
        if f == "diff":
            return Fraction(sum(conds[a]["correct"]), conds[a]["n"]) - \
                Fraction(sum(conds[b]["correct"]), conds[b]["n"])
        p = pair(a, b)
        return {"mcnemar_p": p["mcnemar_p"], "ztest_p": p["ztest_p"], "ci_low": p["ci"][0],
                "ci_high": p["ci"][1]}[f]

    ev = crit.evaluate(lookup)
    observed_text = [_fmt_observed(k, v, conds) for k, v in ev.observed.items()]
    observed_n = {n: c["n"] for n, c in conds.items() if c["n"] is not None}
    observed_acc = {n: c["accuracy"] for n, c in conds.items() if c["accuracy"] is not None}
    warnings = [w["text"] for w in power_warnings(doc, observed_n=observed_n, observed_acc=observed_acc)
                if w["warn"]]
    planned = doc.get("planned_n")
    if planned:
        for name in sorted({a for s in crit.stats() for a in s.args}):
            n = conds[name]["n"]
            if n is not None and n != planned:
                warnings.append(f"{name} was scored on n = {n} items, not the planned {planned}")
    outcome = "MET" if ev.passed else "NOT MET"
    text = (f"The locked pre-registered criterion (sha256 {lock.sha256[:12]}) `{crit}` is {outcome}: "
            + "; ".join(observed_text) + ".")
    if not ev.passed and doc.get("kill"):
        text += f" Kill criterion: {_sentence(doc['kill'])}"
    elif ev.passed and doc.get("hypothesis"):
        text += f" Supports: {_sentence(doc['hypothesis'])}"
    return {
        "passed": ev.passed,
        "text": text,
        "criterion": str(crit),
        "observed": {k: (float(v) if isinstance(v, Fraction) else v) for k, v in ev.observed.items()},
        "atoms": [{"test": t, "holds": r} for t, r in ev.atoms],
        "warnings": warnings,
    }


def assemble_results(plan: Plan, out: Path, lock: Lock | None) -> dict:
    conditions = {}
    predictions = {}
    for name, cp in plan.conditions.items():
        entry = {"accuracy": None, "n": None, "correct": None, "ids": None, "identity": None,
                 "identity_n": None, "model": cp.model.display(),
                 "adapter": cp.adapter.display() if cp.adapter is not None else None}
        if cp.mc is not None:
            rows = read_rows(step_dir(out, cp.mc.dirname))
            correct = [1 if r["correct"] else 0 for r in rows]
            entry.update(accuracy=sum(correct) / len(correct) if correct else 0.0, n=len(correct),
                         correct=correct, ids=[r["id"] for r in rows])
            predictions[name] = [r.get("prediction") for r in rows]
        if cp.identity is not None:
            s = read_summary(step_dir(out, cp.identity.dirname))
            entry.update(identity=s["score"], identity_n=s["n"])
        conditions[name] = entry
    alpha = lock.document["alpha"] if lock is not None else 0.05
    comparisons = []
    for a, b in plan.comparisons:
        c = {"a": a, "b": b, **compare(conditions[a], conditions[b], alpha)}
        c["changed_predictions"] = sum(1 for x, y in zip(predictions[a], predictions[b]) if x != y)
        comparisons.append(c)
    results = {"conditions": conditions, "comparisons": comparisons, "prereg": None, "verdict": None}
    if lock is not None:
        results["prereg"] = {"sha256": lock.sha256, "criterion": lock.criterion, "split_seed": lock.split_seed}
        results["verdict"] = verdict(results, lock)
    _check_finite(results)
    return results


def _check_finite(obj, where="results"):
    if isinstance(obj, float) and not math.isfinite(obj):
        raise RuntimeError(f"internal error: {where} is not finite")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def load_results(out: Path) -> dict:
    path = Path(out) / RESULTS_FILE
    if not path.is_file():
        raise UserError(f"{out}: no {RESULTS_FILE} (run `pyfuse experiment run SPEC --out {out}` to finish "
                        "the experiment)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None
