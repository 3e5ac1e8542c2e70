"""The behaviour-rate evaluation and the stacked adapters' subspace overlap
in an experiment's results and report (:mod:`pyfuse.evals.behaviour`,
:mod:`pyfuse.analysis.subspace`): per condition its rates with Wilson
intervals and the overlap warnings of its stacked adapters; per
comparison pair of the spec, McNemar per behaviour on the paired
generations."""

from __future__ import annotations

import json
from pathlib import Path

from .layout import SUMMARY, step_dir
from .steps import read_rows, read_summary


def condition_extras(c: dict, out: Path) -> dict:
    """``behaviour`` (the rates of summary.json) and ``overlaps`` of one
    condition of plan.json."""
    extra: dict = {"behaviour": None, "overlaps": []}
    if c.get("behaviour"):
        extra["behaviour"] = read_summary(step_dir(out, c["behaviour"]))["rates"]
    for d in c.get("overlaps") or []:
        s = json.loads((step_dir(out, d) / SUMMARY).read_text(encoding="utf-8"))
        extra["overlaps"].append({k: s.get(k) for k in ("overlap", "chance", "max_overlap", "max_overlap_module",
                                                         "shared_modules", "warnings")})
    return extra


def behaviour_comparisons(plan: dict, out: Path) -> list[dict]:
    """Exact McNemar per behaviour for every comparison pair both of whose
    conditions ran the behaviour suite."""
    from ..evals.behaviour import BehaviourResult, compare_behaviour

    def result(name: str) -> BehaviourResult:
        d = step_dir(out, plan["conditions"][name]["behaviour"])
        return BehaviourResult(rates=read_summary(d)["rates"], rows=read_rows(d), model=name)

    rows = []
    for a, b in plan["comparisons"]:
        if plan["conditions"][a].get("behaviour") and plan["conditions"][b].get("behaviour"):
            for name, t in compare_behaviour(result(a), result(b)).tests.items():
                rows.append({"a": a, "b": b, "behaviour": name, **t})
    return rows


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _rate_cell(r: dict | None) -> str:
    if not r or not r["n"]:
        return "—"
    return f"{r['k']}/{r['n']} {_pct(r['rate'])} [{_pct(r['low'])}, {_pct(r['high'])}]"


def report_lines(results: dict) -> list[str]:
    """The report's sections: behaviour rates, their comparisons, overlap warnings."""
    conds = {n: c for n, c in results["conditions"].items() if c.get("behaviour")}
    lines = []
    if conds:
        first = next(iter(conds.values()))["behaviour"]
        cols = [(b, None) for b in first] + [(b, g) for b in first for g in first[b].get("per_group", {})]
        lines += ["## Behaviour rates\n", "| condition | " + " | ".join(
            f"{b} ({g or 'all'})" for b, g in cols) + " |", "|---|" + "---:|" * len(cols)]
        for n, c in conds.items():
            rates = [c["behaviour"][b] if g is None else c["behaviour"][b].get("per_group", {}).get(g)
                     for b, g in cols]
            lines.append(f"| {n} | " + " | ".join(_rate_cell(r) for r in rates) + " |")
        lines += ["", "Rates with their 95 % Wilson intervals, overall and per prompt group.", ""]
    comps = results.get("behaviour_comparisons") or []
    if comps:
        lines += ["## Behaviour comparisons (paired generations, exact McNemar)\n",
                  "| A | B | behaviour | A | B | A − B | McNemar p | A only | B only |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {t['a']} | {t['b']} | {t['behaviour']} | {_pct(t['rate_a'])} | {_pct(t['rate_b'])} | "
                  f"{100 * t['diff']:+.1f} pts | {t['pvalue']:.3g} | {t['a_only']} | {t['b_only']} |" for t in comps]
        lines.append("")
    for n, c in results["conditions"].items():
        for o in c.get("overlaps") or []:
            lines += [f"> **Warning ({n}):** {w}\n" for w in o["warnings"]]
    return lines
