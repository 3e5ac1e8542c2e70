"""The report's analysis sections, from ``results.json`` (:mod:`.analysis`
computed every figure): the other multiple-choice datasets, the family of
tests, the null distributions (placebo and dithered), flips by margin and
the decomposition. :mod:`.report` puts them between the comparisons and the
fuses."""

from __future__ import annotations

from pathlib import Path

from .plots import margins_plot, nulls_plot


def analysis_sections(out: Path, results: dict, plan: dict) -> list[str]:
    return (_datasets_section(results, plan) + _family_section(results) + _decomposition_section(results)
            + _nulls_section(out, results) + _flips_section(out, results, plan))


def _head(title: str, intro: str, columns: list[str], align: str) -> list[str]:
    """A section's title, its paragraph and a table's header (``align``: one of l/r per column)."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return [f"## {title}\n", intro + "\n", "| " + " | ".join(columns) + " |", rule]


def _p(x) -> str:
    return "—" if x is None else f"{x:.3g}"


def _pts(x: float) -> str:
    return f"{x * 100:+.2f} pts"


def _datasets_section(results: dict, plan: dict) -> list[str]:
    others = (results.get("datasets") or [])[1:]
    if not others:
        return []
    lines = ["## Other datasets\n"]
    order = plan.get("condition_order") or list(results["conditions"])
    for ds in others:
        conds = {n: results["conditions"][n]["mc"][ds] for n in order
                 if ds in results["conditions"][n].get("mc", {}) and not results["conditions"][n].get("family")}
        lines += [f"**{ds}**: accuracy per condition\n", "| condition | accuracy | n |", "|---|---:|---:|"]
        lines += [f"| {n} | {c['accuracy']:.1%} ({sum(c['correct'])}/{c['n']}) | {c['n']} |" for n, c in conds.items()]
        comps = [c for c in results.get("comparisons", []) if c["dataset"] == ds]
        if comps:
            lines += ["", "| A | B | A − B | 95 % CI (Newcombe) | McNemar p | answers changed |",
                      "|---|---|---:|---:|---:|---:|"]
            lines += [f"| {c['a']} | {c['b']} | {_pts(c['diff'])} | [{c['ci'][0] * 100:+.1f}, {c['ci'][1] * 100:+.1f}] | "
                      f"{_p(c['mcnemar_p'])} | {c['changed_predictions']} |" for c in comps]
        lines.append("")
    return lines


def _family_section(results: dict) -> list[str]:
    fam = results.get("family") or []
    if len(fam) < 2:
        return []
    lines = _head("The family of tests",
                  f"The pre-registration declares {len(fam)} tests as one family: their p values are adjusted with "
                  "Holm's step-down method (statsmodels' multipletests), and the criterion reads the adjusted ones.",
                  ["test", "p (raw)", "p (Holm)"], "lrr")
    lines += [f"| `{f['test']}` | {_p(f['p'])} | {_p(f['p_holm'])} |" for f in fam]
    return lines + [""]


def _decomposition_section(results: dict) -> list[str]:
    d = results.get("decomposition")
    if not d:
        return []
    lines = _head("Decomposition",
                  f"What each part of the pipeline does to accuracy on {d['dataset']} (reference: {d['reference']}). "
                  f"Intervals: Newcombe 95 % for a pair, the range over the members for a distribution; p: McNemar "
                  f"(paired) for a pair, the empirical p for a distribution; Holm-adjusted within {d['holm_within']}.",
                  ["effect", "A", "B", "A − B", "interval", "p", "p (Holm)"], "lllrrrr")
    for r in d["rows"]:
        lo, hi = r["interval"]
        lines.append(f"| {r['effect']} | {r['a']} | {r['b']} | {_pts(r['diff'])} | [{lo * 100:+.1f}, {hi * 100:+.1f}] "
                     f"({r['interval_kind']}) | {_p(r['p'])} | {_p(r['p_holm'])} |")
    return lines + [""]


def _nulls_section(out: Path, results: dict) -> list[str]:
    nulls = results.get("nulls")
    if not nulls:
        return []
    lines = _head("Null distributions",
                  f"Each control is a distribution of K draws: `placebo` adapters (the trained adapter's singular "
                  f"values on random directions: its size, no content) and `dithered` zero-delta fuses (the stock "
                  f"grid, stochastic rounding: the fuse's noise, no delta). Gain: accuracy minus "
                  f"{nulls['reference']}'s on {nulls['dataset']}; changed: answers that differ from "
                  f"{nulls['reference']}'s. Empirical p: (1 + #{{draws at least as large}}) / (K + 1), one-sided; its "
                  "smallest value is 1 / (K + 1).",
                  ["control", "K", "gain: range (mean)", "changed: range", "tested", "its gain", "p (gain)",
                   "its changed", "p (changed)"], "lrrrlrrrr")
    for role, fam in nulls["families"].items():
        g, ch = fam["gain"], fam["changed"]
        tested = sorted(fam["tested"].items(), key=lambda kv: kv[0] != nulls["trained"])  # the trained one first
        for name, t in tested:
            label = role if role == fam["condition"] else f"{role} ({fam['condition']})"
            lines.append(f"| {label} | {len(g)} | {_pts(min(g))} to {_pts(max(g))} "
                         f"({_pts(sum(g) / len(g))}) | {min(ch)} to {max(ch)} | {name} | {_pts(t['gain'])} | "
                         f"{_p(t['p_gain'])} | {t['changed']} | {_p(t['p_changed'])} |")
    lines.append("")
    lines.append(f"![null distributions]({nulls_plot(out, nulls)})\n")
    return lines


def _flips_section(out: Path, results: dict, plan: dict) -> list[str]:
    order = plan.get("condition_order") or []
    first = {plan["conditions"][n].get("family") or n: i for i, n in reversed(list(enumerate(order)))}
    flips = dict(sorted((results.get("flips") or {}).items(), key=lambda kv: first.get(kv[0], len(order))))
    if not flips:
        return []
    lines = _head("Flips by margin",
                  "Does re-quantization flip the items near the decision boundary? For every fused condition, per "
                  "item: whether its answer differs from the model it was fused into, and that model's margin "
                  "between its top two letters (log-probabilities, the `logprob` scorer). Bins: quintiles of the "
                  "margins; test: Mann-Whitney U, one-sided (flipped items have smaller margins; scipy). A seeded "
                  "condition is pooled over its members (an item counts as flipped if it flips in any).",
                  ["condition", "flipped", "flip rate by margin bin (low → high margin)",
                   "median margin: flipped / not", "Mann-Whitney p"], "lrlrr")
    for name, f in flips.items():
        rates = " · ".join("—" if b["flip_rate"] is None else f"{b['flip_rate']:.0%}" for b in f["bins"])
        t = f["test"]
        med = f"{t['median_flipped']:.3g} / {t['median_unflipped']:.3g}" if t else "—"
        label = name + (f" (x{f['members']})" if f.get("members") else "")
        lines.append(f"| {label} | {f['flipped']}/{f['n']} | {rates} | {med} | {_p(t['pvalue']) if t else '—'} |")
    lines.append("")
    lines.append(f"![flip rate by margin]({margins_plot(out, flips)})\n")
    return lines
