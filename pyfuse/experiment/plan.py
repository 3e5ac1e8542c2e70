"""The plan: a validated spec turned into a DAG of content-addressed steps.

A step is ``(kind, options, inputs)``; its key is the SHA-256 of the
canonical JSON of ``{"engine", "kind", "options", "inputs"}`` where an input
is either the key of the step that produces it (and which of its outputs)
or, for a file or directory the user supplied, a fingerprint of its
contents (SHA-256 of every file up to 64 MB, size and modification time of
larger ones, such as model shards). So two conditions that share a prefix
of stages share those steps (a persona model fused once serves every
condition built on it), and any change of an option or an input gives new
keys downstream only. :mod:`.runner` runs the steps; :mod:`.steps` says
what each kind does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .criterion import parse
from .layout import ADAPTER, MODEL, ROWS, SETG_DATA, SETG_ITEMS, STEPS_DIR, step_dir
from .fingerprint import fingerprint
from .plan_recipe import apply_stage, pairs_data, persona_step
from .prereg import canonical_json
from .resolve import calibration_source, condition_stages, evaluated_suites, is_fused, members
from .spec import FUSE_DEFAULTS, Spec

# Part of every step key: bump it when a step's outputs change meaning, so a
# resumed run never mixes old and new outputs (3: calibrated re-fits the groups
# the delta leaves).
ENGINE_VERSION = 3


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class Artifact:
    """A step's output (``step`` + ``sub``) or a user-supplied path (``source``)."""

    step: "Step | None" = None
    sub: str | None = None
    source: Path | None = None
    fp: dict | None = None

    def ref(self) -> dict:
        if self.step is not None:
            return {"step": self.step.key, "out": self.sub}
        return {"source": self.fp}

    def path(self, root: Path) -> Path:
        if self.step is not None:
            return step_dir(root, self.step.dirname) / self.sub
        return self.source

    def describe(self) -> dict:
        if self.step is not None:
            return {"step": self.step.dirname, "out": self.sub}
        return {"source": str(self.source)}

    def display(self) -> str:
        """The path as results.json shows it: relative to DIR for step outputs."""
        if self.step is not None:
            return f"{STEPS_DIR}/{self.step.dirname}/{self.sub}"
        return str(self.source)


@dataclass(eq=False)
class Step:
    kind: str
    options: dict
    inputs: dict[str, Artifact]
    key: str
    labels: list[str] = field(default_factory=list)

    @property
    def dirname(self) -> str:
        return f"{self.kind}-{self.key[:12]}"

    def out(self, sub: str) -> Artifact:
        return Artifact(step=self, sub=sub)

    @property
    def label(self) -> str:
        """The first label; a step that several conditions share (it runs
        once) says with how many others."""
        others = len(self.labels) - 1
        if not others:
            return self.labels[0]
        return self.labels[0] + f" (shared with {others} other condition{'s' if others != 1 else ''})"


@dataclass
class FuseRecord:
    fuse: Step
    noise_floor: Step | None
    setting: str  # e.g. "3-bit g64, stock"


@dataclass
class ConditionPlan:
    name: str  # a condition, or a member NAME.i of a seeded one
    model: Artifact
    adapter: Artifact | None
    quant: dict | None  # the current model's default quantization {bits, group_size}
    stages: list[dict] = field(default_factory=list)
    fuses: list[FuseRecord] = field(default_factory=list)
    mc_sets: dict[str, Step] = field(default_factory=dict)  # dataset -> eval-mc step, the primary first
    identity: Step | None = None
    behaviour: Step | None = None
    persona: Step | None = None
    fused_adapters: list[Artifact] = field(default_factory=list)  # the adapters its fuse stages fused, in order
    overlaps: list[Step] = field(default_factory=list)  # compare steps of stacked adapters
    family: str | None = None  # the seeded condition of a member
    seed: int | None = None
    pre_fuse: Artifact | None = None  # the model its last fuse went into (its answers' reference)
    flip_reference: Step | None = None  # that model's answers on the primary dataset (same method)
    margins: Step | None = None  # ... and its letter log-probabilities (logprob)

    @property
    def mc(self) -> Step | None:
        """The evaluation on the primary dataset."""
        return next(iter(self.mc_sets.values()), None)


@dataclass
class Plan:
    spec: Spec
    split_seed: int | None
    steps: dict[str, Step] = field(default_factory=dict)  # key -> step, in topological order
    conditions: dict[str, ConditionPlan] = field(default_factory=dict)
    setg: Step | None = None
    setg_evals: dict[str, Step] = field(default_factory=dict)
    comparisons: list[tuple[str, str]] = field(default_factory=list)
    families: dict[str, list[str]] = field(default_factory=dict)  # seeded condition -> member names
    datasets: list[str] = field(default_factory=list)  # multiple-choice datasets, the primary first
    pairs: dict[str, Step] = field(default_factory=dict)  # spec.pairs name -> its pairs step

    def ordered(self) -> list[Step]:
        return list(self.steps.values())

    def consumers(self) -> dict[str, list[Step]]:
        out: dict[str, list[Step]] = {k: [] for k in self.steps}
        for s in self.steps.values():
            for art in s.inputs.values():
                if art.step is not None:
                    out[art.step.key].append(s)
        return out

    def to_json(self) -> dict:
        conds = {}
        for name, c in self.conditions.items():
            cond = self.spec.conditions[c.family or name]
            conds[name] = {
                "from": cond.from_,
                "description": cond.description,
                "stages": c.stages,
                "model": c.model.describe(),
                "adapter": c.adapter.describe() if c.adapter is not None else None,
                "quantization": c.quant,
                "fuses": [{"fuse": f.fuse.dirname, "noise_floor": f.noise_floor.dirname if f.noise_floor else None,
                           "setting": f.setting, "options": f.fuse.options} for f in c.fuses],
                "mc": c.mc.dirname if c.mc else None,
                "mc_sets": {ds: st.dirname for ds, st in c.mc_sets.items()},
                "identity": c.identity.dirname if c.identity else None,
                "behaviour": c.behaviour.dirname if c.behaviour else None,
                "persona": c.persona.dirname if c.persona else None,
                "overlaps": [st.dirname for st in c.overlaps],
                "family": c.family, "seed": c.seed,
                "flip_reference": c.flip_reference.dirname if c.flip_reference else None,
                "margins": c.margins.dirname if c.margins else None,
            }
        return {
            "engine": ENGINE_VERSION,
            "name": self.spec.name,
            "spec": str(self.spec._path) if self.spec._path else None,
            "split_seed": self.split_seed,
            "steps": [{"dir": s.dirname, "key": s.key, "kind": s.kind, "options": s.options,
                       "inputs": {k: a.describe() for k, a in s.inputs.items()}, "labels": s.labels}
                      for s in self.ordered()],
            "conditions": conds,
            "condition_order": list(self.conditions),
            "setg": self.setg.dirname if self.setg else None,
            "comparisons": [list(p) for p in self.comparisons],
            "families": self.families,
            "datasets": self.datasets,
            "pairs": {name: st.dirname for name, st in self.pairs.items()},
            "analysis": self.spec.analysis.model_dump() if self.spec.analysis is not None else None,
        }


def model_quant(path: Path) -> dict | None:
    """The model's default affine quantization ``{bits, group_size}`` as the
    fuse reads it (:class:`pyfuse.io.model_dir.ModelDir`): config.json's
    default, not a per-module override (a fuse with no ``requant_bits`` keeps
    each module's own). None for a model that is not affine-quantized, and
    for one the reader refuses: the step that uses it reports why."""
    from ..io.model_dir import ModelDir  # imports mlx: not needed to validate a spec

    try:
        with ModelDir(path) as model:
            q = model.quantization
    except UserError:
        return None
    if q is None or q.mode != "affine":
        return None
    return {"bits": q.bits, "group_size": q.group_size}


class _Planner:
    def __init__(self, spec: Spec, split_seed: int | None):
        self.spec = spec
        self.plan = Plan(spec=spec, split_seed=split_seed)
        self._sources: dict[Path, Artifact] = {}
        self._models: dict[str, ConditionPlan] = {}  # conditions (members) whose model is planned
        self._evaluated: dict[str, list[ConditionPlan]] = {}  # conditions whose evaluations are planned
        self._busy: set[str] = set()  # being planned (a guard: the spec check refuses cycles)

    def source(self, path: Path) -> Artifact:
        path = Path(path).resolve()
        if path not in self._sources:
            self._sources[path] = Artifact(source=path, fp=fingerprint(path))
        return self._sources[path]

    def step(self, kind: str, options: dict, inputs: dict[str, Artifact], label: str) -> Step:
        body = {"engine": ENGINE_VERSION, "kind": kind, "options": options,
                "inputs": {k: a.ref() for k, a in sorted(inputs.items())}}
        key = hashlib.sha256(canonical_json(body).encode()).hexdigest()
        existing = self.plan.steps.get(key)
        if existing is not None:
            if label not in existing.labels:
                existing.labels.append(label)
            return existing
        st = Step(kind=kind, options=options, inputs=dict(inputs), key=key, labels=[label])
        self.plan.steps[key] = st
        return st

    # -- models and data -----------------------------------------------------

    def model_of(self, ref: str) -> tuple[Artifact, dict | None, Artifact | None]:
        if ref in self.spec.models:
            path = self.spec.resolve(self.spec.models[ref])
            return self.source(path), model_quant(path), None
        c = self.condition_model(ref)
        return c.model, c.quant, c.adapter

    def train_data(self, ref: str) -> Artifact:
        if ref in ("setg", "setg.train"):
            return self.setg().out(SETG_DATA)
        if ref in self.spec.pairs and ref not in self.spec.data:
            return pairs_data(self, ref)
        return self.source(self.spec.resolve(self.spec.data[ref]))

    def calibration(self, ref: str) -> Artifact:
        kind, name = calibration_source(self.spec, ref)
        return self.train_data(name) if kind != "path" else self.source(self.spec.resolve(name))

    def mc_data(self, ref: str) -> Artifact:
        if ref.startswith("setg.") and ref not in self.spec.data:
            return self.setg().out(f"{SETG_ITEMS}/{ref.split('.', 1)[1]}.jsonl")
        return self.source(self.spec.resolve(self.spec.data[ref]))

    def eval_mc(self, model: Artifact, adapter: Artifact | None, data: Artifact, opts: dict, label: str) -> Step:
        inputs = {"model": model, "data": data}
        if adapter is not None:
            inputs["adapter"] = adapter
        opts = dict(opts)
        if opts["method"] == "logprob":
            opts["batch_size"] = None  # scores do not depend on it
            opts["max_tokens"] = None
        return self.step("eval-mc", opts, inputs, label)

    def _enter(self, what: str) -> None:
        if what in self._busy:
            raise RuntimeError(f"internal error: circular reference through {what} (the spec check "
                               "should have refused it)")
        self._busy.add(what)

    def setg(self) -> Step:
        """Mine Set-G with the *models* of ``setg.base`` / ``setg.persona``
        (a condition's evaluations are planned separately, so the setg
        persona can itself be evaluated on ``setg.test``)."""
        if self.plan.setg is not None:
            return self.plan.setg
        self._enter("setg")
        sg = self.spec.setg
        data = self.source(self.spec.resolve(self.spec.data[sg.data]))
        opts = {"method": sg.method, "batch_size": sg.batch_size, "max_tokens": sg.max_tokens,
                "limit": sg.limit, "system_prompt": None}
        rows = {}
        for role in ("base", "persona"):
            ref = getattr(sg, role)
            model, _, adapter = self.model_of(ref)
            st = self.eval_mc(model, adapter, data, opts, f"setg: evaluate {role} ({ref})")
            self.plan.setg_evals[role] = st
            rows[role] = st.out(ROWS)
        seed = self.plan.split_seed if self.plan.split_seed is not None else (sg.seed or 0)
        self.plan.setg = self.step("setg", {"split": sg.split.model_dump(), "valid_frac": sg.valid_frac,
                                            "seed": seed},
                                   {"base_rows": rows["base"], "persona_rows": rows["persona"], "data": data},
                                   "setg: mine and split")
        self._busy.discard("setg")
        return self.plan.setg

    # -- conditions ----------------------------------------------------------

    def condition_model(self, name: str, member: str | None = None, seed: int | None = None) -> ConditionPlan:
        """The steps of the condition's model (of its member ``member`` with
        ``seed``, for a seeded condition): its ``from`` and its stages (not its
        evaluations: see :meth:`condition`)."""
        key = member or name
        if key in self._models:
            return self._models[key]
        self._enter(f"condition {key!r}")
        model, quant, adapter = self.model_of(self.spec.conditions[name].from_)
        cp = ConditionPlan(name=key, model=model, adapter=adapter, quant=quant,
                           family=name if member else None, seed=seed)
        stage = {"train": self._train, "zero": self._zero, "placebo": self._placebo, "fuse": self._fuse,
                 "apply": lambda *a: apply_stage(self, *a)}
        for n_stage, (_, kind, opts) in enumerate(condition_stages(self.spec, name, seed), 1):
            stage[kind](cp, opts, n_stage)
        self._busy.discard(f"condition {key!r}")
        self._models[key] = cp
        return cp

    def _train(self, cp: ConditionPlan, opts: dict, n_stage: int) -> None:
        data = self.train_data(opts["data"])
        st = self.step("train", opts, {"model": cp.model, "data": data}, f"{cp.name}: stage {n_stage} train")
        if opts["fine_tune_type"] == "full":  # a model of the same quantization, no adapter
            cp.model = st.out(MODEL)
            cp.stages.append({"kind": "train", "step": st.dirname, "options": opts})
            return
        cp.adapter = st.out(ADAPTER)
        if cp.fused_adapters:  # a stacked adapter: how much it shares the subspaces of the one fused before
            cp.overlaps.append(self.step("compare", {}, {"adapter_a": cp.fused_adapters[-1], "adapter_b": cp.adapter},
                                         f"{cp.name}: subspace overlap of stage {n_stage}'s adapter"))
        cp.stages.append({"kind": "train", "step": st.dirname, "options": opts})

    def _zero(self, cp: ConditionPlan, opts: dict, n_stage: int) -> None:
        inputs = {"adapter": cp.adapter}
        # a DoRA adapter's zero-delta twin needs the model its magnitudes refer to
        trained_dora = cp.stages and cp.stages[-1]["kind"] == "train" and \
            cp.stages[-1]["options"].get("fine_tune_type") == "dora"
        if trained_dora:
            inputs["model"] = cp.model
        st = self.step("zero", {"dora": bool(trained_dora)}, inputs, f"{cp.name}: stage {n_stage} zero")
        cp.adapter = st.out(ADAPTER)
        cp.stages.append({"kind": "zero", "step": st.dirname, "options": {}})

    def _placebo(self, cp: ConditionPlan, opts: dict, n_stage: int) -> None:
        st = self.step("placebo", opts, {"adapter": cp.adapter}, f"{cp.name}: stage {n_stage} placebo")
        cp.adapter = st.out(ADAPTER)
        cp.stages.append({"kind": "placebo", "step": st.dirname, "options": opts})

    def _fuse(self, cp: ConditionPlan, opts: dict, n_stage: int) -> None:
        """The fuse, and the noise floor of its setting on the model it fuses
        into; a dithered fuse is the stock fuse, then a stochastic fuse of the
        residual into it (:mod:`pyfuse.adapters.dither`)."""
        base_model, base_quant, adapter = cp.model, cp.quant, cp.adapter
        label = f"{cp.name}: stage {n_stage} fuse"
        if opts["dither"]:
            stock = self.step("fuse", {**opts, "dither": False, "seed": FUSE_DEFAULTS["seed"]},
                              {"model": base_model, "adapter": adapter}, label + " (stock, before the dither)")
            residual = self.step("dither", {}, {"model": base_model, "fused": stock.out(MODEL), "adapter": adapter},
                                 f"{cp.name}: stage {n_stage} dither residual")
            st = self.step("fuse", {**opts, "policy": "stochastic", "dither": False},
                           {"model": stock.out(MODEL), "adapter": residual.out(ADAPTER)}, label + " (dithered)")
        else:  # calibration data is an input (its content, not its name, is the step's identity)
            calib = {} if opts.get("calibration") is None else {"calibration": self.calibration(opts["calibration"])}
            st = self.step("fuse", {k: v for k, v in opts.items() if k != "calibration"},
                           {"model": base_model, "adapter": adapter, **calib}, label)
        noise = None
        setting = opts["policy"]
        if base_quant is not None and not opts["dequantize"]:
            bits = opts["requant_bits"] or base_quant["bits"]
            gs = opts["requant_group_size"] or base_quant["group_size"]
            setting = f"{bits}-bit g{gs}, {opts['policy']}" + (f", dithered (seed {opts['seed']})"
                                                              if opts["dither"] else "")
            # (a grid-keeping fuse onto a finer grid refines the base exactly; the noise floor would re-fit it)
            refined = opts["policy"] != "stock" and (bits, gs) != (base_quant["bits"], base_quant["group_size"])
            if self.spec.report.noise_floor and not opts["dither"] and not refined:
                noise = self.step("noise-floor", {
                    "group_size": gs, "bits": bits, "policy": opts["policy"],
                    "seed": opts["seed"], "outputs": self.spec.report.noise_floor_outputs,
                }, {"model": base_model}, f"{cp.name}: noise floor of stage {n_stage} ({setting})")
        elif opts["dequantize"]:
            setting = "dequantized"
        cp.fuses.append(FuseRecord(fuse=st, noise_floor=noise, setting=setting))
        cp.fused_adapters.append(adapter)
        cp.pre_fuse = base_model
        cp.model = st.out(MODEL)
        cp.adapter = None
        if opts["dequantize"]:
            cp.quant = None
        cp.stages.append({"kind": "fuse", "step": st.dirname, "options": opts, "setting": setting,
                          "noise_floor": noise.dirname if noise else None})

    def condition(self, name: str) -> list[ConditionPlan]:
        """The condition's model(s) (one per member of a seeded condition),
        then their evaluations (after the parent condition's, so the steps
        keep the spec's natural order)."""
        spec = self.spec
        if name in self._evaluated:
            return self._evaluated[name]
        self._enter(f"the evaluations of {name!r}")
        parent = spec.conditions[name].from_
        if parent in spec.conditions:
            self.condition(parent)
        out = []
        for member, seed in members(spec, name):
            cp = self.condition_model(name, member if seed is not None else None, seed)
            self._evaluations(name, cp)
            self.plan.conditions[cp.name] = cp
            out.append(cp)
        if spec.conditions[name].seeds is not None:
            self.plan.families[name] = [cp.name for cp in out]
        self._busy.discard(f"the evaluations of {name!r}")
        self._evaluated[name] = out
        return out

    def _evaluations(self, name: str, cp: ConditionPlan) -> None:
        """Multiple choice on every dataset (and, for a fused condition, the
        answers and margins of the model it was fused into, on the primary
        one), identity."""
        spec = self.spec
        suites = evaluated_suites(spec, name)
        if "mc" in suites:
            for i, mc in enumerate(spec.evaluation.mc_sets):
                opts = {"method": mc.method, "batch_size": mc.batch_size, "max_tokens": mc.max_tokens,
                        "limit": mc.limit, "system_prompt": mc.system_prompt}
                data = self.mc_data(mc.data)
                cp.mc_sets[mc.dataset] = self.eval_mc(cp.model, cp.adapter, data, opts,
                                                      f"{cp.name}: evaluate mc" + (f" ({mc.dataset})" if i else ""))
                if i == 0 and cp.pre_fuse is not None and is_fused(spec, name):
                    cp.flip_reference = self.eval_mc(cp.pre_fuse, None, data, opts,
                                                     f"{cp.name}: answers of the model it was fused into")
                    cp.margins = self.eval_mc(cp.pre_fuse, None, data, {**opts, "method": "logprob"},
                                              f"{cp.name}: margins of the model it was fused into")
        if "identity" in suites:
            ident = spec.evaluation.identity
            inputs = {"model": cp.model}
            if cp.adapter is not None:
                inputs["adapter"] = cp.adapter
            if ident.suite is not None:
                inputs["suite"] = self.source(spec.resolve(ident.suite))
            cp.identity = self.step("eval-identity", ident.model_dump(exclude={"suite"}), inputs,
                                    f"{cp.name}: evaluate identity")
        if "behaviour" in suites:
            beh = spec.evaluation.behaviour
            inputs = {"model": cp.model, "suite": self.source(spec.resolve(beh.suite))}
            if cp.adapter is not None:
                inputs["adapter"] = cp.adapter
            cp.behaviour = self.step("eval-behaviour", beh.model_dump(exclude={"suite"}), inputs,
                                     f"{cp.name}: evaluate behaviour")
        if "persona" in suites:
            cp.persona = persona_step(self, cp)


def build_plan(spec: Spec, split_seed: int | None) -> Plan:
    """Every step of the spec, deduplicated by key, in an order where each
    step comes after the steps it needs."""
    planner = _Planner(spec, split_seed)
    for name in spec.conditions:
        planner.condition(name)
    plan = planner.plan
    # keep spec order for the conditions (members in seed order)
    plan.conditions = {cp.name: cp for n in spec.conditions for cp in planner.condition(n)}
    plan.datasets = [mc.dataset for mc in spec.evaluation.mc_sets]
    pairs = [(c.a, c.b) for c in spec.comparisons]
    if spec.preregistration is not None:
        for pair in parse(spec.preregistration.criterion).pairs():
            if pair not in pairs:
                pairs.append(pair)
    plan.comparisons = pairs
    return plan
