"""``pyfuse probe``: centroids and routing profiles of prompt sets for one or
more models (:mod:`.hidden`), how far each model's centroids moved from the
first model's, and how an adapter's deltas line up with the centroids.

Per prompt set and layer, against the first model (the reference):

* ``distance`` = ``||c - c0||``, ``relative`` = ``distance / ||c0||``, and
  ``cosine(c, c0)``;
* ``routing_tv``: the total variation distance between the two routing
  profiles (half the L1 distance of the expert shares; 0 the same routing,
  1 disjoint experts).

Per adapter module in block ``l``, against each prompt set's centroid
direction ``u`` of the first model: ``read`` = ``||dW u|| / ||dW||_F`` for
the projections that read the hidden state (:data:`READERS`; ``u`` the
centroid of block ``l``'s input) and ``write`` = ``||u^T dW|| / ||dW||_F``
for those that write into it (:data:`WRITERS`; ``u`` the centroid of block
``l``'s output); for a SwitchLinear over all experts together. A direction drawn at
random gives ``1/sqrt(hidden)`` on average (``chance``): a value well above
it means the delta acts along the centroid. (The blocks normalise their
input before the projections; the centroid is taken before that norm.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..io.files import read_text
from .hidden import PromptSet, SetStats, probe_sets


# The projections that read the block's (normed) hidden state, and those that
# write into it (mlx-lm's names); others (e.g. o_proj's input) see other spaces.
READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "gate", "router")
WRITERS = ("o_proj", "down_proj")


@dataclass
class PromptSource:
    """A prompt set before tokenising: ``(user text, system prompt)`` pairs."""

    name: str
    turns: list[tuple[str, str | None]]


def read_prompt_sets(path: str | os.PathLike, system_prompt: str | None = None) -> list[PromptSource]:
    """A behaviour suite (YAML/JSON with ``prompts``: one set per ``group``,
    each prompt with its system prompt) or a text file (one prompt a line,
    one set named after the file, with ``system_prompt``)."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        from ..evals.behaviour import load_suite

        suite = load_suite(path)
        sets: dict[str, list] = {}
        for p in suite.prompts:
            sets.setdefault(p.group or path.stem, []).append((p.text, system_prompt or suite.system_for(p)))
        return [PromptSource(n, t) for n, t in sets.items()]
    lines = [line.strip() for line in read_text(path, "a text file of prompts").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{path}: no prompts")
    return [PromptSource(path.stem, [(t, system_prompt) for t in lines])]


@dataclass
class ProbeResult:
    models: list[str]
    sets: list[str]
    pool: str
    stats: dict[str, dict[str, SetStats]]  # model -> set -> stats
    shifts: list[dict] = field(default_factory=list)  # per (model, set): per layer distance / cosine / routing_tv
    alignment: list[dict] = field(default_factory=list)  # per (adapter, set): per module read / write

    def to_dict(self, centroids: bool = False) -> dict:
        out = {"models": self.models, "sets": self.sets, "pool": self.pool, "shifts": self.shifts,
               "alignment": self.alignment, "n": {m: {s: st.n for s, st in v.items()} for m, v in self.stats.items()},
               "routing": {m: {s: _plain(st.routing_share) for s, st in v.items()} for m, v in self.stats.items()}}
        if centroids:
            out["centroids"] = {m: {s: st.centroids.tolist() for s, st in v.items()} for m, v in self.stats.items()}
        return out


def _plain(a):
    return None if a is None else [[None if np.isnan(x) else float(x) for x in row] for row in a]


def _shift(st: SetStats, ref: SetStats) -> dict:
    c, c0 = st.centroids, ref.centroids
    dist = np.linalg.norm(c - c0, axis=1)
    norms = np.linalg.norm(c0, axis=1)
    cos = np.sum(c * c0, axis=1) / np.maximum(np.linalg.norm(c, axis=1) * norms, 1e-30)
    out = {"distance": dist.tolist(), "relative": (dist / np.maximum(norms, 1e-30)).tolist(), "cosine": cos.tolist()}
    a, b = st.routing_share, ref.routing_share
    if a is not None and b is not None:
        tv = 0.5 * np.abs(a - b).sum(axis=1)
        out["routing_tv"] = [None if np.isnan(x) else float(x) for x in tv]
    return out


def delta_alignment(adapter, centroids: np.ndarray) -> list[dict]:
    """Per module of ``adapter`` (an :class:`pyfuse.io.adapter_dir.Adapter`)
    in a numbered block: ``read`` / ``write`` alignment with the centroid
    directions (``centroids [L + 1, hidden]``; see the module doc)."""
    from ..analysis.subspace import kernel_factors_np
    from ..io.names import layer_index, natural_key

    hidden = centroids.shape[1]
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-30)
    rows = []
    for path in sorted(adapter.modules, key=natural_key):
        mod, hit = adapter.modules[path], layer_index(path)
        if not mod.has_delta or hit is None or hit[1] + 1 >= len(unit):
            continue
        kind, a, b = kernel_factors_np(mod)
        a, b = adapter.scale * a.astype(np.float64), b.astype(np.float64)  # delta = b @ a, per expert
        a, b = (a, b) if a.ndim == 3 else (a[None], b[None])
        fro = np.sqrt(np.sum(np.einsum("eor,eri->eoi", b, a) ** 2))
        row = {"module": path, "layer": hit[1], "kind": kind, "norm": float(fro), "read": None, "write": None}
        leaf = path.rsplit(".", 1)[-1]
        if fro > 0 and a.shape[2] == hidden and leaf in READERS:
            row["read"] = float(np.linalg.norm(np.einsum("eor,eri,i->eo", b, a, unit[hit[1]])) / fro)
        if fro > 0 and b.shape[1] == hidden and leaf in WRITERS:
            row["write"] = float(np.linalg.norm(np.einsum("o,eor,eri->ei", unit[hit[1] + 1], b, a)) / fro)
        rows.append(row)
    return rows


def probe(models: Sequence, prompts: Sequence[str | os.PathLike], *, adapters: Sequence = (),
          system_prompt: str | None = None, pool: str = "last", batch_size: int = 8) -> ProbeResult:
    """Centroids (and routing) of every prompt set on every model, their
    shifts against the first model, and the alignment of each adapter's
    deltas with the first model's centroids."""
    from ..io.adapter_dir import read_adapter
    from ..lm.chat import chat_prompt
    from ..lm.load import load_for_inference

    if not models:
        raise UserError("give at least one model")
    sources = [s for p in prompts for s in read_prompt_sets(p, system_prompt)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UserError(f"two prompt sets share a name ({', '.join(names)}): rename a group or a file")
    read_adapters = [read_adapter(a) for a in adapters]  # bad adapters fail before any model runs
    stats, labels = {}, []
    for m in models:
        lm = load_for_inference(m)
        label = lm.name if lm.name not in stats else f"{lm.name}#{len(labels)}"
        sets = [PromptSet(s.name, [chat_prompt(lm.tokenizer, t, system_prompt=sp) for t, sp in s.turns])
                for s in sources]
        stats[label] = probe_sets(lm.model, sets, pool=pool, batch_size=batch_size, description=f"probe {label}")
        labels.append(label)
        del lm
        mx.clear_cache()
    res = ProbeResult(models=labels, sets=names, pool=pool, stats=stats)
    ref = stats[labels[0]]
    for m in labels[1:]:
        for s in names:
            res.shifts.append({"model": m, "reference": labels[0], "set": s, **_shift(stats[m][s], ref[s])})
    hidden = next(iter(ref.values())).centroids.shape[1]
    for ad in read_adapters:
        for s in names:
            res.alignment.append({"adapter": str(ad.path), "set": s, "chance": 1 / np.sqrt(hidden),
                                  "modules": delta_alignment(ad, ref[s].centroids)})
    return res


def plot_probe(res: ProbeResult, out: Path) -> list[Path]:
    """``centroid_shift.png`` (relative distance and cosine per layer, per
    model and set) and, for MoE models, ``routing_shift.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.files import save_figure

    written = []
    if not res.shifts:
        return written
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for sh in res.shifts:
        x = range(len(sh["relative"]))
        ax1.plot(x, sh["relative"], marker="o", label=f"{Path(sh['model']).name}: {sh['set']}")
        ax2.plot(x, sh["cosine"], marker="o")
    ax1.set(xlabel="layer (input of block; last: output of the last block)", ylabel="||c - c0|| / ||c0||",
            title=f"centroid shift vs {Path(res.models[0]).name}")
    ax2.set(xlabel="layer", ylabel="cosine(c, c0)", title="centroid direction")
    ax1.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(res.shifts[0]["relative"])))
    written.append(save_figure(fig, out / "centroid_shift.png"))
    plt.close(fig)
    routed = [sh for sh in res.shifts if sh.get("routing_tv")]
    if routed:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for sh in routed:
            ax.plot(range(len(sh["routing_tv"])), [np.nan if v is None else v for v in sh["routing_tv"]],
                    marker="o", label=f"{Path(sh['model']).name}: {sh['set']}")
        ax.set(xlabel="block", ylabel="total variation", title="expert routing shift", ylim=(0, 1))
        ax.set_xticks(range(len(routed[0]["routing_tv"])))
        ax.legend(fontsize=7)
        written.append(save_figure(fig, out / "routing_shift.png"))
        plt.close(fig)
    return written
