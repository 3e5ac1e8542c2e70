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


def report_lines(results: dict) -> list[str]:
    """The report's persona-check table (a row per condition) and the replies
    per prompt; the pairs the run built."""
    conds = {n: c["persona"] for n, c in results["conditions"].items() if c.get("persona")}
    lines = []
    for name, p in (results.get("pairs") or {}).items():
        counts = ", ".join(f"{n} {split}" for split, n in p["written"].items())
        lines.append(f"Pairs `{name}`: {counts} DPO pairs in `{p['data']}` ({p['identical']} left out: the "
                     f"model's reply equals the real one; {p['truncated']} replies cut at max_tokens).\n")
    if not conds:
        return lines
    lines += ["## Persona check\n",
              "| condition | replies that pass | prefer the GOOD example | mean log P(good) − log P(bad) | "
              "with a forbidden phrase | mean words |", "|---|---:|---:|---:|---:|---:|"]
    for n, p in conds.items():
        lines.append(f"| {n} | {p['passed']}/{p['n']} | {p['prefers_good']}/{p['n']} | "
                     f"{p['mean_margin']:+.2f} nats | {p['forbidden_hits']} | {p['mean_words']:.1f} |")
    lines += ["", "Suite: " + next(iter(conds.values()))["suite"] + ". A reply passes when it holds no forbidden "
              "phrase, one of the markers (if any) and at most max_words words.", "",
              "| condition | prompt | reply | passes | margin |", "|---|---|---|---|---:|"]
    for n, p in conds.items():
        lines += [f"| {n} | {_cell(r['prompt'], 40)} | {_cell(r['output'])} | {'yes' if r['passes'] else 'no'} | "
                  f"{r['margin']:+.2f} |" for r in p["rows"]]
    warnings = next(iter(conds.values())).get("warnings") or []
    return lines + [""] + [f"> **Suite warning:** {w}\n" for w in warnings]
