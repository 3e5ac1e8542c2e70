"""``results.json``: assembled from ``plan.json`` and the step outputs only
(no timings), with sorted keys, so a resumed run writes exactly what an
uninterrupted one does, and ``pyfuse experiment report`` can rebuild it
and refuse a ``results.json`` that says otherwise.

Shape (tools read it)::

    {"datasets": [primary, ...],
     "conditions": {NAME: {"accuracy", "n", "correct", "ids", "predictions",  # the primary dataset's
                           "mc": {DATASET: {"accuracy": float, "n": int, "correct": [0/1 per item],
                                            "ids": [item ids], "predictions": [letter per item]}},
                           "identity": int | null, "identity_n": int | null,
                           "model": path, "adapter": path | null,
                           "family": seeded condition | null, "seed": int | null,
                           "persona": {"passed", "prefers_good", "n", "mean_margin", ..., "rows": [...]} | null}},
     "comparisons": [{"a", "b", "dataset", "diff", "mcnemar_p", "ztest_p", "ci": [low, high],
                      "n", "flips": {"both_correct", "a_only", "b_only", "both_wrong"},
                      "changed_predictions", "mcnemar_p_holm"?, "ztest_p_holm"?}],
     "family": [{"test", "p", "p_holm"}],          # the pre-registered family of tests
     "nulls": {...} | null, "flips": {...}, "decomposition": {...} | null   (:mod:`.analysis`)
     "policies": {"unfused", "dataset", "rows": [...]} | null   (:mod:`.policies`)
     "pairs": {NAME: {"data", "written", "identical", "truncated"}},   # spec.pairs' steps
     "prereg": {"sha256", "criterion", "split_seed"} | null,
     "verdict": {"passed", "text", "criterion", "observed", "atoms", "warnings"} | null}

Members of a seeded condition are conditions ``NAME.i`` with ``family``
NAME. Conditions not evaluated on multiple choice have ``accuracy``/``n``/
``correct`` null. Paths of models the run made are relative to the run
directory (``steps/fuse-<key>/model``; the directory may have been pruned).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

from ..errors import UserError
from .behaviour import behaviour_comparisons, condition_extras
from .analysis import compare, decomposition, family_pvalues, flip_margins, null_distributions, pvalue_of
from .criterion import Stat, parse
from .layout import RESULTS_FILE, STEPS_DIR, step_dir
from .policies import policy_table
from .persona import pairs_results, persona_extras
from .power import observed_warnings
from .prereg import Lock
from .steps import read_rows, read_summary


def _pct_points(x: float) -> str:
    return f"{x * 100:+.2f} points"


def _fmt_observed(stat: Stat, value, mc_of, adjusted: dict) -> str:
    if isinstance(value, Fraction):
        if stat.func == "diff":
            (ka, na), (kb, nb) = [(sum(mc_of(x, stat)["correct"]), mc_of(x, stat)["n"]) for x in stat.args]
            return f"{stat} = {_pct_points(float(value))} ({ka}/{na} vs {kb}/{nb})"
        return f"{stat} = {float(value):.2%} ({value.numerator}/{value.denominator})" \
            if stat.func == "acc" else f"{stat} = {float(value):.4g}"
    if str(stat) in adjusted:
        m, raw = adjusted[str(stat)]
        return f"{stat} = {value:.3g} (Holm-adjusted in a family of {m}; raw {raw:.3g})"
    if isinstance(value, float):
        return f"{stat} = {value:.3g}"
    return f"{stat} = {value}"


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."


def verdict(results: dict, lock: Lock) -> dict:
    """Evaluate exactly the locked criterion on the results (its p values
    Holm-adjusted within the locked family when it has more than one)."""
    doc = lock.document
    crit = parse(doc["criterion"])
    conds = results["conditions"]
    alpha = doc["alpha"]
    primary = (results.get("datasets") or [None])[0]
    families = results.get("families") or {}
    fam = {f["test"]: f for f in results.get("family") or []}
    adjusted = {t: (len(fam), f["p"]) for t, f in fam.items()} if len(fam) > 1 else {}

    def mc_of(name: str, stat: Stat) -> dict:
        mc = (conds[name].get("mc") or {}).get(stat.dataset or primary)
        if mc is None:
            raise UserError(f"{stat}: {name} has no multiple-choice results"
                            + (f" on {stat.dataset}" if stat.dataset else ""))
        return mc

    def lookup(stat: Stat):
        f, args = stat.func, stat.args
        if f == "identity":
            v = conds[args[0]]["identity"]
            if v is None:
                raise UserError(f"{stat}: {args[0]} has no identity score")
            return v
        if str(stat) in adjusted:
            return fam[str(stat)]["p_holm"]
        if f in ("null_p", "mcnemar_p", "ztest_p"):
            for a in args[:1] if f == "null_p" else args:
                mc_of(a, stat)
            return pvalue_of(str(stat), conds, families, alpha, primary)
        if f == "acc":
            c = mc_of(args[0], stat)
            return Fraction(sum(c["correct"]), c["n"])
        if f == "n":
            return mc_of(args[0], stat)["n"]
        a, b = mc_of(args[0], stat), mc_of(args[1], stat)
        if f == "diff":
            return Fraction(sum(a["correct"]), a["n"]) - Fraction(sum(b["correct"]), b["n"])
        ci = compare(a, b, alpha)["ci"]
        return ci[0] if f == "ci_low" else ci[1]

    stats = {str(s): s for s in crit.stats()}
    ev = crit.evaluate(lookup)
    observed_text = [_fmt_observed(stats[k], v, mc_of, adjusted) for k, v in ev.observed.items()]
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
        "warnings": _warnings(doc, results),
    }


def _warnings(doc: dict, results: dict) -> list[str]:
    """The design at the observed numbers (:func:`.power.observed_warnings`),
    and n that differs from what the power analysis assumed."""
    conds = results["conditions"]
    observed_n = {n: c["n"] for n, c in conds.items() if c["n"] is not None}
    observed_acc = {n: c["accuracy"] for n, c in conds.items() if c["accuracy"] is not None}
    warnings = observed_warnings(doc, observed_n, observed_acc)
    for rec in doc.get("power_before_data") or []:
        if "threshold" not in rec or rec.get("n") is None:
            continue
        a = parse(f"{rec['statistic']} > 0").stats()[0].args[0]
        n = conds[a]["n"]
        if n is not None and n != rec["n"]:
            warnings.append(f"{a} was scored on n = {n} items; the power analysis before the data assumed "
                            f"{rec['n']} ({rec['n_source']})")
    return warnings


def _display(art: dict) -> str:
    """An artifact of plan.json as results.json shows it: relative to DIR for step outputs."""
    if "step" in art:
        return f"{STEPS_DIR}/{art['step']}/{art['out']}"
    return art["source"]


def _conditions(plan: dict, out: Path, primary: str | None) -> tuple[dict, dict]:
    conditions, predictions = {}, {}
    for name in plan["condition_order"]:
        c = plan["conditions"][name]
        entry = {"accuracy": None, "n": None, "correct": None, "ids": None, "identity": None,
                 "identity_n": None, "model": _display(c["model"]),
                 "adapter": _display(c["adapter"]) if c.get("adapter") else None,
                 "family": c.get("family"), "seed": c.get("seed"), "mc": {}}
        for ds, d in (c.get("mc_sets") or {}).items():
            rows = read_rows(step_dir(out, d))
            correct = [1 if r["correct"] else 0 for r in rows]
            predictions.setdefault(name, {})[ds] = [r.get("prediction") for r in rows]
            entry["mc"][ds] = {"accuracy": sum(correct) / len(correct) if correct else 0.0, "n": len(correct),
                               "correct": correct, "ids": [r["id"] for r in rows],
                               "predictions": predictions[name][ds]}
        if primary in entry["mc"]:
            entry.update(entry["mc"][primary])
        if c.get("identity"):
            s = read_summary(step_dir(out, c["identity"]))
            entry.update(identity=s["score"], identity_n=s["n"])
        entry.update(condition_extras(c, out))
        entry.update(persona_extras(c, out))
        conditions[name] = entry
    return conditions, predictions


def assemble_results(plan: dict, out: Path, lock: Lock | None) -> dict:
    """``results.json`` from ``plan`` (as in plan.json) and the step outputs in ``out``."""
    datasets = plan.get("datasets") or []
    primary = datasets[0] if datasets else None
    conditions, predictions = _conditions(plan, out, primary)
    families = plan.get("families") or {}
    alpha = lock.document["alpha"] if lock is not None else 0.05
    family = family_pvalues(lock.document.get("family") or [], conditions, families, alpha, primary) \
        if lock is not None and primary else []
    holm_of = {f["test"]: f["p_holm"] for f in family} if len(family) > 1 else {}
    comparisons = []
    for ds in datasets:
        for a, b in plan["comparisons"]:
            if ds not in conditions[a]["mc"] or ds not in conditions[b]["mc"]:
                continue
            c = {"a": a, "b": b, "dataset": ds, **compare(conditions[a]["mc"][ds], conditions[b]["mc"][ds], alpha)}
            c["changed_predictions"] = sum(1 for x, y in zip(predictions[a][ds], predictions[b][ds]) if x != y)
            on = "" if ds == primary else f" @ {ds}"
            for test in ("mcnemar_p", "ztest_p"):
                if f"{test}({a}, {b}{on})" in holm_of:
                    c[f"{test}_holm"] = holm_of[f"{test}({a}, {b}{on})"]
            comparisons.append(c)
    analysis = plan.get("analysis")
    results = {"datasets": datasets, "conditions": conditions, "comparisons": comparisons, "family": family,
               "families": families,
               "nulls": null_distributions(analysis, plan, conditions, predictions, primary),
               "flips": flip_margins(plan, lambda d: read_rows(step_dir(out, d)), conditions, predictions, primary)
               if primary else {},
               "decomposition": decomposition(analysis, plan, conditions, family, alpha, primary),
               "behaviour_comparisons": behaviour_comparisons(plan, out), "pairs": pairs_results(plan, out),
               "policies": policy_table(plan, out, predictions, primary, lambda d: read_rows(step_dir(out, d))),
               "prereg": None, "verdict": None}
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
