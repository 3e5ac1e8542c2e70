"""Power before data: what the design can detect, computed from the spec and
the data before any model runs (``pyfuse experiment validate`` prints it,
``run`` checks it before locking the pre-registration).

* :func:`predicted_n`: the items each multiple-choice dataset will have. A
  data file: its rows (``limit`` applied). A Set-G split: the mining data's
  rows per category times ``setg.expected_both_wrong`` (the share both
  models are expected to get wrong), put through the split rule itself
  (:func:`pyfuse.data.setg.split_sizes`). Otherwise ``planned_n``.
* :func:`power_table`: for every threshold ``diff(A, B) >= T`` (or ``>``,
  T > 0) of the criterion, at that n and the locked alpha and power, the
  minimum detectable effect of the unpaired two-proportion test (from
  ``baseline_accuracy``; :func:`pyfuse.stats.min_detectable_effect`) and of
  the paired McNemar test (from the expected discordance: given, or the
  share of multiple-choice answers a zero-delta fuse flips in a noise-floor
  result, which bounds it from above; :func:`pyfuse.stats.mcnemar_mde`).
  The test the criterion applies to that pair decides (``mcnemar_p``:
  paired; otherwise unpaired); when its p value is Holm-adjusted in a
  family of m, the MDE is taken at alpha / m (Holm's first step, the
  conservative case). A ``null_p(A, F)`` test is checked too: with K
  members its smallest p is 1 / (K + 1).
* A threshold is under-powered when the deciding MDE exceeds it or cannot
  be computed; :func:`underpowered` lists them, and the lock refuses them
  unless ``allow_underpowered`` (with its reason, which is locked).

The same functions give the verdict's warnings after the run, at the
observed n and the control's observed accuracy (:func:`observed_warnings`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from .criterion import parse, parse_pvalue
from .estimate import count_rows

DIGITS = 6  # figures stored in the lock are rounded, so that the same spec and data give the same hash


def discordance_from_noise_floor(path, policy: str = "stock") -> tuple[float, str]:
    """The share of multiple-choice answers a zero-delta fuse changes, from
    a noise-floor result (``pyfuse noise-floor --mc``): the row of the
    model's own setting with ``policy`` (the largest over its rounds' final
    figure). Returns ``(share, description)``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a readable noise-floor result ({err})") from None
    cands = [r for r in rows if r.get("policy") == policy and r.get("mc_flip") is not None]
    own = [r for r in cands if r.get("source") == "model"] or cands
    if not own:
        raise UserError(f"{path}: no multiple-choice flips for policy {policy!r} (run pyfuse noise-floor with "
                        "--mc on the model's own setting)")
    row = max(own, key=lambda r: r["mc_flip"])
    if not 0 < row["mc_flip"] <= 1:
        raise UserError(f"{path}: the {policy} zero-delta fuse flips {row['mc_flip']!r} of the answers: no "
                        "discordance to plan with (give expected_discordance)")
    return float(row["mc_flip"]), (f"MC answers a zero-delta {policy} fuse flips at {row.get('bits')}-bit "
                                   f"g{row.get('group_size')} ({path.name}; an upper bound)")


def predicted_n(spec) -> dict[str, dict]:
    """``{dataset: {"n": int | None, "source": text}}`` for every
    multiple-choice dataset of the spec (see the module doc)."""
    pr = spec.preregistration
    planned = pr.planned_n if pr is not None else None
    out = {}
    for mc in spec.evaluation.mc_sets:
        n, source = None, None
        if mc.data in spec.data:
            path = spec.resolve(spec.data[mc.data])
            rows = count_rows(path) if path.is_file() else 0
            if rows:
                n, source = rows, f"rows of {path.name}"
            else:
                source = f"{path.name} has no rows yet"
        elif spec.setg is not None:
            sg = spec.setg
            path = spec.resolve(spec.data[sg.data])
            split = mc.data.split(".", 1)[1]
            if sg.expected_both_wrong is None:
                source = "needs setg.expected_both_wrong"
            elif path.is_file():
                n, source = _setg_n(path, sg, split)
            else:
                source = f"{path.name} does not exist yet"
        if n is not None and mc.limit is not None:
            n = min(n, mc.limit)
        if n is None and planned is not None:
            n, source = planned, "planned_n" + (f"; {source}" if source else "")
        out[mc.dataset] = {"n": n, "source": source or "unknown"}
    return out


def _setg_n(path: Path, sg, split: str) -> tuple[int | None, str]:
    """The expected size of a Set-G split: the data's rows per category
    times ``expected_both_wrong``, put through the split rule."""
    from ..data.mmlu import load_mc
    from ..data.setg import split_sizes

    try:
        items = load_mc(path, limit=sg.limit)
    except UserError as err:
        return None, f"cannot read the Set-G data ({err})"
    by_cat: dict[str, int] = {}
    for it in items:
        by_cat[it.category] = by_cat.get(it.category, 0) + 1
    expected = {c: round(k * sg.expected_both_wrong) for c, k in by_cat.items()}
    sizes = split_sizes(expected, sg.split.model_dump(), sg.valid_frac)
    return (sum(v[split] for v in sizes.values()),
            f"{len(items)} rows x {sg.expected_both_wrong:g} expected Set-G, the {split} share of the split")


def discordance(spec) -> tuple[float | None, str | None]:
    pr = spec.preregistration
    if pr is None:
        return None, None
    if pr.expected_discordance is not None:
        return pr.expected_discordance, "expected_discordance"
    if pr.discordance_from is not None:
        path = spec.resolve(pr.discordance_from)
        if path.is_file():
            return discordance_from_noise_floor(path)
        return None, f"{path} does not exist yet"
    return None, None


def family_of(pr) -> list[str]:
    """The family of tests (normalised): declared, or the criterion's p values."""
    if pr.family is not None:
        return [str(parse_pvalue(t)) for t in pr.family]
    return [str(s) for s in parse(pr.criterion).pvalues()]


def _round(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), DIGITS)


def threshold_record(th: dict, *, n, n_source, baseline, psi, psi_source, alpha, power, test, m) -> dict:
    """One threshold's power: both MDEs, the deciding one, and the verdict."""
    from ..stats import mcnemar_mde, min_detectable_effect

    alpha_used = alpha / m
    unpaired = paired = None
    no_n = n is None or n < 2
    notes = {"unpaired": "needs n" if no_n else "needs baseline_accuracy",
             "paired": "needs n" if no_n else "needs expected_discordance or discordance_from"}
    if n is not None and n >= 2 and baseline is not None:
        unpaired = min_detectable_effect(n, baseline, alpha=alpha_used, power=power)
        notes["unpaired"] = "not reachable" if math.isnan(unpaired) else None
    if n is not None and n >= 2 and psi is not None:
        paired = mcnemar_mde(n, psi, alpha=alpha_used, power=power)
        notes["paired"] = "not reachable" if math.isnan(paired) else None
    decides = "paired" if test == "mcnemar_p" else "unpaired"
    mde = paired if decides == "paired" else unpaired
    threshold = th["threshold"]
    if mde is None or math.isnan(mde):
        why = (f"the {decides} MDE cannot be computed ({notes[decides]})" if mde is None else
               f"not even the largest possible {decides} effect is detectable at n = {n}")
        under = True
    else:
        under = mde > threshold
        why = (f"{decides} MDE {mde * 100:.1f} points {'>' if under else '<='} the {threshold * 100:g}-point "
               "threshold")
    return {"statistic": th["statistic"], "op": th["op"], "threshold": threshold, "n": n, "n_source": n_source,
            "alpha": alpha, "alpha_used": _round(alpha_used), "family_size": m, "power": power,
            "baseline": baseline, "mde_unpaired": _round(unpaired), "discordance": _round(psi),
            "discordance_source": psi_source, "mde_paired": _round(paired), "notes": notes, "test": test,
            "decides": decides,
            "underpowered": under, "text": f"{th['statistic']} {th['op']} {th['value']}: {why}"}


def power_table(spec) -> list[dict]:
    """One record per threshold and per ``null_p`` test of the criterion
    (see the module doc); empty without a pre-registration."""
    pr = spec.preregistration
    if pr is None:
        return []
    crit = parse(pr.criterion)
    family = family_of(pr)
    m = len(family) if len(family) > 1 else 1
    ns = predicted_n(spec)
    primary = spec.evaluation.mc_sets[0].dataset if spec.evaluation.mc_sets else None
    psi, psi_source = discordance(spec)
    tests = {(s.args, s.dataset): s for s in crit.pvalues() if s.func != "null_p"}
    out = []
    for stat, th in _diff_thresholds(crit):
        p = tests.get((stat.args, stat.dataset))  # the criterion's test of that pair
        test = p.func if p is not None else None
        m_here = m if p is not None and str(p) in family else 1
        info = ns.get(stat.dataset or primary, {"n": None, "source": "unknown"})
        out.append(threshold_record(th, n=info["n"], n_source=info["source"], baseline=pr.baseline_accuracy,
                                    psi=psi, psi_source=psi_source, alpha=pr.alpha, power=pr.power, test=test,
                                    m=m_here))
    for stat in crit.pvalues():
        if stat.func == "null_p":
            k = spec.conditions[stat.args[1]].seeds
            alpha_used = pr.alpha / (m if str(stat) in family else 1)
            under = 1 / (k + 1) >= alpha_used
            out.append({"statistic": str(stat), "members": k, "min_p": _round(1 / (k + 1)),
                        "alpha_used": _round(alpha_used), "underpowered": under,
                        "text": f"{stat}: with {k} members the smallest p is 1/{k + 1} = {1 / (k + 1):.3g}"
                                + (f", not below {alpha_used:.3g}" if under else "")})
    return out


def _diff_thresholds(crit):
    """``(stat, {statistic, op, value, threshold})`` of every
    ``diff(A, B) >= T`` / ``> T`` with T > 0 (number on either side)."""
    from .criterion import Num, Stat

    flip = {">=": "<=", ">": "<", "<=": ">=", "<": ">"}
    for c in crit.comparisons():
        if isinstance(c.left, Stat) and isinstance(c.right, Num):
            stat, op, num = c.left, c.op, c.right
        elif isinstance(c.left, Num) and isinstance(c.right, Stat):
            stat, op, num = c.right, flip.get(c.op, c.op), c.left
        else:
            continue
        if stat.func != "diff" or op not in (">=", ">") or num.value <= 0:
            continue
        yield stat, {"statistic": str(stat), "op": op, "value": num.text, "threshold": float(num.value)}


def underpowered(table: list[dict]) -> list[dict]:
    return [r for r in table if r["underpowered"]]


def observed_warnings(document: dict, observed_n: dict, observed_acc: dict) -> list[str]:
    """After the run: each locked threshold's deciding MDE at the observed n
    of A (and, for the unpaired test, the observed accuracy of B, the
    control; the paired test keeps the pre-registered discordance), when it
    exceeds the threshold: the same MDE functions as before the data."""
    out = []
    for rec in document.get("power_before_data") or []:
        if "threshold" not in rec:
            continue
        a, b = parse(f"{rec['statistic']} > 0").stats()[0].args
        n, p0 = observed_n.get(a), observed_acc.get(b)
        if n is None or n < 2 or p0 is None or not 0 < p0 < 1:
            continue
        th = {"statistic": rec["statistic"], "op": rec["op"], "value": f"{rec['threshold']:g}",
              "threshold": rec["threshold"]}
        obs = threshold_record(th, n=n, n_source="observed", baseline=p0, psi=rec.get("discordance"),
                               psi_source=rec.get("discordance_source"), alpha=rec["alpha"], power=rec["power"],
                               test=rec["test"], m=rec["family_size"])
        if obs["underpowered"]:
            basis = ((f"the pre-registered discordance {rec['discordance']:g}" if rec.get("discordance") is not None
                      else "no pre-registered discordance") if obs["decides"] == "paired" else
                     f"{p0 * 100:.1f} % (observed accuracy of {b})")
            out.append(f"at n = {n} (observed) per condition, alpha {obs['alpha_used']:g}, power {rec['power']:g}, "
                       f"from {basis}, {rec['statistic']} is under-powered: {obs['text'].split(': ', 1)[1]}")
    return out


def power_lines(spec) -> list[str]:
    """What the design can detect, for the screen (``validate`` and the start
    of ``run``): the predicted n of each dataset and its conditions, then one
    line per threshold of the criterion."""
    from .resolve import evaluated_suites

    pr = spec.preregistration
    if not spec.evaluation.mc_sets:
        return []
    lines = []
    mc_conditions = [n + (f" (x{c.seeds})" if c.seeds else "") for n, c in spec.conditions.items()
                     if "mc" in evaluated_suites(spec, n)]
    for ds, info in predicted_n(spec).items():
        n = "unknown" if info["n"] is None else f"{info['n']} items"
        lines.append(f"predicted n on {ds}: {n} per condition ({info['source']}); "
                     f"conditions: {', '.join(mc_conditions)}")
    if pr is None:
        return lines
    family = family_of(pr)
    lines.append(f"power before data: alpha {pr.alpha:g} (two-sided), power {pr.power:g}; family of "
                 f"{len(family)} test(s)" + (" (Holm)" if len(family) > 1 else "") + f": {', '.join(family)}")
    for rec in power_table(spec):
        lines.append(f"  {record_line(rec)}")
    return lines


def record_line(rec: dict) -> str:
    """One record of :func:`power_table` in words: both MDEs, what decides, the verdict."""
    if "threshold" not in rec:
        return rec["text"] + (" -> UNDER-POWERED" if rec["underpowered"] else "")
    parts = []
    for kind, key in (("unpaired", "mde_unpaired"), ("paired", "mde_paired")):
        if kind == "unpaired":
            basis = f"from {_pct(rec['baseline'])}"
        else:
            basis = (f"discordance {rec['discordance']:g}, {rec['discordance_source']}"
                     if rec["discordance"] is not None else "")
        v, note = rec[key], rec["notes"][kind]
        parts.append(f"{kind} MDE " + (f"{v * 100:.1f} points ({basis})" if v is not None else f"{note}"
                                       + (f" ({basis})" if note == "not reachable" else "")))
    decided = (f"{rec['test']}" if rec["test"] else "no p-value test on the pair") + \
        (f" at alpha {rec['alpha_used']:.3g} (Holm, conservative)" if rec["family_size"] > 1 else "")
    return (f"{rec['statistic']} {rec['op']} {rec['threshold'] * 100:g} points at n = {rec['n']}: "
            + "; ".join(parts) + f"; decides: {rec['decides']} ({decided})"
            + (" -> UNDER-POWERED" if rec["underpowered"] else " -> adequately powered"))


def _pct(x) -> str:
    return "baseline unknown" if x is None else f"{x * 100:.1f} %"
