"""``report.md`` and its plots, from ``results.json``, ``plan.json`` and the
step outputs of a run directory (``pyfuse experiment report DIR`` rewrites
them at any time). Every file is written atomically.

* ``accuracy.png``: accuracy per condition with its Wilson 95 % interval;
* ``flips.png``: for each comparison, the 2 x 2 table of items right/wrong
  under A and B (the discordant cells are all that McNemar's test uses);
* ``noise_floor.png``: for each fuse setting used, the share of weights and
  codes a zero-delta fuse changes in the whole model (the noise floor) and
  the codes the real fuse changed in the fused modules;
* ``identity.png``: identity-suite scores per condition;
* the verdict in one sentence at the top.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io.files import save_figure
from ..errors import UserError
from ..io.files import atomic_write_text
from .engine import PLAN_FILE, STEPS_DIR
from .results import load_results

REPORT_FILE = "report.md"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    try:
        return save_figure(fig, path)
    finally:
        _pyplot().close(fig)


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
            fdir = out / STEPS_DIR / st["step"]
            rep = _read_json(fdir / "fuse_report.json") or {}
            summ = rep.get("summary", {})
            nf_dir = st.get("noise_floor")
            nf = _read_json(out / STEPS_DIR / nf_dir / "noise_floor.json") if nf_dir else None
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
                "pruned": (fdir / "pruned.json").exists(),
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
    lock = _read_json(out / "prereg.json")
    plt = _pyplot()
    order = [n for n in plan.get("condition_order", plan.get("conditions", {})) if n in results["conditions"]]
    order += [n for n in results["conditions"] if n not in order]
    conds = {n: results["conditions"][n] for n in order}  # the spec's order
    lines: list[str] = []
    title = plan.get("name") or out.name
    lines.append(f"# Experiment: {title}\n")
    v = results.get("verdict")
    if v is not None:
        lines.append(f"**Verdict.** {v['text']}\n")
        for w in v.get("warnings", []):
            lines.append(f"> **Warning:** {w}\n")
    else:
        lines.append("**Verdict.** No pre-registration: descriptive results only.\n")

    # conditions
    lines.append("## Conditions\n")
    lines.append("| condition | from | stages | accuracy | 95 % CI (Wilson) | n | identity | model |")
    lines.append("|---|---|---|---:|---:|---:|---:|---|")
    mc_names = [n for n, c in conds.items() if c.get("correct") is not None]
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
    if mc_names:
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(mc_names) + 2), 3.6))
        accs, los, his = [], [], []
        for n_ in mc_names:
            c = conds[n_]
            lo, hi = _wilson(sum(c["correct"]), c["n"])
            accs.append(c["accuracy"])
            los.append(c["accuracy"] - lo)
            his.append(hi - c["accuracy"])
        x = range(len(mc_names))
        ax.bar(x, accs, color="#4c78a8", alpha=0.8)
        ax.errorbar(x, accs, yerr=[los, his], fmt="none", ecolor="black", capsize=5)
        ax.set_xticks(list(x))
        ax.set_xticklabels(mc_names, rotation=20, ha="right")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, min(1.0, max(a + h for a, h in zip(accs, his)) * 1.2 + 0.02))
        ax.set_title("accuracy per condition (Wilson 95 % CI)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        _save(fig, out / "accuracy.png")
        lines.append("![accuracy per condition](accuracy.png)\n")

    # comparisons
    comps = results.get("comparisons", [])
    if comps:
        lines.append("## Comparisons\n")
        level = comps[0].get("ci_level", 0.95)
        lines.append(f"| A | B | A − B | {level:.0%} CI (Newcombe) | McNemar p (paired) | z-test p | A right, B wrong "
                     "| A wrong, B right | answers changed |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for c in comps:
            f = c["flips"]
            lines.append(f"| {c['a']} | {c['b']} | {c['diff'] * 100:+.2f} pts | [{c['ci'][0] * 100:+.1f}, "
                         f"{c['ci'][1] * 100:+.1f}] | {c['mcnemar_p']:.3g} | {c['ztest_p']:.3g} | {f['a_only']} | "
                         f"{f['b_only']} | {c.get('changed_predictions', '—')} |")
        lines.append("")
        for c in comps:
            f = c["flips"]
            lines.append(f"**{c['a']} vs {c['b']}** (n = {c['n']}):\n")
            lines.append(f"| | {c['b']} right | {c['b']} wrong |")
            lines.append("|---|---:|---:|")
            lines.append(f"| {c['a']} right | {f['both_correct']} | {f['a_only']} |")
            lines.append(f"| {c['a']} wrong | {f['b_only']} | {f['both_wrong']} |")
            lines.append("")
        k = len(comps)
        cols = min(k, 3)
        rows_n = -(-k // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 3.0 * rows_n), squeeze=False)
        for i, c in enumerate(comps):
            ax = axes[i // cols][i % cols]
            f = c["flips"]
            m = [[f["both_correct"], f["a_only"]], [f["b_only"], f["both_wrong"]]]
            ax.imshow([[0, 1], [1, 0]], cmap="Blues", vmin=-1, vmax=3)
            for r in range(2):
                for q in range(2):
                    ax.text(q, r, str(m[r][q]), ha="center", va="center", fontsize=13,
                            fontweight="bold" if r != q else "normal")
            ax.set_xticks([0, 1])
            ax.set_xticklabels([f"{c['b']} right", f"{c['b']} wrong"])
            ax.set_yticks([0, 1])
            ax.set_yticklabels([f"{c['a']} right", f"{c['a']} wrong"])
            ax.set_title(f"{c['a']} vs {c['b']}: McNemar p = {c['mcnemar_p']:.3g}", fontsize=9)
        for j in range(k, rows_n * cols):
            axes[j // cols][j % cols].axis("off")
        fig.tight_layout()
        _save(fig, out / "flips.png")
        lines.append("![flip tables](flips.png)\n")

    # noise floor
    fuses = _fuse_rows(plan, out)
    if fuses:
        lines.append("## Fuses and the noise floor of their settings\n")
        lines.append("Noise floor: a zero delta fused into every quantized tensor of the input model at that "
                     "setting (`pyfuse noise-floor`). Retention/noise: the real fuse, over the fused modules "
                     "(undefined for a zero-delta adapter).\n")
        lines.append("| fuse | conditions | setting | adapter | modules | retention | noise | codes changed "
                     "(fused modules) | noise floor: weights changed | codes changed | KL mean | top-1 flips |")
        lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in fuses:
            lines.append(f"| {r['fuse']}{' (pruned)' if r['pruned'] else ''} | {', '.join(r['conditions'])} | "
                         f"{r['setting']} | {'zero-delta' if r['zero'] else 'trained'} | {_num(r['modules'], 'd')} | "
                         f"{_num(r['retention'])} | {_num(r['noise'])} | {_pct(r['codes_changed'], 2)} | "
                         f"{_pct(r['nf_weights'], 2)} | {_pct(r['nf_codes'], 2)} | {_num(r['nf_kl'])} | "
                         f"{_pct(r['nf_top1'])} |")
        lines.append("")
        plotted = [r for r in fuses if r["nf_weights"] is not None or r["codes_changed"] is not None]
        if plotted:
            fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(plotted) + 2), 3.6))
            width = 0.27
            xs = list(range(len(plotted)))
            series = [("noise floor: weights changed", "nf_weights", "#9ecae1"),
                      ("noise floor: codes changed", "nf_codes", "#4292c6"),
                      ("fuse: codes changed (fused modules)", "codes_changed", "#e6550d")]
            for j, (label, key, color) in enumerate(series):
                ax.bar([x + (j - 1) * width for x in xs], [(r[key] or 0) * 100 for r in plotted], width,
                       label=label, color=color)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{'/'.join(r['conditions'])}\n{r['setting']}" for r in plotted], fontsize=8)
            ax.set_ylabel("% of weights")
            ax.set_title("what the fuse settings change", fontsize=10)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            ax.grid(axis="y", alpha=0.3)
            _save(fig, out / "noise_floor.png")
            lines.append("![noise floor](noise_floor.png)\n")

    # identity
    ident = [(n, c) for n, c in conds.items() if c.get("identity") is not None]
    if ident:
        lines.append("## Identity\n")
        lines.append("| condition | score |")
        lines.append("|---|---:|")
        for n, c in ident:
            lines.append(f"| {n} | {c['identity']}/{c['identity_n']} |")
        lines.append("")
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(ident) + 2), 3.4))
        ax.bar(range(len(ident)), [c["identity"] for _, c in ident], color="#54a24b")
        top = max(c["identity_n"] for _, c in ident)
        ax.axhline(top, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(ident)))
        ax.set_xticklabels([n for n, _ in ident], rotation=20, ha="right")
        ax.set_ylim(0, top * 1.1 + 0.5)
        ax.set_ylabel(f"prompts passed (of {top})")
        ax.set_title("identity-suite score per condition", fontsize=10)
        _save(fig, out / "identity.png")
        lines.append("![identity scores](identity.png)\n")

    # pre-registration
    lines.append("## Pre-registration\n")
    if lock is None:
        lines.append("None. Without a locked criterion these results are exploratory.\n")
    else:
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
    return atomic_write_text(out / REPORT_FILE, "\n".join(lines) + "\n")
