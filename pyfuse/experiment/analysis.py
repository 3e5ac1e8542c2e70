"""The analyses of ``results.json`` beyond single accuracies, each computed by
:mod:`pyfuse.stats` (statsmodels / scipy) on the per-item outcomes:

* :func:`compare`: one pair of conditions on one dataset (McNemar, z-test,
  Newcombe, the flip table);
* :func:`family_pvalues`: the pre-registered family of tests, raw and
  Holm-adjusted p values;
* :func:`null_distributions`: where the trained condition's accuracy gain
  and answers-changed count (against the reference) fall among the members
  of the placebo and dithered conditions (empirical p);
* :func:`flip_margins`: for every fused condition, per item, whether its
  answer flipped against the model it was fused into and that model's
  margin between its top two letters; flip rate by margin bin and a
  Mann-Whitney test that flips sit at small margins;
* :func:`decomposition`: fuse effect, content effect (against the zero-delta
  twin and against the placebo distribution), fuse-vs-runtime effect, each
  with its interval and adjusted p.

Conditions are the ``results["conditions"]`` entries: per dataset
``mc[ds] = {"accuracy", "n", "correct", "ids"}``; ``predictions[name][ds]``
are the answered letters, in the same item order.
"""

from __future__ import annotations

from statistics import mean

import numpy as np

from ..errors import UserError
from ..stats import diff_confint, empirical_p, holm, margin_test, mcnemar, two_proportion_ztest
from .criterion import parse_pvalue

MARGIN_BINS = 5  # quantile bins of the reference margins


def _ztest_p(k1, n1, k2, n2) -> float:
    try:
        return two_proportion_ztest(k1, n1, k2, n2).pvalue
    except UserError:  # every item has the same outcome in both: no evidence of a difference
        return 1.0


def compare(a: dict, b: dict, alpha: float) -> dict:
    """Two conditions' outcomes on the same items (``{"correct", "ids"}``)."""
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


def changed(pa: list, pb: list) -> int:
    return sum(1 for x, y in zip(pa, pb) if x != y)


def member_accuracies(conds: dict, members: list[str], ds: str) -> list[float]:
    return [conds[m]["mc"][ds]["accuracy"] for m in members]


def pvalue_of(text: str, conds: dict, families: dict, alpha: float, primary: str) -> float:
    """The raw p value of one p-valued statistic (``mcnemar_p(A, B)``,
    ``ztest_p(A, B @ ds)``, ``null_p(A, F)``)."""
    stat = parse_pvalue(text)
    ds = stat.dataset or primary
    a, b = stat.args
    if stat.func == "null_p":
        return empirical_p(conds[a]["mc"][ds]["accuracy"], member_accuracies(conds, families[b], ds))
    return compare(conds[a]["mc"][ds], conds[b]["mc"][ds], alpha)[stat.func]


def family_pvalues(family: list[str], conds: dict, families: dict, alpha: float, primary: str) -> list[dict]:
    """``[{"test", "p", "p_holm"}]``: the family's raw p values and Holm's
    adjustment (:func:`pyfuse.stats.holm`; a family of one is unadjusted)."""
    raw = [pvalue_of(t, conds, families, alpha, primary) for t in family]
    adjusted = holm(raw, alpha) if len(raw) > 1 else raw
    return [{"test": t, "p": p, "p_holm": q} for t, p, q in zip(family, raw, adjusted)]


def _reference(analysis: dict, plan: dict) -> str:
    return analysis.get("reference") or plan["conditions"][analysis["trained"]]["from"]


def null_distributions(analysis: dict | None, plan: dict, conds: dict, predictions: dict,
                       primary: str) -> dict | None:
    """For the trained condition (and its zero-delta twin): accuracy gain and
    answers changed against the reference, and where they fall among the
    members of each seeded control (empirical p, one-sided: as large or
    larger)."""
    if not analysis or not primary:
        return None
    ref = _reference(analysis, plan)
    ds = primary

    def point(name: str) -> dict:
        return {"gain": conds[name]["mc"][ds]["accuracy"] - conds[ref]["mc"][ds]["accuracy"],
                "changed": changed(predictions[name][ds], predictions[ref][ds])}

    out = {"trained": analysis["trained"], "reference": ref, "dataset": ds, "families": {}}
    tested = {role: analysis.get(role) for role in ("trained", "zero") if analysis.get(role)}
    for role in ("placebo", "dithered"):
        fam = analysis.get(role)
        if not fam:
            continue
        draws = [point(m) for m in plan["families"][fam]]
        entry = {"condition": fam, "members": plan["families"][fam],
                 "gain": [d["gain"] for d in draws], "changed": [d["changed"] for d in draws], "tested": {}}
        for trole, name in tested.items():
            obs = point(name)
            entry["tested"][name] = {**obs, "p_gain": empirical_p(obs["gain"], entry["gain"]),
                                     "p_changed": empirical_p(obs["changed"], entry["changed"])}
        out["families"][role] = entry
    return out if out["families"] else None


def _margin(logprobs: dict) -> float:
    top = sorted(logprobs.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def flip_margins(plan: dict, read_rows, conds: dict, predictions: dict, primary: str) -> dict:
    """Per fused condition (and pooled per seeded condition): flip rate by
    quantile bin of the reference's margin, and the Mann-Whitney test that
    flipped items have smaller margins (:func:`pyfuse.stats.margin_test`).
    ``read_rows(step dir)`` gives an evaluation's rows."""
    out: dict = {}
    groups: dict[str, list[str]] = {}
    for name, c in plan["conditions"].items():
        if c.get("margins") and c.get("flip_reference") and name in predictions:
            groups.setdefault(c.get("family") or name, []).append(name)
    for label, names in groups.items():
        c0 = plan["conditions"][names[0]]
        ref_rows, margin_rows = read_rows(c0["flip_reference"]), read_rows(c0["margins"])
        ids = conds[names[0]]["mc"][primary]["ids"]
        if [r["id"] for r in ref_rows] != ids or [r["id"] for r in margin_rows] != ids:
            raise UserError(f"{label}: the reference answers were not scored on the same items")
        margins = np.array([_margin(r["logprobs"]) for r in margin_rows])
        ref_pred = [r["prediction"] for r in ref_rows]
        freq = np.mean([[p != q for p, q in zip(predictions[n][primary], ref_pred)] for n in names], axis=0)
        out[label] = _binned(margins, freq, members=len(names) if c0.get("family") else None,
                             reference=c0["flip_reference"])
    return out


def _binned(margins: np.ndarray, freq: np.ndarray, *, members: int | None, reference: str) -> dict:
    finite = np.isfinite(margins)
    edges = np.unique(np.quantile(margins[finite], np.linspace(0, 1, MARGIN_BINS + 1))) if finite.any() else []
    bins = []
    for i in range(max(len(edges) - 1, 0)):
        lo, hi = edges[i], edges[i + 1]
        inside = finite & (margins >= lo) & ((margins < hi) if i < len(edges) - 2 else (margins <= hi))
        n = int(inside.sum())
        bins.append({"low": float(lo), "high": float(hi), "n": n,
                     "flip_rate": float(freq[inside].mean()) if n else None})
    flipped = freq > 0
    test = margin_test(margins[flipped & finite], margins[~flipped & finite])
    return {"reference_step": reference, "members": members, "n": int(len(margins)),
            "flipped": int(flipped.sum()), "flip_rate": float(freq.mean()) if len(freq) else 0.0,
            "bins": bins, "test": test.to_dict() if test is not None else None}


def decomposition(analysis: dict | None, plan: dict, conds: dict, fam_pvalues: list[dict], alpha: float,
                  primary: str) -> dict | None:
    """The effects of the stacking study, each as a difference of accuracies
    with its interval and its p value, raw and Holm-adjusted: within the
    pre-registered family when every test here is in it, else within this
    table (exploratory)."""
    if not analysis or not primary:
        return None
    ds, ref = primary, _reference(analysis, plan)
    trained, zero, unfused = analysis["trained"], analysis.get("zero"), analysis.get("unfused")
    rows = []

    def pair(effect: str, a: str | None, b: str | None) -> None:
        if a and b:
            c = compare(conds[a]["mc"][ds], conds[b]["mc"][ds], alpha)
            rows.append({"effect": effect, "a": a, "b": b, "diff": c["diff"], "interval": c["ci"],
                         "interval_kind": "Newcombe", "test": f"mcnemar_p({a}, {b})", "p": c["mcnemar_p"]})

    def spread(effect: str, a: str | None, fam: str | None) -> None:
        if a and fam:
            accs = member_accuracies(conds, plan["families"][fam], ds)
            acc = conds[a]["mc"][ds]["accuracy"]
            rows.append({"effect": effect, "a": a, "b": f"{fam} (x{len(accs)})", "diff": acc - mean(accs),
                         "interval": [acc - max(accs), acc - min(accs)], "interval_kind": "range over members",
                         "test": f"null_p({a}, {fam})", "p": empirical_p(acc, accs)})

    pair("fuse effect (zero-delta fuse vs reference)", zero, ref)
    pair("content effect (trained vs zero-delta twin)", trained, zero)
    spread("content effect (trained vs placebo distribution)", trained, analysis.get("placebo"))
    spread("fuse noise (zero-delta twin vs dithered distribution)", zero, analysis.get("dithered"))
    pair("fuse-vs-runtime effect (fused vs unfused adapter)", trained, unfused)
    if not rows:
        return None
    in_family = {f["test"]: f["p_holm"] for f in fam_pvalues}
    canonical = [str(parse_pvalue(r["test"])) for r in rows]
    if len(in_family) > 1 and all(t in in_family for t in canonical):
        adjusted, scope = [in_family[t] for t in canonical], "the pre-registered family"
    else:
        adjusted, scope = (holm([r["p"] for r in rows], alpha) if len(rows) > 1 else [rows[0]["p"]]), \
            "this table (exploratory)"
    for r, q in zip(rows, adjusted):
        r["p_holm"] = q
    return {"reference": ref, "dataset": ds, "holm_within": scope, "rows": rows}
