"""What each step kind does: a thin call into pyfuse's own API, writing its
outputs into the step's (temporary) directory. The runner
(:mod:`pyfuse.experiment.runner`) decides when a step runs, publishes the
directory atomically and writes its ``done.json``; the names of the outputs
are in :mod:`pyfuse.experiment.layout`.

=============  ==========================================  ===============================
kind           inputs                                      outputs (in the step directory)
=============  ==========================================  ===============================
train          model, data                                 ``adapter/`` (pyfuse.train.train_adapter);
                                                           ``model/`` with fine_tune_type full
zero           adapter [, model for DoRA]                  ``adapter/`` (pyfuse.adapters.zero)
placebo        adapter                                     ``adapter/`` (pyfuse.adapters.placebo)
dither         model, fused (its stock zero-delta fuse),   ``adapter/``: the residual to fuse
               adapter (zero-delta)                        stochastically (pyfuse.adapters.dither)
fuse           model, adapter [, calibration data]         ``model/``, ``fuse_report.json``
eval-mc        model [, adapter], data                     ``rows.jsonl``, ``summary.json``
eval-identity  model [, adapter] [, suite]                 ``rows.jsonl``, ``summary.json``
eval-behaviour model [, adapter], suite                     ``rows.jsonl``, ``summary.json``
eval-persona   model [, adapter] [, suite]                 ``rows.jsonl`` (`pyfuse eval persona --out`'s
                                                           bytes), ``summary.json``
pairs          model [, adapter], data (SFT)               ``data/`` (train[/valid].jsonl: `pyfuse pairs`),
                                                           ``summary.json``
compare        adapter_a, adapter_b (stacked adapters)      ``summary.json`` (pyfuse.analysis.subspace)
setg           base_rows, persona_rows, data               ``data/`` (train/test[/valid].jsonl,
                                                           items.json, counts.json), ``items/``
                                                           (the MMLU-Pro rows of each split)
noise-floor    model                                       ``noise_floor.json`` (+ .md, plots)
=============  ==========================================  ===============================

Every function returns a small summary (kept in ``done.json``).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from ..io.files import read_jsonl, write_json, write_jsonl
from .layout import ADAPTER, FUSE_REPORT, MODEL, PAIRS_DATA, ROWS, SETG_DATA, SETG_ITEMS, SUMMARY


def run_train(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..train.lora import train_adapter

    kwargs = {k: v for k, v in opts.items() if k != "data"}
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the command's own summary
        res = train_adapter(str(inputs["model"]), str(inputs["data"]),
                            out / (MODEL if opts.get("fine_tune_type") == "full" else ADAPTER), verbose=False,
                            **kwargs)
    return {"modules": len(res.modules), "trainable_parameters": res.trainable_parameters,
            "first_loss": res.first_loss, "final_loss": res.final_loss, "seconds": res.seconds,
            "iters": opts["iters"], "warnings": list(res.warnings)}


def run_zero(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..adapters.zero import zero_adapter

    res = zero_adapter(inputs["adapter"], out / ADAPTER, model=inputs.get("model"))
    return {"modules": len(res.modules), "magnitudes": len(res.magnitudes),
            "fine_tune_type": res.fine_tune_type}


def run_placebo(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..adapters.placebo import placebo_adapter

    res = placebo_adapter(inputs["adapter"], out / ADAPTER, seed=opts["seed"])
    return {"modules": len(res.singular_values), "seed": res.seed}


def run_dither(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..adapters.dither import dither_residual

    res = dither_residual(inputs["model"], inputs["fused"], inputs["adapter"], out / ADAPTER)
    return {"modules": len(res.modules), "max_residual_in_steps": res.residual_max}


def run_fuse(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..fuse.api import fuse_model

    res = fuse_model(inputs["model"], inputs["adapter"], out / MODEL, policy=opts["policy"],
                     seed=opts["seed"], requant_bits=opts["requant_bits"],
                     requant_group_size=opts["requant_group_size"], only=opts["only"],
                     dequantize=opts["dequantize"], report=out / FUSE_REPORT, link_unchanged=True,
                     layers=opts.get("layers"), modules=opts.get("modules"), calibration=inputs.get("calibration"),
                     calibration_min_tokens=opts.get("calibration_min_tokens"), damp=opts.get("damp"))
    s = res.summary
    keep = ("policy", "modules_fused", "weights_fused", "delta_norm", "change_norm", "retention", "noise",
            "codes_changed", "groups_refit", "kernel", "kl_to_unfused", "top1_agreement", "warnings")
    return {k: s.get(k) for k in keep}


def run_eval_mc(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..evals.mc import evaluate_mc

    res = evaluate_mc(str(inputs["model"]), str(inputs["data"]), method=opts["method"],
                      batch_size=opts["batch_size"] or 8, limit=opts["limit"],
                      max_tokens=opts["max_tokens"] or 1024,
                      system_prompt=opts["system_prompt"], out=out / ROWS,
                      adapter_path=str(inputs["adapter"]) if "adapter" in inputs else None)
    summary = {"accuracy": res.accuracy, "n": res.n, "correct": res.correct, "method": res.method,
               "per_category": res.per_category}
    write_json(out / SUMMARY, summary)
    return {"accuracy": res.accuracy, "n": res.n, "correct": res.correct, "seconds": res.seconds}


def run_eval_identity(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..evals.identity import evaluate_identity

    res = evaluate_identity(str(inputs["model"]), str(inputs["suite"]) if "suite" in inputs else None,
                            persona_name=opts["persona_name"], aliases=opts["aliases"],
                            base_names=opts["base_names"], vendors=opts["vendors"],
                            system_prompt=opts["system_prompt"], max_tokens=opts["max_tokens"],
                            batch_size=opts["batch_size"], out=out / ROWS,
                            adapter_path=str(inputs["adapter"]) if "adapter" in inputs else None)
    summary = {"score": res.score, "n": res.n, "persona": res.persona, "per_category": res.per_category}
    write_json(out / SUMMARY, summary)
    return {"score": res.score, "n": res.n, "seconds": res.seconds}


def run_eval_behaviour(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..evals.behaviour import evaluate_behaviour

    res = evaluate_behaviour(str(inputs["model"]), inputs["suite"], out=out / ROWS,
                             adapter_path=str(inputs["adapter"]) if "adapter" in inputs else None, **opts)
    write_json(out / SUMMARY, res.summary())
    return {"rates": {k: v["rate"] for k, v in res.rates.items()}, "generations": len(res.rows),
            "seconds": res.seconds}


def run_eval_persona(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..evals.persona import evaluate_persona

    res = evaluate_persona(str(inputs["model"]), str(inputs["suite"]) if "suite" in inputs else None,
                           adapter_path=str(inputs["adapter"]) if "adapter" in inputs else None,
                           batch_size=opts["batch_size"])
    write_jsonl(out / ROWS, res.rows)  # the bytes `pyfuse eval persona --out` writes
    summary = {k: v for k, v in res.summary().items() if k != "model"}  # the model's path is the step's input
    write_json(out / SUMMARY, {**summary, "warnings": res.warnings})
    return {"passed": summary["passed"], "prefers_good": summary["prefers_good"], "n": summary["n"]}


def run_pairs(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..data.pairs import make_pairs

    res = make_pairs(str(inputs["model"]), str(inputs["data"]), out / PAIRS_DATA,
                     adapter_path=str(inputs["adapter"]) if "adapter" in inputs else None, **opts)
    summary = {"written": res.written, "identical": res.identical, "truncated": res.truncated,
               "warnings": res.warnings}
    write_json(out / SUMMARY, summary)
    return summary


# A stacked adapter whose modules share this much of the first one's column
# space (mean over the shared modules) is reported: the two write into the
# same directions, so the second can overwrite what the first does.
OVERLAP_WARNING = 0.5


def run_compare(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..analysis.subspace import compare_adapters

    res = compare_adapters(inputs["adapter_a"], inputs["adapter_b"])
    top = res.max_overlap
    chances = [m.chance for m in res.modules if m.chance is not None]
    chance = sum(chances) / len(chances) if chances else None
    summary = {"shared_modules": len(res.modules), "overlap": res.overlap, "chance": chance,
               "max_overlap": top.overlap if top else None, "max_overlap_module": top.path if top else None,
               "warnings": []}
    if res.overlap is not None and res.overlap >= OVERLAP_WARNING:
        summary["warnings"].append(
            f"the stacked adapters overlap: mean column-space overlap {res.overlap:.2f} over "
            f"{len(res.modules)} shared module(s) (random subspaces: {chance:.2f}; max {top.overlap:.2f} in "
            f"{top.path}); "
            "train them on disjoint modules to tell subspace interference from perturbation")
    write_json(out / SUMMARY, {**summary, **res.to_dict()})
    return summary


def run_setg(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..data.mmlu import id_key, load_mc
    from ..data.setg import SPLITS, mine_setg

    res = mine_setg(inputs["base_rows"], inputs["persona_rows"], inputs["data"], split=opts["split"],
                    valid_frac=opts["valid_frac"], seed=opts["seed"], out=out / SETG_DATA)
    items = {id_key(it.question_id): it for it in load_mc(inputs["data"])}
    for split in SPLITS:
        write_jsonl(out / SETG_ITEMS / f"{split}.jsonl",
                    [items[id_key(i)].model_dump(mode="json") for i in res.splits[split]])
    return {"n_items": res.n_items, "n_setg": res.n_setg, "seed": res.seed, "split": res.split,
            "valid_frac": res.valid_frac, "splits": {s: len(res.splits[s]) for s in SPLITS}}


def run_noise_floor(opts: dict, inputs: dict[str, Path], out: Path) -> dict:
    from ..noise_floor.measure import measure_noise_floor

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the command's own summary
        res = measure_noise_floor(str(inputs["model"]), group_sizes=[opts["group_size"]], bits=[opts["bits"]],
                                  policies=[opts["policy"]], rounds=1, outputs=opts["outputs"], out=out,
                                  seed=opts["seed"])
    return {"rows": len(res.rows), "warnings": list(res.warnings)}


RUNNERS = {
    "train": run_train,
    "zero": run_zero,
    "placebo": run_placebo,
    "dither": run_dither,
    "fuse": run_fuse,
    "eval-mc": run_eval_mc,
    "eval-identity": run_eval_identity,
    "eval-behaviour": run_eval_behaviour,
    "eval-persona": run_eval_persona,
    "pairs": run_pairs,
    "compare": run_compare,
    "setg": run_setg,
    "noise-floor": run_noise_floor,
}


def read_rows(step_dir: Path) -> list[dict]:
    """The rows an eval step wrote (one per item or prompt)."""
    return read_jsonl(step_dir / ROWS)


def read_summary(step_dir: Path) -> dict:
    """The summary an eval step wrote."""
    return json.loads((step_dir / SUMMARY).read_text(encoding="utf-8"))
