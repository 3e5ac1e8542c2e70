"""The persona check (:mod:`pyfuse.evals.persona`) and the DPO pairs in an
experiment's results and report: per condition the check's summary and its
per-prompt rows (what `pyfuse eval persona --out` writes), per ``pairs``
entry how many pairs its step wrote."""

from __future__ import annotations

from pathlib import Path

from .layout import PAIRS_DATA, STEPS_DIR, step_dir
from .steps import read_rows, read_summary

SUMMARY_KEYS = ("suite", "n", "passed", "prefers_good", "mean_margin", "mean_words", "forbidden_hits", "warnings")


def persona_extras(c: dict, out: Path) -> dict:
    """``persona`` of one condition of plan.json: the summary and ``rows``, or None."""
    if not c.get("persona"):
        return {"persona": None}
    d = step_dir(out, c["persona"])
    s = read_summary(d)
    return {"persona": {**{k: s.get(k) for k in SUMMARY_KEYS}, "rows": read_rows(d)}}


def pairs_results(plan: dict, out: Path) -> dict:
    """``{NAME: {"data": path in DIR, "written": {split: n}, "identical", "truncated"}}``."""
    res = {}
    for name, d in (plan.get("pairs") or {}).items():
        s = read_summary(step_dir(out, d))
        res[name] = {"data": f"{STEPS_DIR}/{d}/{PAIRS_DATA}", "written": s["written"], "identical": s["identical"],
                     "truncated": s["truncated"]}
    return res


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def _pairs_lines(results: dict) -> list[str]:
    made = results.get("pairs") or {}
    if not made:
        return []
    lines = ["## DPO pairs\n", "| pairs | written | left out (the model's reply equals the real one) | "
             "replies cut at max_tokens | data |", "|---|---|---:|---:|---|"]
    for name, p in made.items():
        counts = ", ".join(f"{n} {split}" for split, n in p["written"].items())
        lines.append(f"| {name} | {counts} | {p['identical']} | {p['truncated']} | `{p['data']}` |")
    return lines + [""]


def report_lines(results: dict, plan: dict) -> list[str]:
    """The DPO pairs the run built; the persona-check table (a row per
    condition, in the spec's order) and the replies per prompt."""
    lines = _pairs_lines(results)
    order = plan.get("condition_order") or list(results["conditions"])
    conds = {n: results["conditions"][n]["persona"] for n in order if results["conditions"][n].get("persona")}
    if not conds:
        return lines
    lines += ["## Persona check\n",
              "| condition | what it is | replies that pass | prefer the GOOD example | "
              "mean log P(good) − log P(bad) | with a forbidden phrase | mean words |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for n, p in conds.items():
        what = _cell(plan["conditions"][n].get("description") or "", 80)
        lines.append(f"| {n} | {what} | {p['passed']}/{p['n']} | {p['prefers_good']}/{p['n']} | "
                     f"{p['mean_margin']:+.2f} nats | {p['forbidden_hits']} | {p['mean_words']:.1f} |")
    lines += ["", "Suite: " + next(iter(conds.values()))["suite"] + ". A reply passes when it holds no forbidden "
              "phrase, one of the markers (if any) and at most max_words words.", "",
              "| condition | prompt | reply | passes | margin |", "|---|---|---|---|---:|"]
    for n, p in conds.items():
        lines += [f"| {n} | {_cell(r['prompt'], 40)} | {_cell(r['output'])} | {'yes' if r['passes'] else 'no'} | "
                  f"{r['margin']:+.2f} |" for r in p["rows"]]
    warnings = next(iter(conds.values())).get("warnings") or []
    return lines + [""] + [f"> **Suite warning:** {w}\n" for w in warnings]
