"""Cross-checks of a spec that the schema (:mod:`.spec`) cannot make:
names, references between sections, the order of stages, circular
references (through conditions and Set-G), the criterion's names, missing
paths and the identity suite. Each returns ``[(field path, message), ...]``;
:func:`pyfuse.experiment.load.spec_from_dict` raises them as one
:class:`~pyfuse.experiment.spec.SpecError`."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from .criterion import parse, parse_pvalue
from .resolve import calibration_source, condition_stages, ends_with_adapter, evaluated_suites
from .spec import NAME_RE, RESERVED_NAMES, SETG_SPLITS, Spec
from .validate_recipe import (applied_dora, apply_problems, check_persona_suite, fit_problems,
                              missing_recipe_paths, pairs_dependencies, pairs_problems, recipe_dependencies)

DATASET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Problems = list[tuple[str, str]]


def check_references(spec: Spec) -> Problems:
    """Every cross-check but the paths (see :func:`missing_paths`), in the
    order the problems are reported; the cycle check only when the rest
    passes (a cycle through an unknown name is that name's problem)."""
    problems = (_names(spec) + pairs_problems(spec) + _conditions(spec) + _setg(spec) + _evaluation(spec)
                + _comparisons(spec) + _criterion(spec) + _family(spec) + _analysis(spec))
    if not problems:
        cycle = find_cycle(spec)
        if cycle:
            problems.append(cycle)
    return problems


def _names(spec: Spec) -> Problems:
    problems = []
    for section in ("models", "data", "conditions"):
        for name in getattr(spec, section):
            if not NAME_RE.match(name):
                problems.append((f"{section}.{name}", "a name is letters, digits, '_' and '-' "
                                 "(starting with a letter or digit)"))
            elif name.lower() in RESERVED_NAMES:
                problems.append((f"{section}.{name}", f"{name!r} is a reserved word"))
    for name in spec.conditions:
        if name in spec.models:
            problems.append((f"conditions.{name}", f"{name!r} is also a model name; a condition needs "
                             "its own name"))
    return problems


def _data_ref_problem(spec: Spec, ref: str, *, training: bool) -> str | None:
    if ref in spec.data or (training and ref in spec.pairs):
        return None
    if ref.startswith("setg") and ref in ({"setg", "setg.train"} if training else
                                          {f"setg.{s}" for s in SETG_SPLITS}):
        return None if spec.setg is not None else f"{ref!r} needs a setg section"
    known = sorted(spec.data) + (sorted(spec.pairs) + ["setg"] if training else [f"setg.{s}" for s in SETG_SPLITS])
    return f"unknown data {ref!r} (known: {', '.join(known)})"


def _conditions(spec: Spec) -> Problems:
    """``from`` references, the order of stages and the suites each condition names."""
    problems = []
    for name, cond in spec.conditions.items():
        src = cond.from_
        if src not in spec.models and src not in spec.conditions:
            problems.append((f"conditions.{name}.from", f"unknown model or condition {src!r} (models: "
                             f"{', '.join(spec.models)}; conditions: {', '.join(spec.conditions)})"))
        elif src in spec.conditions and ends_with_adapter(spec, src):
            problems.append((f"conditions.{name}.from", f"condition {src!r} ends with an unfused adapter; "
                             "a condition can only start from a model (add a fuse stage to it)"))
        elif src in spec.conditions and spec.conditions[src].seeds is not None:
            problems.append((f"conditions.{name}.from", f"condition {src!r} has seeds (it stands for "
                             f"{spec.conditions[src].seeds} models); start from one model"))
        problems += _stage_order(spec, name)
        for i, suite in enumerate(cond.evaluate or []):
            if getattr(spec.evaluation, suite) is None:
                problems.append((f"conditions.{name}.evaluate[{i}]", f"no evaluation.{suite} is defined"))
    return problems


def _stage_order(spec: Spec, name: str) -> Problems:
    """A train or apply stage needs no unfused adapter before it (and a train
    stage data); zero, placebo and fuse need an adapter; a dithered fuse
    needs a zero-delta one."""
    problems = []
    pending, last, dora, full = False, None, False, None
    for where, kind, opts in condition_stages(spec, name):
        if kind == "train":
            if pending:
                problems.append((where, "the previous stage's adapter is not fused yet; add a fuse "
                                 "stage before training another adapter"))
            if opts["data"] is None:
                problems.append((f"{where}.data", "required (here or in defaults.train)"))
            else:
                p = _data_ref_problem(spec, opts["data"], training=True)
                if p:
                    problems.append((f"{where}.data", p))
            pending, dora = opts["fine_tune_type"] != "full", opts["fine_tune_type"] == "dora"
            full = where if opts["fine_tune_type"] == "full" else None
        elif kind == "apply":
            if pending:
                problems.append((where, "the previous stage's adapter is not fused yet; add a fuse "
                                 "stage before applying another adapter"))
            problems += apply_problems(spec, name, where, opts)
            pending, dora, full = True, applied_dora(spec, opts), None
        elif kind in ("zero", "placebo", "fuse"):
            if not pending and full is not None:
                problems.append((where, f"{full} has fine_tune_type full: it yields a model, not an adapter; "
                                 f"there is nothing to {kind} (remove this stage)"))
            elif not pending:
                problems.append((where, f"a {kind} stage needs an adapter: put it after a train or apply stage"))
            if kind == "placebo" and dora:
                problems.append((where, "placebo adapters are defined for LoRA (a DoRA magnitude is learned "
                                 "content with no placebo); train (or apply) a fine_tune_type: lora adapter"))
            if kind == "fuse" and opts["dither"]:
                problems += _dither_problems(where, opts, last)
            if kind == "fuse":
                problems += _calibration_problems(spec, where, opts)
                pending, full = False, None
        last = kind
    return problems


def _dither_problems(where: str, opts: dict, last: str | None) -> Problems:
    out = []
    if last != "zero":
        out.append((f"{where}.dither", "a dithered fuse is a zero-delta fuse: put it right after a zero stage"))
    if opts["policy"] != "stock" or opts["dequantize"] or opts["requant_bits"] or opts["requant_group_size"]:
        out.append((f"{where}.dither", "dither re-rounds the stock fuse's grid: it needs policy stock, "
                    "without dequantize or requant_bits / requant_group_size"))
    return out


def _calibration_problems(spec: Spec, where: str, opts: dict) -> Problems:
    """A fuse stage's calibration options, as ``pyfuse fuse`` takes them:
    policy calibrated needs data; dampening and the token threshold need it."""
    ref = opts.get("calibration")
    if ref is None:
        if opts["policy"] == "calibrated":
            return [(f"{where}.calibration", "required by policy calibrated (mlx-lm data whose X^T X steers "
                     "the rounding: a name from data, setg, or a path)")]
        field = next((k for k in ("calibration_min_tokens", "damp") if opts.get(k) is not None), None)
        return [(f"{where}.{field}", "needs calibration (the data it applies to)")] if field else []
    out = []
    if opts.get("damp") is not None and opts["policy"] != "calibrated":
        out.append((f"{where}.damp", f"is used by policy calibrated only, not {opts['policy']}"))
    if opts["dither"]:
        out.append((f"{where}.calibration", "a dithered fuse takes no calibration data"))
    kind, _ = calibration_source(spec, ref)
    if kind == "setg" and spec.setg is None:
        out.append((f"{where}.calibration", f"{ref!r} needs a setg section"))
    return out


def _setg(spec: Spec) -> Problems:
    problems = []
    if spec.setg is None:
        return problems
    if spec.setg.data not in spec.data:
        problems.append(("setg.data", f"unknown data {spec.setg.data!r} (known: {', '.join(spec.data) or 'none'})"))
    for role in ("base", "persona"):
        ref = getattr(spec.setg, role)
        if ref not in spec.models and ref not in spec.conditions:
            problems.append((f"setg.{role}", f"unknown model or condition {ref!r}"))
        elif ref in spec.conditions and spec.conditions[ref].seeds is not None:
            problems.append((f"setg.{role}", f"condition {ref!r} has seeds; Set-G is mined with one model"))
    if spec.preregistration is not None and spec.setg.seed is not None:
        problems.append(("setg.seed", "the split seed is derived from the pre-registration's hash; "
                         "remove setg.seed"))
    return problems


def _evaluation(spec: Spec) -> Problems:
    problems = []
    sets = spec.evaluation.mc_sets
    several = isinstance(spec.evaluation.mc, list)
    seen: dict[str, int] = {}
    for i, mc in enumerate(sets):
        where = f"evaluation.mc[{i}]" if several else "evaluation.mc"
        p = _data_ref_problem(spec, mc.data, training=False)
        if p:
            problems.append((f"{where}.data", p))
        if mc.name is not None and not DATASET_RE.match(mc.name):
            problems.append((f"{where}.name", "a dataset name is letters, digits, '_', '-' and '.'"))
        if mc.dataset in seen:
            problems.append((f"{where}.name" if mc.name else f"{where}.data", f"dataset {mc.dataset!r} is "
                             f"also evaluation.mc[{seen[mc.dataset]}]; give each dataset its own name"))
        seen.setdefault(mc.dataset, i)
    if spec.evaluation.identity is not None:
        ident = spec.evaluation.identity
        if ident.suite is None and ident.persona_name is None:
            problems.append(("evaluation.identity", "give a suite (a YAML file) or persona_name (for the "
                             "built-in template)"))
    return problems


def _evaluated_on(spec: Spec, suite: str) -> set[str]:
    return {n for n in spec.conditions if suite in evaluated_suites(spec, n)}


def _comparisons(spec: Spec) -> Problems:
    problems = []
    # a pair is compared on multiple choice, or on behaviour rates (pyfuse.experiment.behaviour)
    compared = _evaluated_on(spec, "mc") | _evaluated_on(spec, "behaviour")
    for i, cmp in enumerate(spec.comparisons):
        for side in ("a", "b"):
            ref = getattr(cmp, side)
            if ref not in spec.conditions:
                problems.append((f"comparisons[{i}].{side}", f"unknown condition {ref!r}"))
            elif ref not in compared:
                problems.append((f"comparisons[{i}].{side}", f"condition {ref!r} is not evaluated on "
                                 "multiple choice (evaluation.mc) or behaviour (evaluation.behaviour)"))
            if ref in spec.conditions and spec.conditions[ref].seeds is not None:
                problems.append((f"comparisons[{i}].{side}", f"condition {ref!r} has seeds: compare its "
                                 "members as a distribution (analysis.placebo / dithered, or null_p)"))
        if cmp.a == cmp.b:
            problems.append((f"comparisons[{i}]", "compares a condition with itself"))
    return problems


def _stat_problems(spec: Spec, stat, field: str) -> Problems:
    """A statistic's condition names: known, evaluated on what it needs,
    seeded only where a distribution is meant (``null_p``'s second)."""
    problems = []
    mc_conditions, ident_conditions = _evaluated_on(spec, "mc"), _evaluated_on(spec, "identity")
    for k, ref in enumerate(stat.args):
        family_arg = stat.func == "null_p" and k == 1
        if ref not in spec.conditions:
            problems.append((field, f"{stat}: unknown condition {ref!r}"))
        elif family_arg != (spec.conditions[ref].seeds is not None):
            problems.append((field, f"{stat}: {ref!r} " + ("must be a condition with seeds (the null "
                             "distribution)" if family_arg else "has seeds; only null_p(A, F) takes one, as F")))
        elif stat.func == "identity" and ref not in ident_conditions:
            problems.append((field, f"{stat}: condition {ref!r} has no identity evaluation"))
        elif stat.func != "identity" and ref not in mc_conditions:
            problems.append((field, f"{stat}: condition {ref!r} is not evaluated on multiple choice "
                             "(evaluation.mc)"))
    datasets = [mc.dataset for mc in spec.evaluation.mc_sets]
    if stat.dataset is not None and stat.dataset not in datasets:
        problems.append((field, f"{stat}: unknown dataset {stat.dataset!r} (known: {', '.join(datasets)})"))
    return problems


def _criterion(spec: Spec) -> Problems:
    """The criterion's condition names: known, and evaluated on what its statistics need."""
    if spec.preregistration is None:
        return []
    problems = []
    for stat in parse(spec.preregistration.criterion).stats():
        problems += _stat_problems(spec, stat, "preregistration.criterion")
    return problems


def _family(spec: Spec) -> Problems:
    """The declared family: valid statistics, and every p value of the criterion in it."""
    pr = spec.preregistration
    if pr is None or pr.family is None:
        return []
    problems = []
    members = []
    for i, text in enumerate(pr.family):
        stat = parse_pvalue(text)
        problems += _stat_problems(spec, stat, f"preregistration.family[{i}]")
        if str(stat) in members:
            problems.append((f"preregistration.family[{i}]", f"{stat} is listed twice"))
        members.append(str(stat))
    for stat in parse(pr.criterion).pvalues():
        if str(stat) not in members:
            problems.append(("preregistration.family", f"the criterion's {stat} is not in the family (its "
                             f"p value must be adjusted with the others; family: {', '.join(members)})"))
    return problems


def _analysis(spec: Spec) -> Problems:
    """The analysis roles: conditions evaluated on multiple choice; only
    placebo / dithered seeded; a reference when trained starts from a model."""
    a = spec.analysis
    if a is None:
        return []
    problems = []
    mc_conditions = _evaluated_on(spec, "mc")
    for role in ("trained", "zero", "reference", "unfused", "placebo", "dithered"):
        ref = getattr(a, role)
        if ref is None:
            continue
        seeded = role in ("placebo", "dithered")
        if ref not in spec.conditions:
            problems.append((f"analysis.{role}", f"unknown condition {ref!r}"))
        elif seeded != (spec.conditions[ref].seeds is not None):
            problems.append((f"analysis.{role}", f"condition {ref!r} " + ("needs seeds (it is a distribution)"
                                                                          if seeded else "has seeds")))
        elif ref not in mc_conditions:
            problems.append((f"analysis.{role}", f"condition {ref!r} is not evaluated on multiple choice"))
    if a.reference is None and a.trained in spec.conditions and spec.conditions[a.trained].from_ not in spec.conditions:
        problems.append(("analysis.reference", f"required: {a.trained!r} starts from the model "
                         f"{spec.conditions[a.trained].from_!r}; name the condition that scores that model"))
    return problems


# ---------------------------------------------------------------------------
# Circular references
# ---------------------------------------------------------------------------


def dependencies(spec: Spec) -> dict[str, dict[str, str]]:
    """The entity graph: ``node -> {node it needs: the field that says so}``.

    Nodes: ``model:NAME`` (a condition's model: its ``from``, then its
    stages), ``eval:NAME`` (the condition's evaluations, of that model) and
    ``setg`` (both Set-G models evaluated on ``setg.data``, then mined and
    split). A condition's model and its evaluations are separate nodes: Set-G
    is mined with the *models* of ``setg.base`` and ``setg.persona``, so those
    conditions can be evaluated on ``setg.*`` like any other (their models
    come first, their evaluations after the split); a condition whose model
    needs Set-G (a stage that trains on it) while Set-G needs that model is a
    real cycle."""
    deps: dict[str, dict[str, str]] = {}
    for name, cond in spec.conditions.items():
        d: dict[str, str] = {}
        if cond.from_ in spec.conditions:
            d[f"model:{cond.from_}"] = f"conditions.{name}.from"
        for where, kind, opts in condition_stages(spec, name):
            if kind == "train" and opts["data"] in ("setg", "setg.train"):
                d.setdefault("setg", f"{where}.data")
            if kind == "fuse" and opts.get("calibration") in ("setg", "setg.train"):
                d.setdefault("setg", f"{where}.calibration")
        for node, field in recipe_dependencies(spec, name).items():
            d.setdefault(node, field)
        deps[f"model:{name}"] = d
        e = {f"model:{name}": f"conditions.{name}"}
        for i, mc in enumerate(spec.evaluation.mc_sets):
            if mc.data.startswith("setg.") and mc.data not in spec.data and "mc" in evaluated_suites(spec, name):
                e.setdefault("setg", f"evaluation.mc[{i}].data" if i else "evaluation.mc.data")
        deps[f"eval:{name}"] = e
    deps.update(pairs_dependencies(spec))
    if spec.setg is not None:
        d = {}
        for role in ("base", "persona"):
            ref = getattr(spec.setg, role)
            if ref in spec.conditions:
                d.setdefault(f"model:{ref}", f"setg.{role}")
        deps["setg"] = d
    return deps


def _node_label(node: str) -> str:
    kind, _, name = node.partition(":")
    return {"model": name, "eval": f"{name} (evaluation)", "pairs": f"pairs {name}"}.get(kind, node)


def _edge_reason(src: str, dst: str, field: str) -> str:
    """Why ``src`` needs ``dst``, ``field`` being the spec field that says so."""
    s, d = _node_label(src), _node_label(dst)
    if dst == "setg":
        if field.endswith(".calibration"):
            return f"{s}'s fuse calibrates on Set-G"
        return f"{s} {'trains' if src.startswith('model:') else 'is evaluated'} on Set-G"
    if src == "setg":
        return f"Set-G is mined with {d}'s model"
    return f"{s} starts from {d}"


def find_cycle(spec: Spec) -> tuple[str, str] | None:
    """The first circular reference of :func:`dependencies`, as ``(field,
    message)``: the field is that of the cycle's first edge (e.g.
    ``conditions.C1.from``; through Set-G, the field that needs Set-G, e.g.
    ``conditions.P.stages[0].train.data``)."""
    deps = dependencies(spec)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(deps.get(node, ())):
            if state.get(nxt) == 1:
                ring = stack[stack.index(nxt):]
                if "setg" in ring:  # start at what needs Set-G: the field that closes the loop
                    i = (ring.index("setg") - 1) % len(ring)
                    ring = ring[i:] + ring[:i]
                cyc = ring + [ring[0]]
                edges = list(zip(cyc, cyc[1:]))
                text = "circular reference: " + " -> ".join(_node_label(n) for n in cyc)
                if "setg" in cyc:
                    text += " (" + "; ".join(_edge_reason(a, b, deps[a][b]) for a, b in edges) + ")"
                return deps[edges[0][0]][edges[0][1]], text
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(deps):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


# ---------------------------------------------------------------------------
# Paths and the identity suite
# ---------------------------------------------------------------------------


def missing_paths(spec: Spec) -> list[tuple[str, str, Path]]:
    """``(field path, what, resolved path)`` of every path that does not exist."""
    out = []
    for name, p in spec.models.items():
        r = spec.resolve(p)
        if not r.is_dir():
            out.append((f"models.{name}", "model directory" if not r.exists() else "model directory (not a "
                        "directory)", r))
    for name, p in spec.data.items():
        r = spec.resolve(p)
        if not r.exists():
            out.append((f"data.{name}", "data path", r))
    ident = spec.evaluation.identity
    if ident is not None and ident.suite is not None:
        r = spec.resolve(ident.suite)
        if not r.is_file():
            out.append(("evaluation.identity.suite", "identity suite", r))
    beh = spec.evaluation.behaviour
    if beh is not None and not spec.resolve(beh.suite).is_file():
        out.append(("evaluation.behaviour.suite", "behaviour suite", spec.resolve(beh.suite)))
    for name in spec.conditions:
        for where, kind, opts in condition_stages(spec, name):
            ref = opts.get("calibration") if kind == "fuse" else None
            if ref is not None and calibration_source(spec, ref)[0] == "path" and \
                    not spec.resolve(ref).exists():
                out.append((f"{where}.calibration", "calibration data (a path: no `data` entry has this name)",
                            spec.resolve(ref)))
    pr = spec.preregistration
    if pr is not None and pr.discordance_from is not None:
        r = spec.resolve(pr.discordance_from)
        if not r.is_file():
            out.append(("preregistration.discordance_from", "noise-floor result", r))
    return out + missing_recipe_paths(spec)


def check_suite(spec: Spec) -> list[tuple[str, str]]:
    """Load the identity, behaviour and persona suites (when they exist) with
    the spec's overrides; check that applied adapters fit their models."""
    return _check_identity_suite(spec) + _check_behaviour_suite(spec) + check_persona_suite(spec) + fit_problems(spec)


def _check_behaviour_suite(spec: Spec) -> list[tuple[str, str]]:
    beh = spec.evaluation.behaviour
    if beh is None or not spec.resolve(beh.suite).is_file():
        return []
    from ..evals.behaviour import load_suite

    try:
        load_suite(spec.resolve(beh.suite), **beh.model_dump(exclude={"suite"}))
    except UserError as err:
        return [("evaluation.behaviour.suite", str(err))]
    return []


def _check_identity_suite(spec: Spec) -> list[tuple[str, str]]:
    ident = spec.evaluation.identity
    if ident is None:
        return []
    path = spec.resolve(ident.suite) if ident.suite is not None else None
    if path is not None and not path.is_file():
        return []
    from ..evals.identity import load_suite

    try:
        load_suite(path, persona_name=ident.persona_name, aliases=ident.aliases, base_names=ident.base_names,
                   vendors=ident.vendors, system_prompt=ident.system_prompt, max_tokens=ident.max_tokens)
    except UserError as err:
        return [("evaluation.identity.suite", str(err))]
    return []
