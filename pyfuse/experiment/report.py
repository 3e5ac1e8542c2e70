"""``report.md`` and its plots, from ``results.json``, ``plan.json`` and the
step outputs of a run directory (``pyfuse experiment report DIR`` rewrites
them at any time). Every file is written atomically.

* the verdict in one sentence at the top;
* the conditions (accuracy with its Wilson 95 % interval, identity score,
  model) and ``accuracy.png``;
* the comparisons and their flip tables, ``flips.png``: for each
  comparison, the 2 x 2 table of items right/wrong under A and B (the
  discordant cells are all that McNemar's test uses);
* the fuses and ``noise_floor.png``: for each fuse setting used, the share
  of weights and codes a zero-delta fuse changes in the whole model (the
  noise floor) and the codes the real fuse changed in the fused modules;
* identity-suite scores per condition, ``identity.png``;
* the pre-registration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..io.files import atomic_write_text
from .layout import FUSE_REPORT, LOCK_FILE, NOISE_FLOOR, PLAN_FILE, PRUNED, REPORT_FILE, STEPS_DIR, step_dir
from .plots import accuracy_plot, flips_plot, fuse_settings_plot, identity_plot
from .results import load_results


def _wilson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return float(lo), float(hi)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _noise_row(nf: dict | None, opts: dict) -> dict | None:
    if not nf:
        return None
    rows = [r for r in nf.get("rows", []) if r.get("policy") == opts.get("policy")
            and r.get("group_size") == opts.get("group_size") and r.get("bits") == opts.get("bits")]
    rows.sort(key=lambda r: r.get("source") != "model")
    return rows[0] if rows else None


def _pct(x, digits=1) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f} %"


def _num(x, fmt=".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _fuse_rows(plan: dict, out: Path) -> list[dict]:
    """One row per distinct fuse step: setting, fidelity of the real fuse,
    noise floor of the setting."""
    steps = {s["dir"]: s for s in plan.get("steps", [])}
    seen, rows = set(), []
    pconds = plan.get("conditions", {})
    for name in plan.get("condition_order", list(pconds)):
        c = pconds[name]
        stages = c.get("stages", [])
        for i, st in enumerate(stages):
            if st["kind"] != "fuse" or st["step"] in seen:
                continue
            seen.add(st["step"])
            fdir = step_dir(out, st["step"])
            rep = _read_json(fdir / FUSE_REPORT) or {}
            summ = rep.get("summary", {})
            nf_dir = st.get("noise_floor")
            nf = _read_json(step_dir(out, nf_dir) / NOISE_FLOOR) if nf_dir else None
            nrow = _noise_row(nf, steps.get(nf_dir, {}).get("options", {})) if nf_dir else None
            users = [n for n in plan.get("condition_order", list(pconds)) for cc in [pconds[n]]
                     if any(s2["kind"] == "fuse" and s2["step"] == st["step"] for s2 in cc.get("stages", []))]
            rows.append({
                "fuse": st["step"], "conditions": users, "setting": st.get("setting"),
                "zero": i > 0 and stages[i - 1]["kind"] == "zero",
                "modules": summ.get("modules_fused"), "retention": summ.get("retention"),
                "noise": summ.get("noise"), "codes_changed": summ.get("codes_changed"),
                "nf_weights": nrow.get("weights_changed") if nrow else None,
                "nf_codes": nrow.get("codes_changed") if nrow else None,
                "nf_kl": nrow.get("kl_mean") if nrow else None,
                "nf_top1": nrow.get("top1_flip") if nrow else None,
                "pruned": (fdir / PRUNED).exists(),
            })
    return rows


def write_report(out: str | os.PathLike) -> Path:
    """Write ``report.md`` and the PNGs into the run directory ``out``."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory (expected a pyfuse experiment run directory)")
    results = load_results(out)
    plan = _read_json(out / PLAN_FILE)
    if plan is None:
        raise UserError(f"{out}: no readable {PLAN_FILE} (is this a pyfuse experiment directory?)")
    lock = _read_json(out / LOCK_FILE)
    order = [n for n in plan.get("condition_order", plan.get("conditions", {})) if n in results["conditions"]]
    order += [n for n in results["conditions"] if n not in order]
    conds = {n: results["conditions"][n] for n in order}  # the spec's order
    v = results.get("verdict")
    lines = [f"# Experiment: {plan.get('name') or out.name}\n"]
    lines += _verdict_lines(v)
    lines += _conditions_section(out, plan, conds)
    lines += _comparisons_section(out, results.get("comparisons", []))
    lines += _fuses_section(out, _fuse_rows(plan, out))
    lines += _identity_section(out, conds)
    lines += _prereg_section(lock, v)
    return atomic_write_text(out / REPORT_FILE, "\n".join(lines) + "\n")


def _verdict_lines(v: dict | None) -> list[str]:
    if v is None:
        return ["**Verdict.** No pre-registration: descriptive results only.\n"]
    return [f"**Verdict.** {v['text']}\n"] + [f"> **Warning:** {w}\n" for w in v.get("warnings", [])]


def _conditions_section(out: Path, plan: dict, conds: dict) -> list[str]:
    lines = ["## Conditions\n",
             "| condition | from | stages | accuracy | 95 % CI (Wilson) | n | identity | model |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for name, c in conds.items():
        pc = plan["conditions"].get(name, {})
        stages = " → ".join(st["kind"] + (f" ({st['setting']})" if st["kind"] == "fuse" else "")
                            for st in pc.get("stages", [])) or "—"
        if c.get("correct") is not None:
            k, n = sum(c["correct"]), c["n"]
            lo, hi = _wilson(k, n)
            acc, ci = f"{c['accuracy']:.1%} ({k}/{n})", f"[{lo:.1%}, {hi:.1%}]"
        else:
            acc, ci, n = "—", "—", "—"
        ident = f"{c['identity']}/{c['identity_n']}" if c.get("identity") is not None else "—"
        model = f"`{c['model']}`" + (" (pruned)" if c["model"].startswith(STEPS_DIR + "/")
                                     and not (out / c["model"]).exists() else "")
        if c.get("adapter"):
            model += f" + adapter `{c['adapter']}`"
        lines.append(f"| {name} | {pc.get('from', '')} | {stages} | {acc} | {ci} | {n} | {ident} | {model} |")
    lines.append("")
    mc_names = [n for n, c in conds.items() if c.get("correct") is not None]
    if mc_names:
        accs, lows, highs = [], [], []
        for name in mc_names:
            c = conds[name]
            lo, hi = _wilson(sum(c["correct"]), c["n"])
            accs.append(c["accuracy"])
            lows.append(c["accuracy"] - lo)
            highs.append(hi - c["accuracy"])
        png = accuracy_plot(out, mc_names, accs, lows, highs)
        lines.append(f"![accuracy per condition]({png})\n")
    return lines


def _comparisons_section(out: Path, comps: list[dict]) -> list[str]:
    if not comps:
        return []
    level = comps[0].get("ci_level", 0.95)
    lines = ["## Comparisons\n",
             f"| A | B | A − B | {level:.0%} CI (Newcombe) | McNemar p (paired) | z-test p | A right, B wrong "
             "| A wrong, B right | answers changed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in comps:
        f = c["flips"]
        lines.append(f"| {c['a']} | {c['b']} | {c['diff'] * 100:+.2f} pts | [{c['ci'][0] * 100:+.1f}, "
                     f"{c['ci'][1] * 100:+.1f}] | {c['mcnemar_p']:.3g} | {c['ztest_p']:.3g} | {f['a_only']} | "
                     f"{f['b_only']} | {c.get('changed_predictions', '—')} |")
    lines.append("")
    for c in comps:
        f = c["flips"]
        lines += [f"**{c['a']} vs {c['b']}** (n = {c['n']}):\n",
                  f"| | {c['b']} right | {c['b']} wrong |",
                  "|---|---:|---:|",
                  f"| {c['a']} right | {f['both_correct']} | {f['a_only']} |",
                  f"| {c['a']} wrong | {f['b_only']} | {f['both_wrong']} |",
                  ""]
    lines.append(f"![flip tables]({flips_plot(out, comps)})\n")
    return lines


def _fuses_section(out: Path, fuses: list[dict]) -> list[str]:
    if not fuses:
        return []
    lines = ["## Fuses and the noise floor of their settings\n",
             "Noise floor: a zero delta fused into every quantized tensor of the input model at that "
             "setting (`pyfuse noise-floor`). Retention/noise: the real fuse, over the fused modules "
             "(undefined for a zero-delta adapter).\n",
             "| fuse | conditions | setting | adapter | modules | retention | noise | codes changed "
             "(fused modules) | noise floor: weights changed | codes changed | KL mean | top-1 flips |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in fuses:
        lines.append(f"| {r['fuse']}{' (pruned)' if r['pruned'] else ''} | {', '.join(r['conditions'])} | "
                     f"{r['setting']} | {'zero-delta' if r['zero'] else 'trained'} | {_num(r['modules'], 'd')} | "
                     f"{_num(r['retention'])} | {_num(r['noise'])} | {_pct(r['codes_changed'], 2)} | "
                     f"{_pct(r['nf_weights'], 2)} | {_pct(r['nf_codes'], 2)} | {_num(r['nf_kl'])} | "
                     f"{_pct(r['nf_top1'])} |")
    lines.append("")
    plotted = [r for r in fuses if r["nf_weights"] is not None or r["codes_changed"] is not None]
    if plotted:
        lines.append(f"![noise floor]({fuse_settings_plot(out, plotted)})\n")
    return lines


def _identity_section(out: Path, conds: dict) -> list[str]:
    ident = [(n, c) for n, c in conds.items() if c.get("identity") is not None]
    if not ident:
        return []
    lines = ["## Identity\n", "| condition | score |", "|---|---:|"]
    lines += [f"| {n} | {c['identity']}/{c['identity_n']} |" for n, c in ident]
    lines.append("")
    lines.append(f"![identity scores]({identity_plot(out, ident)})\n")
    return lines


def _prereg_section(lock: dict | None, v: dict | None) -> list[str]:
    lines = ["## Pre-registration\n"]
    if lock is None:
        return lines + ["None. Without a locked criterion these results are exploratory.\n"]
    doc = lock.get("document", {})
    lines.append(f"- SHA-256: `{lock.get('sha256')}` (locked {lock.get('locked_at')}; split seed "
                 f"{lock.get('split_seed')} = {lock.get('seed_rule')})")
    lines.append(f"- Hypothesis: {doc.get('hypothesis')}")
    planned, baseline = doc.get("planned_n"), doc.get("baseline_accuracy")
    params = [f"alpha {doc.get('alpha')}", f"power {doc.get('power')}"]
    params += [f"planned n {planned}"] if planned is not None else []
    params += [f"baseline accuracy {baseline}"] if baseline is not None else []
    lines.append(f"- Criterion: `{doc.get('criterion')}` ({', '.join(params)})")
    unset = []  # what prereg.power_warnings then falls back on
    if planned is None:
        unset.append("planned n not set, the observed n is used")
    if baseline is None:
        unset.append("baseline accuracy not set, the observed accuracy of B in diff(A, B) is used")
    if unset:
        lines.append(f"- Power check: {'; '.join(unset)}.")
    if doc.get("kill"):
        lines.append(f"- Kill criterion: {doc['kill']}")
    for name, desc in (doc.get("tests") or {}).items():
        lines.append(f"- `{name}`: {desc}")
    if v is not None:
        for atom in v.get("atoms", []):
            lines.append(f"- `{atom['test']}`: {'holds' if atom['holds'] else 'does not hold'}")
    lines.append("")
    return lines
