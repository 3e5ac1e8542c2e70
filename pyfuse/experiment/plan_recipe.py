"""The plan's steps for the persona recipe's parts of a spec
(:mod:`.spec_recipe`): a ``pairs`` entry is one ``pairs`` step (its
``data/`` is what a train stage with ``data: NAME`` trains on), an
``apply`` stage makes another condition's adapter (or a directory) the
condition's current adapter, and ``evaluation.persona`` is one
``eval-persona`` step per condition. Called by :mod:`.plan`'s planner."""

from __future__ import annotations

import hashlib

from ..evals.persona import BUILTIN_SUITE
from .layout import PAIRS_DATA
from .prereg import canonical_json

# The built-in suite's content is part of its steps' keys: a new version of it gives new steps.
BUILTIN_SHA256 = hashlib.sha256(canonical_json(BUILTIN_SUITE).encode()).hexdigest()


def pairs_data(planner, name: str):
    """The pairs of ``pairs.NAME``: the output of its step (planned once)."""
    plan = planner.plan
    if name not in plan.pairs:
        planner._enter(f"pairs {name!r}")
        src = planner.spec.pairs[name]
        model, _, adapter = planner.model_of(src.model)
        inputs = {"model": model, "data": planner.source(planner.spec.resolve(planner.spec.data[src.data]))}
        if adapter is not None:
            inputs["adapter"] = adapter
        plan.pairs[name] = planner.step("pairs", src.model_dump(exclude={"data", "model"}), inputs,
                                        f"pairs {name}: {src.model}'s replies to {src.data}")
        planner._busy.discard(f"pairs {name!r}")
    return plan.pairs[name].out(PAIRS_DATA)


def apply_stage(planner, cp, opts: dict, n_stage: int) -> None:
    """The condition's current adapter becomes the source's: the last adapter
    of condition ``opts['condition']``'s stages (the one it ends with, else
    the one its last fuse fused), or the directory ``opts['adapter']``."""
    if opts["condition"] is not None:
        src = planner.condition_model(opts["condition"])
        cp.adapter = src.adapter if src.adapter is not None else src.fused_adapters[-1]
    else:
        cp.adapter = planner.source(planner.spec.resolve(opts["adapter"]))
    cp.stages.append({"kind": "apply", "adapter": cp.adapter.describe(), "options": opts})


def persona_step(planner, cp):
    """The persona check of the condition's model (with its unfused adapter)."""
    per = planner.spec.evaluation.persona
    inputs = {"model": cp.model}
    if cp.adapter is not None:
        inputs["adapter"] = cp.adapter
    opts = {"batch_size": per.batch_size}
    if per.suite is not None:
        inputs["suite"] = planner.source(planner.spec.resolve(per.suite))
    else:
        opts["builtin_suite"] = BUILTIN_SHA256
    return planner.step("eval-persona", opts, inputs, f"{cp.name}: evaluate persona")
