"""Cross-checks of the persona recipe's parts of a spec (:mod:`.spec_recipe`):
the ``pairs`` section's names and references, ``apply`` stages' sources,
and (with the files at hand) whether an applied adapter fits the model it
is applied to. Each returns ``[(field path, message), ...]`` like
:mod:`.validate`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .resolve import condition_stages
from .spec import NAME_RE, RESERVED_NAMES, Spec

Problems = list[tuple[str, str]]

# config.json keys that fix a weight's logical shape: an adapter trained on one
# model fits another only when these agree (quantization may differ).
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "moe_intermediate_size",
              "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "num_experts", "num_local_experts", "n_routed_experts",
              "vocab_size", "tie_word_embeddings")


def pairs_problems(spec: Spec) -> Problems:
    """Each ``pairs`` entry: a free name, known SFT data, a known model or
    condition with one model."""
    problems = []
    for name, src in spec.pairs.items():
        where = f"pairs.{name}"
        if not NAME_RE.match(name) or name.lower() in RESERVED_NAMES:
            problems.append((where, "a name is letters, digits, '_' and '-' (starting with a letter or digit), "
                             "not a reserved word"))
        elif name in spec.data:
            problems.append((where, f"{name!r} is also a data name; the pairs need their own name"))
        if src.data not in spec.data:
            problems.append((f"{where}.data", f"unknown data {src.data!r} (known: {', '.join(spec.data) or 'none'})"))
        if src.model not in spec.models and src.model not in spec.conditions:
            problems.append((f"{where}.model", f"unknown model or condition {src.model!r} (models: "
                             f"{', '.join(spec.models)}; conditions: {', '.join(spec.conditions)})"))
        elif src.model in spec.conditions and spec.conditions[src.model].seeds is not None:
            problems.append((f"{where}.model", f"condition {src.model!r} has seeds; pairs are built with one model"))
    return problems


def has_adapter(spec: Spec, name: str) -> bool:
    """Whether the condition's stages make an adapter (one to apply elsewhere;
    a full fine-tune makes a model)."""
    return any(kind == "apply" or (kind == "train" and opts["fine_tune_type"] != "full")
               for _, kind, opts in condition_stages(spec, name))


def apply_problems(spec: Spec, name: str, where: str, opts: dict) -> Problems:
    """An ``apply`` stage's source: a condition with an adapter and one model."""
    src = opts["condition"]
    if src is None:
        return []
    if src not in spec.conditions:
        return [(f"{where}.condition", f"unknown condition {src!r} (conditions: {', '.join(spec.conditions)})")]
    if src == name:
        return [(f"{where}.condition", "a condition cannot apply its own adapter")]
    if spec.conditions[src].seeds is not None:
        return [(f"{where}.condition", f"condition {src!r} has seeds (one adapter per member); apply one adapter")]
    if not has_adapter(spec, src):
        return [(f"{where}.condition", f"condition {src!r} has no train or apply stage: no adapter to apply")]
    return []


def applied_dora(spec: Spec, opts: dict, seen: frozenset = frozenset()) -> bool:
    """Whether an ``apply`` stage's adapter is DoRA: the last adapter its
    source condition's stages make, or the directory's adapter_config.json
    (False when unreadable: reported elsewhere)."""
    src = opts["condition"]
    if src is None:
        from ..io.adapter_dir import ADAPTER_CONFIG, is_dora_config

        try:
            config = json.loads((spec.resolve(opts["adapter"]) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and is_dora_config(config)
    if src not in spec.conditions or src in seen:  # unknown or circular: reported elsewhere
        return False
    dora = False
    for _, kind, stage in condition_stages(spec, src):
        if kind == "train" and stage["fine_tune_type"] != "full":
            dora = stage["fine_tune_type"] == "dora"
        elif kind == "apply":
            dora = applied_dora(spec, stage, seen | {src})
    return dora


def recipe_dependencies(spec: Spec, name: str) -> dict[str, str]:
    """The nodes condition ``name``'s model needs through the recipe's parts
    (:func:`pyfuse.experiment.validate.dependencies`): the pairs it trains
    on, the conditions whose adapters it applies."""
    d: dict[str, str] = {}
    for where, kind, opts in condition_stages(spec, name):
        if kind == "train" and opts["data"] in spec.pairs:
            d.setdefault(f"pairs:{opts['data']}", f"{where}.data")
        elif kind == "apply" and opts["condition"] in spec.conditions:
            d.setdefault(f"model:{opts['condition']}", f"{where}.condition")
    return d


def pairs_dependencies(spec: Spec) -> dict[str, dict[str, str]]:
    return {f"pairs:{n}": ({f"model:{p.model}": f"pairs.{n}.model"} if p.model in spec.conditions else {})
            for n, p in spec.pairs.items()}


def root_model(spec: Spec, name: str) -> str | None:
    """The model (a ``models`` name) a condition's chain of ``from`` starts with."""
    seen = set()
    while name in spec.conditions and name not in seen:
        seen.add(name)
        name = spec.conditions[name].from_
    return name if name in spec.models else None


def trained_on(spec: Spec, name: str) -> str | None:
    """The root model of the condition whose stages trained ``name``'s last
    adapter (following ``apply: {condition}``)."""
    adapter_of = name
    for _, kind, opts in condition_stages(spec, name):
        if kind == "apply" and opts["condition"] is not None:
            adapter_of = None if opts["condition"] == name else trained_on(spec, opts["condition"])
        elif kind == "train" and opts["fine_tune_type"] != "full":
            adapter_of = name
    return root_model(spec, name) if adapter_of == name else adapter_of


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: no readable config.json ({err})") from None


def shape_difference(a: Path, b: Path) -> str | None:
    """The first :data:`SHAPE_KEYS` key whose value differs between two model
    directories' configs (a text naming both values), or None."""
    ca, cb = _config(a), _config(b)
    for key in SHAPE_KEYS:
        if ca.get(key) != cb.get(key):
            return f"{key} {ca.get(key)!r} there, {cb.get(key)!r} here"
    return None


def adapter_fit_problem(adapter: Path, model: Path, fuse: dict | None) -> str | None:
    """Why the adapter directory cannot be fused into (applied to) the model
    directory, by the fuse's own planning (pyfuse.fuse.plan), or None."""
    from ..fuse.plan import make_plan
    from ..io.adapter_dir import read_adapter
    from ..io.model_dir import ModelDir

    fuse = fuse or {}
    try:
        with ModelDir(model) as mdir:
            make_plan(mdir, read_adapter(adapter), policy=fuse.get("policy") or "stock",
                      dequantize=bool(fuse.get("dequantize")), requant_bits=fuse.get("requant_bits"),
                      requant_group_size=fuse.get("requant_group_size"), only_re=None)
    except UserError as err:
        return str(err).splitlines()[0]
    return None


def fit_problems(spec: Spec) -> Problems:
    """Every ``apply`` stage whose adapter does not fit the condition's model
    (checked on the model its chain starts with: fuses keep the shapes)."""
    problems = []
    for name in spec.conditions:
        target = root_model(spec, name)
        stages = condition_stages(spec, name)
        for i, (where, kind, opts) in enumerate(stages):
            if kind != "apply" or target is None:
                continue
            here = spec.resolve(spec.models[target])
            if not here.is_dir():
                continue
            if opts["adapter"] is not None:
                path = spec.resolve(opts["adapter"])
                fuse = next((o for _, k, o in stages[i + 1:] if k == "fuse"), None)
                why = adapter_fit_problem(path, here, fuse) if path.is_dir() else None
                if why:
                    problems.append((f"{where}.adapter", f"does not fit {target!r}: {why}"))
                continue
            source = trained_on(spec, opts["condition"])
            there = spec.resolve(spec.models[source]) if source is not None else None
            if there is None or not there.is_dir() or there == here:
                continue
            why = shape_difference(there, here)
            if why:
                problems.append((f"{where}.condition", f"the adapter of {opts['condition']!r} was trained on "
                                 f"{source!r}, which does not have {target!r}'s shapes ({why})"))
    return problems


def missing_recipe_paths(spec: Spec) -> list[tuple[str, str, Path]]:
    """The persona suite and applied adapter directories that do not exist."""
    out = []
    per = spec.evaluation.persona
    if per is not None and per.suite is not None and not spec.resolve(per.suite).is_file():
        out.append(("evaluation.persona.suite", "persona suite", spec.resolve(per.suite)))
    for name in spec.conditions:
        for where, kind, opts in condition_stages(spec, name):
            if kind == "apply" and opts["adapter"] is not None and not spec.resolve(opts["adapter"]).is_dir():
                out.append((f"{where}.adapter", "adapter directory", spec.resolve(opts["adapter"])))
    return out


def check_persona_suite(spec: Spec) -> Problems:
    per = spec.evaluation.persona
    if per is None or (per.suite is not None and not spec.resolve(per.suite).is_file()):
        return []
    from ..evals.persona import load_persona_suite

    try:
        load_persona_suite(spec.resolve(per.suite) if per.suite is not None else None)
    except UserError as err:
        return [("evaluation.persona.suite", str(err))]
    return []
