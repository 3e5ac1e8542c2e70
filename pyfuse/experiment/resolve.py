"""The spec resolved: stages expanded (``stack`` -> train, [zero], fuse),
options merged with ``defaults`` and pyfuse's own defaults, and the
members of seeded conditions.

A condition with ``seeds: K`` stands for K conditions ``NAME.0`` ..
``NAME.K-1`` (members; a member name cannot clash with a spec name, which
has no dot). Member ``i`` adds ``i`` to the seed of its ``placebo`` stages
and of its fuses whose result depends on a seed (``stochastic`` policy,
``dither``); its training is the same for every member (one step), so
the members differ only by the random draw.
"""

from __future__ import annotations

from pydantic import BaseModel

from .spec import EVAL_SUITES, FUSE_DEFAULTS, TRAIN_DEFAULTS, FuseOptions, Spec, TrainOptions


def members(spec: Spec, name: str) -> list[tuple[str, int | None]]:
    """``[(member name, member seed)]``: ``[(name, None)]`` for an ordinary condition."""
    k = spec.conditions[name].seeds
    return [(name, None)] if k is None else [(f"{name}.{i}", i) for i in range(k)]


def family_of(spec: Spec, member: str) -> str | None:
    """The seeded condition a member name belongs to (None for an ordinary name)."""
    base, dot, index = member.rpartition(".")
    if dot and base in spec.conditions and spec.conditions[base].seeds is not None and index.isdigit():
        return base
    return None


def condition_stages(spec: Spec, name: str, member_seed: int | None = None) -> list[tuple[str, str, dict]]:
    """The condition's stages expanded (``stack`` -> train, [zero], fuse;
    ``apply`` as given: ``{condition, adapter}``) as
    ``(path, kind, options)`` with options resolved against the defaults
    (and, for a member of a seeded condition, its seed added)."""
    out = []
    cond = spec.conditions[name]
    offset = member_seed or 0
    for i, st in enumerate(cond.stages):
        where = f"conditions.{name}.stages[{i}]"
        kind = st.kind
        if kind == "train":
            out.append((f"{where}.train", "train", resolve_train(spec, st.train)))
        elif kind == "zero":
            out.append((f"{where}.zero", "zero", {}))
        elif kind == "placebo":
            out.append((f"{where}.placebo", "placebo", {"seed": st.placebo.seed + offset}))
        elif kind == "fuse":
            out.append((f"{where}.fuse", "fuse", resolve_fuse(spec, st.fuse, offset)))
        elif kind == "apply":
            out.append((f"{where}.apply", "apply", st.apply.model_dump()))
        else:
            out.append((f"{where}.stack.train", "train", resolve_train(spec, st.stack.train)))
            if st.stack.zero:
                out.append((f"{where}.stack.zero", "zero", {}))
            out.append((f"{where}.stack.fuse", "fuse", resolve_fuse(spec, st.stack.fuse, offset)))
    return out


def _merged(defaults: BaseModel, stage: BaseModel, builtin: dict) -> dict:
    out = dict(builtin)
    for src in (defaults, stage):
        for k in src.model_fields_set:
            v = getattr(src, k)
            if v is not None:
                out[k] = v
    return out


def resolve_train(spec: Spec, opts: TrainOptions) -> dict:
    out = _merged(spec.defaults.train, opts, {"data": None, **TRAIN_DEFAULTS})
    if out["seed"] is None:
        out["seed"] = spec.seed
    for k in ("alpha", "dropout", "learning_rate"):
        out[k] = float(out[k])
    return out


def resolve_fuse(spec: Spec, opts: FuseOptions, seed_offset: int = 0) -> dict:
    out = _merged(spec.defaults.fuse, opts, FUSE_DEFAULTS)
    if seed_offset and (out["policy"] == "stochastic" or out["dither"]):
        out["seed"] = (out["seed"] + seed_offset) % 2**32
    return out


CALIBRATION_KEYS = ("calibration", "calibration_min_tokens", "damp")


def model_shaping(fuse_opts: dict) -> dict:
    """A fuse's options that shape its model: calibration data steers only
    the calibrated policy (under the others it only adds the report's output
    error), so it is left out of the pre-registered design there."""
    if fuse_opts.get("policy") == "calibrated":
        return fuse_opts
    return {k: v for k, v in fuse_opts.items() if k not in CALIBRATION_KEYS}


def calibration_source(spec: Spec, ref: str) -> tuple[str, str]:
    """What a fuse stage's ``calibration`` names: ``("data", NAME)`` (a name
    from ``data``), ``("setg", ref)`` (``setg`` / ``setg.train``: the Set-G
    training rows) or ``("path", ref)`` (a file or directory, relative to the
    spec file)."""
    if ref in spec.data:
        return "data", ref
    if ref in ("setg", "setg.train"):
        return "setg", ref
    return "path", ref


def evaluated_suites(spec: Spec, name: str) -> list[str]:
    cond = spec.conditions[name]
    if cond.evaluate is not None:
        return list(dict.fromkeys(cond.evaluate))
    return [s for s in EVAL_SUITES if getattr(spec.evaluation, s) is not None]


def ends_with_adapter(spec: Spec, name: str) -> bool:
    pending = False
    for _, kind, opts in condition_stages(spec, name):
        if kind == "train":
            pending = opts["fine_tune_type"] != "full"  # a full fine-tune yields a model
        elif kind == "apply":
            pending = True
        elif kind == "fuse":
            pending = False
    return pending


def is_fused(spec: Spec, name: str) -> bool:
    """Whether the condition's own stages end with a fuse (its answers can
    flip against the model it was fused into)."""
    stages = condition_stages(spec, name)
    return bool(stages) and stages[-1][1] == "fuse"
