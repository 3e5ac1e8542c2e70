"""The experiment engine: a DAG of content-addressed, atomically published
steps that a rerun skips, and a run that can be killed at any moment.

Planning (:func:`build_plan`) turns a validated spec into steps. A step is
``(kind, options, inputs)``; its key is the SHA-256 of the canonical JSON
of ``{"engine", "kind", "options", "inputs"}`` where an input is either the
key of the step that produces it (and which of its outputs) or, for a file
or directory the user supplied, a fingerprint of its contents (SHA-256 of
every file up to 64 MB, size and modification time of larger ones, such as
model shards). So two conditions that share a prefix of stages share those
steps (a persona model fused once serves every condition built on it), and
any change of an option or an input gives new keys downstream only.

Execution (:func:`run_experiment`): each step runs into
``DIR/steps/.tmp-<kind>-<key12>-<pid>-<random>/``; its ``done.json`` is
written there last, then the directory is renamed to
``DIR/steps/<kind>-<key12>/`` (one atomic rename). A rerun skips every step
whose directory exists; the temporary directories of killed runs are
removed at the start (a ``flock`` on ``DIR/.lock`` keeps two runs out of one
directory). Fused models that no pending step needs are pruned (their
``model/`` removed, ``pruned.json`` written) unless ``keep_models``; a later
step that needs a pruned model re-runs its fuse (deterministic, so the same
bytes come back). The results are assembled from the step outputs only, so
an interrupted-and-resumed run writes the same ``results.json`` as an
uninterrupted one.

Files in DIR: ``prereg.json`` (the lock), ``plan.json`` (the steps of the
current spec), ``spec.yaml`` (a copy), ``steps/``, ``run.log.jsonl`` (timings,
errors), ``results.json``, ``report.md`` and its PNGs.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import secrets
import shutil
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..io.files import atomic_write_text, sigterm_as_interrupt
from ..errors import UserError
from . import prereg as prereg_mod
from .prereg import canonical_json
from .spec import (Spec, SpecError, check_suite, condition_stages, evaluated_suites, load_spec)
from .steps import RUNNERS

ENGINE_VERSION = 1
STEPS_DIR = "steps"
DONE = "done.json"
PRUNED = "pruned.json"
TMP_PREFIX = ".tmp-"
HASH_LIMIT = 64 << 20  # files up to this size are fingerprinted by content
LOG_FILE = "run.log.jsonl"
PLAN_FILE = "plan.json"
RESULTS_FILE = "results.json"


# ---------------------------------------------------------------------------
# Fingerprints of user-supplied paths
# ---------------------------------------------------------------------------


def _file_fingerprint(path: Path) -> dict:
    st = path.stat()
    if st.st_size <= HASH_LIMIT:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return {"size": st.st_size, "sha256": h.hexdigest()}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint(path: Path) -> dict:
    """Content fingerprint of a file or directory (hidden entries skipped);
    independent of where it lives."""
    path = Path(path)
    if path.is_file():
        return {"type": "file", **_file_fingerprint(path)}
    if path.is_dir():
        entries = []
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            entries.append([rel.as_posix(), _file_fingerprint(p)])
        return {"type": "dir", "sha256": hashlib.sha256(canonical_json(entries).encode()).hexdigest(),
                "files": len(entries)}
    raise UserError(f"{path} does not exist")


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
            return root / STEPS_DIR / self.step.dirname / self.sub
        return self.source

    def describe(self) -> dict:
        if self.step is not None:
            return {"step": self.step.dirname, "out": self.sub}
        return {"source": str(self.source)}

    def display(self, root: Path | None = None) -> str:
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
    name: str
    model: Artifact
    adapter: Artifact | None
    quant: dict | None  # the current model's default quantization {bits, group_size}
    stages: list[dict] = field(default_factory=list)
    fuses: list[FuseRecord] = field(default_factory=list)
    mc: Step | None = None
    identity: Step | None = None


@dataclass
class Plan:
    spec: Spec
    split_seed: int | None
    steps: dict[str, Step] = field(default_factory=dict)  # key -> step, in topological order
    conditions: dict[str, ConditionPlan] = field(default_factory=dict)
    setg: Step | None = None
    setg_evals: dict[str, Step] = field(default_factory=dict)
    comparisons: list[tuple[str, str]] = field(default_factory=list)

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
            conds[name] = {
                "from": self.spec.conditions[name].from_,
                "description": self.spec.conditions[name].description,
                "stages": c.stages,
                "model": c.model.describe(),
                "adapter": c.adapter.describe() if c.adapter is not None else None,
                "quantization": c.quant,
                "fuses": [{"fuse": f.fuse.dirname, "noise_floor": f.noise_floor.dirname if f.noise_floor else None,
                           "setting": f.setting, "options": f.fuse.options} for f in c.fuses],
                "mc": c.mc.dirname if c.mc else None,
                "identity": c.identity.dirname if c.identity else None,
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
        }


def _model_quant(path: Path) -> dict | None:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    q = cfg.get("quantization") or cfg.get("quantization_config")
    if not isinstance(q, dict) and isinstance(cfg.get("text_config"), dict):
        q = cfg["text_config"].get("quantization") or cfg["text_config"].get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
        return None
    if q.get("mode", "affine") != "affine":
        return None
    return {"bits": int(q["bits"]), "group_size": int(q["group_size"])}


class _Planner:
    def __init__(self, spec: Spec, split_seed: int | None):
        self.spec = spec
        self.plan = Plan(spec=spec, split_seed=split_seed)
        self._sources: dict[Path, Artifact] = {}
        self._models: dict[str, ConditionPlan] = {}  # conditions whose model is planned
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
            return self.source(path), _model_quant(path), None
        c = self.condition_model(ref)
        return c.model, c.quant, c.adapter

    def train_data(self, ref: str) -> Artifact:
        if ref in ("setg", "setg.train"):
            return self.setg().out("data")
        return self.source(self.spec.resolve(self.spec.data[ref]))

    def mc_data(self, ref: str) -> Artifact:
        if ref.startswith("setg.") and ref not in self.spec.data:
            return self.setg().out(f"items/{ref.split('.', 1)[1]}.jsonl")
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
            rows[role] = st.out("rows.jsonl")
        seed = self.plan.split_seed if self.plan.split_seed is not None else (sg.seed or 0)
        self.plan.setg = self.step("setg", {"train_frac": sg.train_frac, "seed": seed},
                                   {"base_rows": rows["base"], "persona_rows": rows["persona"], "data": data},
                                   "setg: mine and split")
        self._busy.discard("setg")
        return self.plan.setg

    # -- conditions ----------------------------------------------------------

    def condition_model(self, name: str) -> ConditionPlan:
        """The steps of the condition's model: its ``from`` and its stages
        (not its evaluations: see :meth:`condition`)."""
        if name in self._models:
            return self._models[name]
        self._enter(f"condition {name!r}")
        spec = self.spec
        cond = spec.conditions[name]
        model, quant, adapter = self.model_of(cond.from_)
        cp = ConditionPlan(name=name, model=model, adapter=adapter, quant=quant)
        n_stage = 0
        for where, kind, opts in condition_stages(spec, name):
            n_stage += 1
            label = f"{name}: stage {n_stage} {kind}"
            if kind == "train":
                data = self.train_data(opts["data"])
                st = self.step("train", opts, {"model": cp.model, "data": data}, label)
                cp.adapter = st.out("adapter")
                cp.stages.append({"kind": "train", "step": st.dirname, "options": opts})
            elif kind == "zero":
                inputs = {"adapter": cp.adapter}
                trained_dora = cp.stages and cp.stages[-1]["kind"] == "train" and \
                    cp.stages[-1]["options"].get("fine_tune_type") == "dora"
                if trained_dora:
                    inputs["model"] = cp.model
                st = self.step("zero", {"dora": bool(trained_dora)}, inputs, label)
                cp.adapter = st.out("adapter")
                cp.stages.append({"kind": "zero", "step": st.dirname, "options": {}})
            else:  # fuse
                base_model, base_quant = cp.model, cp.quant
                st = self.step("fuse", opts, {"model": cp.model, "adapter": cp.adapter}, label)
                noise = None
                setting = opts["policy"]
                if base_quant is not None and not opts["dequantize"]:
                    bits = opts["requant_bits"] or base_quant["bits"]
                    gs = opts["requant_group_size"] or base_quant["group_size"]
                    setting = f"{bits}-bit g{gs}, {opts['policy']}"
                    if spec.report.noise_floor:
                        noise = self.step("noise-floor", {
                            "group_size": gs, "bits": bits, "policy": opts["policy"],
                            "seed": opts["seed"], "outputs": spec.report.noise_floor_outputs,
                        }, {"model": base_model}, f"{name}: noise floor of stage {n_stage} ({setting})")
                elif opts["dequantize"]:
                    setting = "dequantized"
                cp.fuses.append(FuseRecord(fuse=st, noise_floor=noise, setting=setting))
                cp.model = st.out("model")
                cp.adapter = None
                if opts["dequantize"]:
                    cp.quant = None
                cp.stages.append({"kind": "fuse", "step": st.dirname, "options": opts, "setting": setting,
                                  "noise_floor": noise.dirname if noise else None})
        self._busy.discard(f"condition {name!r}")
        self._models[name] = cp
        return cp

    def condition(self, name: str) -> ConditionPlan:
        """The condition's model, then its evaluations (after its parent
        condition's, so the steps keep the spec's natural order)."""
        if name in self.plan.conditions:
            return self.plan.conditions[name]
        spec = self.spec
        self._enter(f"the evaluations of {name!r}")
        parent = spec.conditions[name].from_
        if parent in spec.conditions:
            self.condition(parent)
        cp = self.condition_model(name)
        suites = evaluated_suites(spec, name)
        if "mc" in suites:
            mc = spec.evaluation.mc
            cp.mc = self.eval_mc(cp.model, cp.adapter, self.mc_data(mc.data),
                                 {"method": mc.method, "batch_size": mc.batch_size, "max_tokens": mc.max_tokens,
                                  "limit": mc.limit, "system_prompt": mc.system_prompt},
                                 f"{name}: evaluate mc")
        if "identity" in suites:
            ident = spec.evaluation.identity
            inputs = {"model": cp.model}
            if cp.adapter is not None:
                inputs["adapter"] = cp.adapter
            if ident.suite is not None:
                inputs["suite"] = self.source(spec.resolve(ident.suite))
            cp.identity = self.step("eval-identity", ident.model_dump(exclude={"suite"}), inputs,
                                    f"{name}: evaluate identity")
        self._busy.discard(f"the evaluations of {name!r}")
        self.plan.conditions[name] = cp
        return cp


def build_plan(spec: Spec, split_seed: int | None) -> Plan:
    """Every step of the spec, deduplicated by key, in an order where each
    step comes after the steps it needs."""
    planner = _Planner(spec, split_seed)
    for name in spec.conditions:
        planner.condition(name)
    plan = planner.plan
    # keep spec order for the conditions
    plan.conditions = {n: plan.conditions[n] for n in spec.conditions}
    pairs = [(c.a, c.b) for c in spec.comparisons]
    if spec.preregistration is not None:
        from .criterion import parse

        for pair in parse(spec.preregistration.criterion).pairs():
            if pair not in pairs:
                pairs.append(pair)
    plan.comparisons = pairs
    return plan


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


@contextmanager
def _dir_lock(out: Path):
    path = out / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"{out} is in use by another pyfuse experiment run") from None
        yield
    finally:
        os.close(fd)




def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_file() and not p.is_symlink():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
    _fsync_dir(path)


@dataclass
class RunResult:
    out: Path
    results: dict
    executed: list[str]
    skipped: list[str]
    pruned: list[str]
    warnings: list[str]
    seconds: float


class _Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, event: str, **fields) -> None:
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")

    def history(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        except (OSError, ValueError):
            return []


def _rate_group(kind: str, options: dict) -> str:
    """Steps whose durations are comparable (per unit of work): the same
    kind, and for eval-mc the same method (generating costs far more per
    item than scoring log-probabilities)."""
    if kind == "eval-mc" and options.get("method"):
        return f"{kind}/{options['method']}"
    return kind


_COUNTS: dict[tuple, int] = {}


def _cached_count(path: Path, count: Callable[[Path], int]) -> int | None:
    """``count(path)``, cached by path, size and mtime; None if the file
    cannot be read (yet) or the count fails (an estimate only, never an error)."""
    try:
        st = path.stat()
        if not path.is_file():
            return None
        key = (count.__name__, str(path), st.st_size, st.st_mtime_ns)
        if key not in _COUNTS:
            _COUNTS[key] = int(count(path))
        return _COUNTS[key] or None
    except Exception:
        return None


def _rows(path: Path) -> int:
    """Rows of a JSONL (non-blank lines) or Parquet (from its metadata) file."""
    from ..data.mmlu import PARQUET_SUFFIXES

    if path.suffix.lower() in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _prompts(path: Path) -> int:
    """Prompts of an identity suite file (YAML or JSON)."""
    import yaml

    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    return len(data["prompts"])


def work_units(kind: str, options: dict, inputs: dict[str, Path]) -> float | None:
    """How much work a step is, in units whose cost is about constant within
    a rate group: items scored (eval-mc), prompts answered (eval-identity),
    examples trained on (train: iters x batch_size). None when unknown (other
    kinds, or an input that does not exist yet)."""
    try:
        if kind == "train":
            iters = options.get("iters")
            if not iters:
                return None
            return float(iters) * float(options.get("batch_size") or 1)
        if kind == "eval-mc":
            if "data" not in inputs:
                return None
            n = _cached_count(Path(inputs["data"]), _rows)
            limit = options.get("limit")
            if n is not None and limit:
                n = min(n, int(limit))
            return float(n) if n else None
        if kind == "eval-identity":
            from ..evals.identity import default_suite_path

            suite = inputs.get("suite")
            n = _cached_count(Path(suite) if suite is not None else default_suite_path(), _prompts)
            return float(n) if n else None
    except (TypeError, ValueError):
        return None
    return None


class _Estimator:
    """Seconds a step will take, from the steps of its rate group (see
    :func:`_rate_group`) already run, in this run and earlier runs in the same
    directory: the seconds per unit of work observed so far times the step's
    units (:func:`work_units`); without units, the mean duration of the
    group."""

    def __init__(self, history: list[dict] = ()):
        self.by_group: dict[str, list[float]] = {}
        self.work: dict[str, list[tuple[float, float]]] = {}  # group -> [(seconds, units)]
        for rec in history:
            if rec.get("event") == "step" and isinstance(rec.get("seconds"), (int, float)):
                units = rec.get("units")
                self.add(rec.get("group") or rec.get("kind"), rec["seconds"],
                         units if isinstance(units, (int, float)) else None)

    def add(self, group: str, seconds: float, units: float | None = None) -> None:
        self.by_group.setdefault(group, []).append(float(seconds))
        if units and units > 0:
            self.work.setdefault(group, []).append((float(seconds), float(units)))

    def estimate(self, group: str, units: float | None = None) -> float | None:
        done = self.work.get(group)
        if units and units > 0 and done:
            seconds = sum(s for s, _ in done)
            total = sum(u for _, u in done)
            return seconds / total * units
        xs = self.by_group.get(group)
        return sum(xs) / len(xs) if xs else None


def _fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Runner:
    def __init__(self, plan: Plan, out: Path, *, keep_models: bool = False,
                 echo: Callable[[str], None] | None = None):
        self.plan = plan
        self.out = out
        self.steps_dir = out / STEPS_DIR
        self.keep_models = keep_models
        self.echo = echo or (lambda msg: None)
        self.log = _Log(out / LOG_FILE)
        self.estimator = _Estimator(self.log.history())
        self.executed: list[str] = []
        self.skipped: list[str] = []
        self.pruned: list[str] = []
        self.consumers = plan.consumers()

    def step_dir(self, st: Step) -> Path:
        return self.steps_dir / st.dirname

    def done(self, st: Step) -> bool:
        return (self.step_dir(st) / DONE).is_file()

    def available(self, st: Step) -> bool:
        return self.done(st) and not (self.step_dir(st) / PRUNED).exists()

    def clean_temps(self) -> None:
        for p in self.steps_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.steps_dir.iterdir():  # a step directory without its marker is not a step
            if p.is_dir() and not p.name.startswith(".") and not (p / DONE).exists():
                shutil.rmtree(p, ignore_errors=True)

    def run(self) -> None:
        order = self.plan.ordered()
        total = len(order)
        pending = [s for s in order if not self.done(s)]
        for s in order:
            if self.done(s):
                self.skipped.append(s.dirname)
        if self.skipped:
            self.echo(f"{len(self.skipped)} of {total} steps already done in {self.out} (skipped)")
        self._prune()
        for i, st in enumerate(pending, 1):
            if self.done(st):  # re-run earlier as a pruned dependency
                continue
            left = self._remaining(pending[i - 1:])
            self.echo(f"[{total - len(pending) + i}/{total}] {st.kind} · {st.label}"
                      + (f"  (estimated {left})" if left else ""))
            self._ensure_inputs(st)
            self._execute(st)
            self._prune()

    def _units(self, st: Step) -> float | None:
        return work_units(st.kind, st.options, {k: a.path(self.out) for k, a in st.inputs.items()})

    def _estimate(self, st: Step) -> float | None:
        return self.estimator.estimate(_rate_group(st.kind, st.options), self._units(st))

    def _remaining(self, steps: list[Step]) -> str | None:
        known, unknown = 0.0, 0
        this = None
        for n, s in enumerate(steps):
            e = self._estimate(s)
            if n == 0:
                this = e
            if e is None:
                unknown += 1
            else:
                known += e
        if this is None and known == 0:
            return None
        parts = []
        if this is not None:
            parts.append(f"~{_fmt_seconds(this)} for this step")
        parts.append(f"~{_fmt_seconds(known)} left" + (f" + {unknown} step(s) not yet timed" if unknown else ""))
        return ", ".join(parts)

    def _ensure_inputs(self, st: Step) -> None:
        for art in st.inputs.values():
            if art.step is not None and not self.available(art.step):
                self._ensure_inputs(art.step)
                self.echo(f"      re-running {art.step.kind} · {art.step.label} (its output was pruned)")
                self._execute(art.step)
            elif art.step is None and not art.source.exists():
                raise UserError(f"{art.source} (an input of {st.label}) no longer exists")

    def _execute(self, st: Step) -> None:
        final = self.step_dir(st)
        tmp = self.steps_dir / f"{TMP_PREFIX}{st.dirname}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        started = time.monotonic()
        inputs = {k: a.path(self.out) for k, a in st.inputs.items()}
        try:
            try:
                summary = RUNNERS[st.kind](st.options, inputs, tmp)
            except UserError as err:
                self.log.write("fail", step=st.dirname, kind=st.kind, error=str(err))
                raise UserError(f"step {st.dirname} ({st.label}) failed: {err}\n(the finished steps are "
                                f"kept in {self.steps_dir}; fix the cause and run again to resume)") from None
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as err:  # a bug or a library error: keep the traceback in the log
                self.log.write("fail", step=st.dirname, kind=st.kind, error=repr(err),
                               traceback=traceback.format_exc())
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise UserError(f"step {st.dirname} ({st.label}) failed: {type(err).__name__}: {first} "
                                f"(traceback in {self.out / LOG_FILE}; the finished steps are kept, run "
                                "again to resume)") from None
            seconds = time.monotonic() - started
            marker = {"engine": ENGINE_VERSION, "kind": st.kind, "key": st.key, "options": st.options,
                      "inputs": {k: a.ref() for k, a in st.inputs.items()}, "labels": st.labels,
                      "summary": summary, "seconds": round(seconds, 3)}
            _fsync_tree(tmp)
            atomic_write_text(tmp / DONE, json.dumps(marker, indent=2, default=str) + "\n")
            _fsync_dir(tmp)
            if final.exists():  # replacing a pruned step
                old = self.steps_dir / f"{TMP_PREFIX}old-{st.dirname}-{os.getpid()}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.steps_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            gc.collect()
            try:
                import mlx.core as mx

                mx.clear_cache()
            except Exception:  # pragma: no cover - cache clearing is best effort
                pass
        group, units = _rate_group(st.kind, st.options), self._units(st)
        self.estimator.add(group, seconds, units)
        self.log.write("step", step=st.dirname, kind=st.kind, seconds=round(seconds, 3),
                       iters=st.options.get("iters") if st.kind == "train" else None, group=group,
                       units=units, label=st.label)
        self.executed.append(st.dirname)
        self.echo(f"      done in {_fmt_seconds(seconds)}")

    def _prune(self) -> None:
        if self.keep_models:
            return
        for st in self.plan.ordered():
            if st.kind != "fuse" or not self.available(st):
                continue
            if all(self.done(c) for c in self.consumers[st.key]):
                model = self.step_dir(st) / "model"
                atomic_write_text(self.step_dir(st) / PRUNED, json.dumps(
                    {"removed": "model", "reason": "no pending step needs it (run with --keep-models to keep "
                     "fused models)"}, indent=2) + "\n")
                shutil.rmtree(model, ignore_errors=True)
                self.pruned.append(st.dirname)
                self.log.write("prune", step=st.dirname)


def prepare(spec_path: str | os.PathLike) -> Spec:
    spec = load_spec(spec_path, check_paths=True)
    problems = check_suite(spec)
    if problems:
        raise SpecError(str(spec_path), problems)
    return spec


def run_experiment(spec_path: str | os.PathLike, out: str | os.PathLike, *, keep_models: bool = False,
                   echo: Callable[[str], None] | None = None) -> RunResult:
    """Run (or resume) the experiment of ``spec_path`` in ``out`` and write
    ``results.json`` and ``report.md`` there. See the module doc."""
    from .report import write_report
    from .results import assemble_results

    started = time.monotonic()
    echo = echo or (lambda msg: None)
    spec = prepare(spec_path)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / STEPS_DIR).mkdir(exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out} ({err.strerror})") from None
    warnings: list[str] = []
    with _dir_lock(out), sigterm_as_interrupt():
        runner_probe = Runner(Plan(spec=spec, split_seed=None), out)
        runner_probe.clean_temps()
        finished = any((p / DONE).is_file() for p in (out / STEPS_DIR).iterdir())
        lock = prereg_mod.lock(spec, out, has_finished_steps=finished)
        if lock is not None:
            echo(("locked" if lock.created else "checked") + f" the pre-registration: sha256 {lock.sha256[:12]}, "
                 f"split seed {lock.split_seed}")
            for w in prereg_mod.power_warnings(lock.document):
                if w["warn"]:
                    warnings.append("under-powered design: " + w["text"])
                    echo("warning: under-powered design: " + w["text"])
        split_seed = lock.split_seed if lock is not None else None
        plan = build_plan(spec, split_seed)
        atomic_write_text(out / PLAN_FILE, json.dumps(plan.to_json(), indent=2, sort_keys=True) + "\n")
        if spec._path is not None:
            atomic_write_text(out / "spec.yaml", spec._path.read_text(encoding="utf-8"))
        runner = Runner(plan, out, keep_models=keep_models, echo=echo)
        runner.log.write("start", spec=str(spec._path), steps=len(plan.steps))
        runner.run()
        results = assemble_results(plan, out, lock)
        atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True) + "\n")
        write_report(out)
        runner.log.write("finish", seconds=round(time.monotonic() - started, 3),
                         executed=len(runner.executed), skipped=len(runner.skipped))
    return RunResult(out=out, results=results, executed=runner.executed, skipped=runner.skipped,
                     pruned=runner.pruned, warnings=warnings, seconds=time.monotonic() - started)
