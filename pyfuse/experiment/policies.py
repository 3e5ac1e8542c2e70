"""The per-policy table of ``results.json`` and ``report.md``: for every
condition that fuses a trained adapter (the stage before its last fuse is a
train stage; seeded and dithered fuses left out; with ``analysis.unfused``,
the adapter that condition applies unfused), what its fuse policy keeps and
costs:

* ``weight_retention``: the share of the adapter's delta in the fused
  weights (the fuse report's summary);
* ``output_error`` / ``output_retention``: the mean over the fused modules
  of the fuse report's output-space figures on held-out calibration tokens
  (present when the fuse stage has ``calibration``; 0 / 1 is a perfect fuse,
  1 / 0 as bad as dropping the adapter);
* ``kl_to_unfused`` / ``top1_agreement``: the fuse report's whole-model
  figures (:mod:`pyfuse.fuse.agreement`): per-token KL of the next-token
  distributions of the model it was fused into with the adapter applied
  unfused against the fused model, and how often their top-1 tokens agree,
  on the held-out calibration sequences (with ``calibration``);
* ``changed_vs_unfused``: answers (primary dataset) that differ from the
  adapter applied at run time (``analysis.unfused``);
* ``twin`` / ``twin_changed``: the condition that fuses the adapter's
  zero-delta twin with the same setting after the same stages, and the
  answers it changes against the model it was fused into;
* ``bytes_added``: how much larger the fused model directory is than the
  model it was fused into (the recorded output sizes of the steps).

Everything is read from ``plan.json`` and the step outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .layout import DONE, FUSE_REPORT, MODEL, step_dir
from .resolve import model_shaping


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _model_bytes(out: Path, art: dict) -> int | None:
    """The size of a model: a step output's recorded file sizes (the model may
    have been pruned since), or a user's model directory as it is now."""
    if "step" in art:
        done = step_dir(out, art["step"]) / DONE
        if not done.is_file():
            return None
        prefix = f"{art['out']}/"
        return sum(r["size"] for rel, r in _read(done)["outputs"].items() if rel.startswith(prefix))
    src = Path(art["source"])
    return sum(p.stat().st_size for p in src.rglob("*") if p.is_file()
               and not any(part.startswith(".") for part in p.relative_to(src).parts))


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _trained_fuses(plan: dict, unfused: str | None) -> dict[str, list[dict]]:
    """``name -> stages`` of the conditions whose last stage fuses a freshly
    trained adapter (not seeded, not dithered): with ``unfused``, the
    adapter that condition applies at run time (the same stages before)."""
    adapter = None
    if unfused is not None:
        adapter = [s["step"] for s in plan["conditions"][unfused].get("stages") or []]
    out = {}
    for name in plan["condition_order"]:
        c = plan["conditions"][name]
        st = c.get("stages") or []
        if (c.get("family") is None and len(st) >= 2 and st[-1]["kind"] == "fuse" and st[-2]["kind"] == "train"
                and not st[-1]["options"].get("dither")
                and (adapter is None or [s["step"] for s in st[:-1]] == adapter)):
            out[name] = st
    return out


def _twin(plan: dict, stages: list[dict]) -> str | None:
    """The condition with the same stages, a zero stage inserted before the
    last fuse, fused with the same setting and options."""
    for name in plan["condition_order"]:
        c = plan["conditions"][name]
        st = c.get("stages") or []
        if (c.get("family") is None and len(st) == len(stages) + 1 and st[-2]["kind"] == "zero"
                and [s["step"] for s in st[:-2]] == [s["step"] for s in stages[:-1]]
                and st[-1]["setting"] == stages[-1]["setting"]
                and model_shaping(st[-1]["options"]) == model_shaping(stages[-1]["options"])):
            return name
    return None


def policy_table(plan: dict, out: Path, predictions: dict, primary: str | None, read_rows) -> dict | None:
    """``{"unfused", "dataset", "rows": [...]}`` (see the module doc), None
    when no condition fuses a trained adapter. ``read_rows(step dir)``
    gives an evaluation's rows."""
    unfused = (plan.get("analysis") or {}).get("unfused")
    trained = _trained_fuses(plan, unfused)
    if not trained:
        return None
    steps = {s["dir"]: s for s in plan["steps"]}

    def changed(a: list, b: list) -> int:
        return sum(1 for x, y in zip(a, b) if x != y)

    def pred(name: str) -> list | None:
        return (predictions.get(name) or {}).get(primary)

    rows = []
    for name, stages in trained.items():
        fuse = stages[-1]
        report = _read(step_dir(out, fuse["step"]) / FUSE_REPORT)
        tensors = report["tensors"]
        twin = _twin(plan, stages)
        twin_changed = None
        if twin is not None and plan["conditions"][twin].get("flip_reference") and pred(twin) is not None:
            ref = [r["prediction"] for r in read_rows(plan["conditions"][twin]["flip_reference"])]
            twin_changed = changed(pred(twin), ref)
        before = _model_bytes(out, steps[fuse["step"]]["inputs"]["model"])
        after = _model_bytes(out, {"step": fuse["step"], "out": MODEL})
        rows.append({
            "condition": name, "setting": fuse["setting"], "policy": fuse["options"]["policy"], "fuse": fuse["step"],
            "weight_retention": report["summary"]["retention"],
            "output_error": _mean([t.get("output_error") for t in tensors]),
            "output_retention": _mean([t.get("output_retention") for t in tensors]),
            "modules_measured": sum(1 for t in tensors if t.get("output_error") is not None),
            "kl_to_unfused": report["summary"].get("kl_to_unfused"),
            "top1_agreement": report["summary"].get("top1_agreement"),
            "changed_vs_unfused": changed(pred(name), pred(unfused))
            if unfused and pred(name) is not None and pred(unfused) is not None else None,
            "twin": twin, "twin_changed": twin_changed,
            "bytes_added": after - before if before is not None and after is not None else None,
        })
    return {"unfused": unfused, "dataset": primary, "rows": rows}


def _fmt(x, fmt: str = ".3g") -> str:
    return "—" if x is None else format(x, fmt)


def report_lines(results: dict) -> list[str]:
    """The report's section (empty without a table)."""
    table = results.get("policies")
    if not table:
        return []
    vs = table["unfused"] or "the unfused adapter"
    lines = ["## Fuse policies\n",
             "What each fuse of the trained adapter keeps and costs. Weight retention: the share of the "
             "adapter's delta in the fused weights. Output error: the mean over the fused modules of "
             "||X (W_hat - W - delta)|| / ||X delta|| on held-out calibration tokens (0 is a perfect fuse, 1 as "
             "bad as dropping the adapter; only with calibration data). KL to unfused: mean per-token KL of the "
             "next-token distributions of the unfused adapter against the fused model, and top-1 agreement, on the "
             "held-out calibration sequences. Answers changed on "
             f"{table['dataset']}: against {vs}, and by the zero-delta twin (the same fuse of the adapter with "
             "every delta zeroed) against the model it was fused into.\n",
             f"| condition | setting | weight retention | output error | output retention | KL to unfused | top-1 agree "
             f"| answers changed vs {vs} | zero-delta twin | answers the twin changes | size added |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in table["rows"]:
        size = "—" if r["bytes_added"] is None else f"{r['bytes_added']:+,} B"
        lines.append(f"| {r['condition']} | {r['setting']} | {_fmt(r['weight_retention'])} | "
                     f"{_fmt(r['output_error'])} | {_fmt(r['output_retention'])} | {_fmt(r['kl_to_unfused'])} | "
                     f"{_fmt(r['top1_agreement'], '.4f')} | {_fmt(r['changed_vs_unfused'], 'd')} | "
                     f"{r['twin'] or '—'} | {_fmt(r['twin_changed'], 'd')} | {size} |")
    return lines + [""]
