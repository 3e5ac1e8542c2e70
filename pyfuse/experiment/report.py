"""``report.md`` and its plots, from ``results.json``, ``plan.json`` and the
step outputs of a run directory (``pyfuse experiment report DIR`` rewrites
them at any time). Every file is written atomically.

Before writing, everything the verdict rests on is verified, and any
mismatch is refused: the pre-registration lock (:func:`.prereg.read_lock`),
the data files it hashed (:func:`.prereg.verify_data`), every finished
step's outputs against their recorded hashes (:func:`.outputs.check_outputs`)
and ``results.json`` against the results rebuilt from those outputs.

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
* the family of tests, the other datasets, the null distributions, flips by
  margin and the decomposition (:mod:`.report_analysis`);
* the pre-registration.

Every interval comes from :func:`pyfuse.stats.wilson_interval` (clamped to
contain the accuracy), so a count of 0 or n never gives a negative error bar.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..io.files import atomic_write_text
from ..stats import wilson_interval
from .behaviour import report_lines as behaviour_report_lines
from .persona import report_lines as persona_report_lines
from .layout import DONE, FUSE_REPORT, LOCK_FILE, NOISE_FLOOR, PLAN_FILE, PRUNED, REPORT_FILE, STEPS_DIR, step_dir
from .outputs import check_outputs
from .policies import report_lines as policy_report_lines
from .power import record_line
from .plots import accuracy_plot, flips_plot, fuse_settings_plot, identity_plot
from .prereg import read_lock, verify_data
from .report_analysis import analysis_sections
from .results import assemble_results, load_results


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


def _verified(out: Path, plan: dict, results: dict):
    """The lock, its data, the step outputs and results.json, checked (see
    the module doc); returns the lock (None without a pre-registration)."""
    lock = read_lock(out)
    if lock is not None:
        verify_data(lock)
    elif results.get("prereg") is not None:
        raise UserError(f"{out}: results.json names a pre-registration but {LOCK_FILE} is gone")
    for st in plan.get("steps", []):
        if (step_dir(out, st["dir"]) / DONE).is_file():
            check_outputs(step_dir(out, st["dir"]), label=st["labels"][0] if st.get("labels") else "")
    rebuilt = json.loads(json.dumps(assemble_results(plan, out, lock), sort_keys=True))
    if rebuilt != results:
        raise UserError(f"{out}: results.json does not match the finished steps' outputs (was it edited?); "
                        "run the experiment again to rewrite it")
    return lock


def write_report(out: str | os.PathLike) -> Path:
    """Write ``report.md`` and the PNGs into the run directory ``out``."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out} is not a directory (expected a pyfuse experiment run directory)")
    results = load_results(out)
    plan = _read_json(out / PLAN_FILE)
    if plan is None:
        raise UserError(f"{out}: no readable {PLAN_FILE} (is this a pyfuse experiment directory?)")
    lock = _verified(out, plan, results)
    record = _read_json(out / LOCK_FILE) if lock is not None else None
    order = [n for n in plan.get("condition_order", plan.get("conditions", {})) if n in results["conditions"]]
    order += [n for n in results["conditions"] if n not in order]
    conds = {n: results["conditions"][n] for n in order}  # the spec's order
    v = results.get("verdict")
    lines = [f"# Experiment: {plan.get('name') or out.name}\n"]
    lines += _verdict_lines(v)
    lines += _conditions_section(out, plan, conds)
    primary = (results.get("datasets") or [None])[0]
    lines += _comparisons_section(out, [c for c in results.get("comparisons", []) if c.get("dataset") == primary])
    lines += analysis_sections(out, results, plan)
    lines += _fuses_section(out, [r for r in _fuse_rows(plan, out)
                                  if not any(plan["conditions"][n].get("family") for n in r["conditions"])])
    lines += policy_report_lines(results)
    lines += _identity_section(out, conds)
    lines += behaviour_report_lines(results)
    lines += persona_report_lines(results, plan)
    lines += _prereg_section(lock.document if lock else None, record, v)
    return atomic_write_text(out / REPORT_FILE, "\n".join(lines) + "\n")


def _verdict_lines(v: dict | None) -> list[str]:
    if v is None:
        return ["**Verdict.** No pre-registration: descriptive results only.\n"]
    return [f"**Verdict.** {v['text']}\n"] + [f"> **Warning:** {w}\n" for w in v.get("warnings", [])]


def _interval(c: dict) -> tuple[float, float] | None:
    """The Wilson interval of a condition's accuracy (None without items)."""
    if not c.get("n"):
        return None
    return wilson_interval(sum(c["correct"]), c["n"])



def _stage_label(st: dict) -> str:
    """A stage in the conditions table: a fuse with its setting, a full fine-tune marked."""
    if st["kind"] == "fuse":
        return f"fuse ({st['setting']})"
    if st["kind"] == "train" and st.get("options", {}).get("fine_tune_type") == "full":
        layers = st["options"].get("layers")
        return "train (full" + (f", layers {layers})" if layers is not None else ")")
    return st["kind"]


def _conditions_section(out: Path, plan: dict, conds: dict) -> list[str]:
    lines = ["## Conditions\n",
             "| condition | from | stages | accuracy | 95 % CI (Wilson) | n | identity | model |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    shown = {n: c for n, c in conds.items() if not c.get("family")}
    for name, c in shown.items():
        pc = plan["conditions"].get(name, {})
        stages = " → ".join(_stage_label(st) for st in pc.get("stages", [])) or "—"
        ci = _interval(c)
        if ci is not None:
            k, n = sum(c["correct"]), c["n"]
            acc, ci_text = f"{c['accuracy']:.1%} ({k}/{n})", f"[{ci[0]:.1%}, {ci[1]:.1%}]"
        else:
            acc, ci_text, n = "—", "—", c.get("n") if c.get("n") == 0 else "—"
        ident = f"{c['identity']}/{c['identity_n']}" if c.get("identity") is not None else "—"
        model = f"`{c['model']}`" + (" (pruned)" if c["model"].startswith(STEPS_DIR + "/")
                                     and not (out / c["model"]).exists() else "")
        if c.get("adapter"):
            model += f" + adapter `{c['adapter']}`"
        lines.append(f"| {name} | {pc.get('from', '')} | {stages} | {acc} | {ci_text} | {n} | {ident} | {model} |")
    families = plan.get("families") or {}
    for fam in sorted(families, key=lambda f: list(conds).index(families[f][0]) if families[f][0] in conds else 0):
        members = families[fam]
        accs = [conds[m]["accuracy"] for m in members if conds[m].get("accuracy") is not None]
        if accs:
            lines.append(f"| {fam} (x{len(members)}) | {plan['conditions'][members[0]].get('from', '')} | "
                         f"seeded: see the null distributions | mean {sum(accs) / len(accs):.1%} "
                         f"(range {min(accs):.1%} - {max(accs):.1%}) | — | {conds[members[0]]['n']} | — | "
                         f"{len(members)} models |")
    lines.append("")
    mc_names = [n for n, c in shown.items() if _interval(c) is not None]
    if mc_names:
        accs, lows, highs = [], [], []
        for name in mc_names:
            c, (lo, hi) = conds[name], _interval(conds[name])
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
    holm = any("mcnemar_p_holm" in c or "ztest_p_holm" in c for c in comps)
    lines = ["## Comparisons\n",
             f"Paired on the same {comps[0]['n']} items of {comps[0]['dataset']}."
             + (" Holm: adjusted within the pre-registered family (— for a test outside it)." if holm else "")
             + "\n",
             f"| A | B | A − B | {level:.0%} CI (Newcombe) | McNemar p (paired) |" + (" Holm |" if holm else "")
             + " z-test p | A right, B wrong | A wrong, B right | answers changed |",
             "|---|---|---:|---:|---:|" + ("---:|" if holm else "") + "---:|---:|---:|---:|"]
    for c in comps:
        f = c["flips"]
        adj = c.get("mcnemar_p_holm", c.get("ztest_p_holm"))
        lines.append(f"| {c['a']} | {c['b']} | {c['diff'] * 100:+.2f} pts | [{c['ci'][0] * 100:+.1f}, "
                     f"{c['ci'][1] * 100:+.1f}] | {c['mcnemar_p']:.3g} |"
                     + ((f" {adj:.3g} |" if adj is not None else " — |") if holm else "")
                     + f" {c['ztest_p']:.3g} | {f['a_only']} | {f['b_only']} | {c.get('changed_predictions', '—')} |")
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


def _prereg_section(doc: dict | None, record: dict | None, v: dict | None) -> list[str]:
    lines = ["## Pre-registration\n"]
    if doc is None:
        return lines + ["None. Without a locked criterion these results are exploratory.\n"]
    lines.append(f"- SHA-256: `{record.get('sha256')}` (locked {record.get('locked_at')}; split seed "
                 f"{record.get('split_seed')} = {record.get('seed_rule')}); verified before this report, with "
                 f"the SHA-256 of {len(doc.get('data') or {})} data file(s)")
    lines.append(f"- Hypothesis: {doc.get('hypothesis')}")
    planned, baseline = doc.get("planned_n"), doc.get("baseline_accuracy")
    params = [f"alpha {doc.get('alpha')}", f"power {doc.get('power')}"]
    params += [f"planned n {planned}"] if planned is not None else []
    params += [f"baseline accuracy {baseline}"] if baseline is not None else []
    params += [f"expected discordance {doc['expected_discordance']}"] if doc.get("expected_discordance") else []
    lines.append(f"- Criterion: `{doc.get('criterion')}` ({', '.join(params)})")
    family = doc.get("family") or []
    if len(family) > 1:
        lines.append(f"- Family of tests (Holm-adjusted together; the criterion uses the adjusted p values): "
                     + ", ".join(f"`{t}`" for t in family))
    if doc.get("kill"):
        lines.append(f"- Kill criterion: {doc['kill']}")
    for name, desc in (doc.get("tests") or {}).items():
        lines.append(f"- `{name}`: {desc}")
    for rec in doc.get("power_before_data") or []:
        lines.append(f"- Power before data: {record_line(rec)}")
    if doc.get("allow_underpowered"):
        lines.append(f"- Locked although under-powered, because: {doc.get('underpowered_reason')}")
    if v is not None:
        for atom in v.get("atoms", []):
            lines.append(f"- `{atom['test']}`: {'holds' if atom['holds'] else 'does not hold'}")
    lines.append("")
    return lines
