"""PNG plots of the noise floor (matplotlib, Agg backend, written atomically).

* ``noise_floor_weights.png``: weights changed against group size, a line
  per bits, a panel per policy;
* ``noise_floor_kl.png``: mean KL(baseline || fused) against group size
  (when the output level was measured);
* ``noise_floor_retention.png``: the adapter's retention (when an adapter
  with a non-zero delta was given);
* ``noise_floor_drift.png``: weights changed against the round (when
  ``rounds > 1``), a line per (bits, group size), a panel per policy.
"""

from __future__ import annotations

from pathlib import Path
from ..io.files import save_figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    return save_figure(fig, path)


def _by_policy(rows, key):
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    return policies, {p: [r for r in rows if r["policy"] == p and r.get(key) is not None] for p in policies}


def _panels(rows, key: str, ylabel: str, title: str, path: Path, scale: float = 1.0,
            log: bool = False) -> Path | None:
    plt = _pyplot()
    policies, per = _by_policy(rows, key)
    if not any(per.values()):
        return None
    gs_all = sorted({r["group_size"] for r in rows})
    fig, axes = plt.subplots(1, len(policies), figsize=(4.2 * len(policies) + 1.0, 3.6), sharey=True,
                             squeeze=False, layout="constrained")
    for ax, policy in zip(axes[0], policies):
        sel = per[policy]
        for bits in sorted({r["bits"] for r in sel}):
            pts = sorted((r["group_size"], r[key] * scale, r["source"]) for r in sel if r["bits"] == bits)
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, marker="o", label=f"{bits}-bit")
            for x, y, src in pts:
                if src == "model":  # the quantized model's own setting
                    ax.plot([x], [y], marker="*", markersize=14, color="black", zorder=5)
        ax.set_title(policy)
        ax.set_xscale("log", base=2)
        ax.set_xticks(gs_all)
        ax.set_xticklabels([str(g) for g in gs_all])
        ax.set_xlabel("group size")
        if log:
            ax.set_yscale("symlog", linthresh=1e-6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    if handles:
        fig.legend(handles, labels, loc="outside right center", title="bits")
    if any(r["source"] == "model" for r in rows):
        title += "  (★ the model's own setting)"
    fig.suptitle(title)
    saved = _save(fig, path)
    plt.close(fig)
    return saved


def _drift(rows, path: Path) -> Path | None:
    plt = _pyplot()
    if not rows or max(r["rounds"] for r in rows) < 2:
        return None
    policies, per = _by_policy(rows, "drift")
    fig, axes = plt.subplots(1, len(policies), figsize=(4.2 * len(policies), 3.6), sharey=True,
                             squeeze=False, layout="constrained")
    bits_all = sorted({r["bits"] for r in rows})
    gs_all = sorted({r["group_size"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, policy in zip(axes[0], policies):
        for r in sorted(per[policy], key=lambda r: (r["bits"], r["group_size"])):
            ax.plot([d["round"] for d in r["drift"]], [100 * d["weights_changed"] for d in r["drift"]],
                    marker="o", color=colors[bits_all.index(r["bits"]) % len(colors)],
                    linestyle=styles[gs_all.index(r["group_size"]) % len(styles)],
                    label=f"{r['bits']}-bit g{r['group_size']}")
        ax.set_title(policy)
        ax.set_xlabel("round (successive zero-delta fuses)")
        ax.set_xticks(range(1, max(r["rounds"] for r in rows) + 1))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("weights changed vs baseline (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=7,
                   ncol=1 if len(labels) <= 12 else 2)
    fig.suptitle("drift over repeated fuses")
    saved = _save(fig, path)
    plt.close(fig)
    return saved


def plot_all(rows: list[dict], out: Path) -> dict[str, Path]:
    """Every plot that the rows have data for; ``{name: path}``."""
    out = Path(out)
    made = {}
    p = _panels(rows, "weights_changed", "weights changed (%)",
                "zero-delta fuse: share of weights changed", out / "noise_floor_weights.png", scale=100)
    if p:
        made["plot_weights"] = p
    p = _panels(rows, "kl_mean", "mean KL(baseline || fused), nats",
                "zero-delta fuse: output KL per token", out / "noise_floor_kl.png", log=True)
    if p:
        made["plot_kl"] = p
    p = _panels(rows, "retention", "retention of the adapter's delta",
                "adapter fused once: retention", out / "noise_floor_retention.png")
    if p:
        made["plot_retention"] = p
    p = _drift(rows, out / "noise_floor_drift.png")
    if p:
        made["plot_drift"] = p
    return made
