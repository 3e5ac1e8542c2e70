"""The report's figures (:mod:`.report` decides what they show). Each is
written atomically as PNG, without timestamps, so the same results give
the same bytes."""

from __future__ import annotations

from pathlib import Path

from ..io.files import save_figure

ACCURACY_PNG = "accuracy.png"
FLIPS_PNG = "flips.png"
NOISE_FLOOR_PNG = "noise_floor.png"
IDENTITY_PNG = "identity.png"
NULLS_PNG = "nulls.png"
MARGINS_PNG = "flips_by_margin.png"


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


def accuracy_plot(out: Path, names: list[str], accs: list[float], lows: list[float], highs: list[float]) -> str:
    """Accuracy per condition with error bars ``lows``/``highs`` below/above it."""
    fig, ax = _pyplot().subplots(figsize=(max(4, 1.1 * len(names) + 2), 3.6))
    x = range(len(names))
    ax.bar(x, accs, color="#4c78a8", alpha=0.8)
    ax.errorbar(x, accs, yerr=[lows, highs], fmt="none", ecolor="black", capsize=5)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, min(1.0, max(a + h for a, h in zip(accs, highs)) * 1.2 + 0.02))
    ax.set_title("accuracy per condition (Wilson 95 % CI)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, out / ACCURACY_PNG)
    return ACCURACY_PNG


def flips_plot(out: Path, comps: list[dict]) -> str:
    """For each comparison its 2 x 2 table of items right/wrong under A and B."""
    k = len(comps)
    cols = min(k, 3)
    rows_n = -(-k // cols)
    fig, axes = _pyplot().subplots(rows_n, cols, figsize=(3.4 * cols, 3.0 * rows_n), squeeze=False)
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
    _save(fig, out / FLIPS_PNG)
    return FLIPS_PNG


def fuse_settings_plot(out: Path, rows: list[dict]) -> str:
    """Per fuse: the noise floor of its setting (weights and codes changed)
    and the codes the fuse itself changed."""
    fig, ax = _pyplot().subplots(figsize=(max(4.5, 1.4 * len(rows) + 2), 3.6))
    width = 0.27
    xs = list(range(len(rows)))
    series = [("noise floor: weights changed", "nf_weights", "#9ecae1"),
              ("noise floor: codes changed", "nf_codes", "#4292c6"),
              ("fuse: codes changed (fused modules)", "codes_changed", "#e6550d")]
    for j, (label, key, color) in enumerate(series):
        ax.bar([x + (j - 1) * width for x in xs], [(r[key] or 0) * 100 for r in rows], width,
               label=label, color=color)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{'/'.join(r['conditions'])}\n{r['setting']}" for r in rows], fontsize=8)
    ax.set_ylabel("% of weights")
    ax.set_title("what the fuse settings change", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, out / NOISE_FLOOR_PNG)
    return NOISE_FLOOR_PNG


def identity_plot(out: Path, ident: list[tuple[str, dict]]) -> str:
    """Identity-suite score per condition, out of the suite's prompts."""
    fig, ax = _pyplot().subplots(figsize=(max(4, 1.1 * len(ident) + 2), 3.4))
    ax.bar(range(len(ident)), [c["identity"] for _, c in ident], color="#54a24b")
    top = max(c["identity_n"] for _, c in ident)
    ax.axhline(top, color="gray", lw=0.8, ls="--")
    ax.set_xticks(range(len(ident)))
    ax.set_xticklabels([n for n, _ in ident], rotation=20, ha="right")
    ax.set_ylim(0, top * 1.1 + 0.5)
    ax.set_ylabel(f"prompts passed (of {top})")
    ax.set_title("identity-suite score per condition", fontsize=10)
    _save(fig, out / IDENTITY_PNG)
    return IDENTITY_PNG


def nulls_plot(out: Path, nulls: dict) -> str:
    """Per control (placebo, dithered): the K draws' accuracy gain and
    answers changed, with the tested conditions marked."""
    fams = list(nulls["families"].items())
    fig, axes = _pyplot().subplots(len(fams), 2, figsize=(8, 2.2 * len(fams) + 0.6), squeeze=False)
    for row, (role, fam) in enumerate(fams):
        for col, key, unit in ((0, "gain", 100.0), (1, "changed", 1.0)):
            ax = axes[row][col]
            draws = [x * unit for x in fam[key]]
            stack = [sum(1 for y in draws[:i] if abs(y - x) < 1e-9) for i, x in enumerate(draws)]  # ties pile up
            ax.plot(draws, stack, "o", color="#9ecae1", ms=8, alpha=0.9, label=f"{role} (K={len(draws)})")
            ax.set_ylim(-0.8, max(stack) + 1.8)
            for i, (name, t) in enumerate(fam["tested"].items()):
                ax.axvline(t[key] * unit, color=("#e6550d", "#31a354")[i % 2], lw=2,
                           label=f"{name} (p = {t['p_' + key]:.2g})")
            ax.set_yticks([])
            ax.set_xlabel("accuracy gain (points)" if key == "gain" else "answers changed")
            ax.set_title(f"{role}: {'gain' if key == 'gain' else 'answers changed'} vs {nulls['reference']}",
                         fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, out / NULLS_PNG)
    return NULLS_PNG


def margins_plot(out: Path, flips: dict) -> str:
    """Flip rate per margin bin (quintiles of the reference's margin), one
    line per fused condition (seeded ones pooled)."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 3.6))
    for name, f in flips.items():
        xs = [i + 1 for i, b in enumerate(f["bins"]) if b["flip_rate"] is not None]
        ys = [b["flip_rate"] * 100 for b in f["bins"] if b["flip_rate"] is not None]
        ax.plot(xs, ys, "o-", label=name + (f" (x{f['members']})" if f.get("members") else ""))
    ax.set_xticks(range(1, max((len(f["bins"]) for f in flips.values()), default=1) + 1))
    ax.set_xlabel("margin bin of the reference model (quintiles; 1 = smallest margins)")
    ax.set_ylabel("answers flipped (%)")
    ax.set_title("flips concentrate near the decision boundary?", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, out / MARGINS_PNG)
    return MARGINS_PNG
