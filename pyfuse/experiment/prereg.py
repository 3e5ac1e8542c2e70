"""Pre-registration: lock the criterion before any training, derive the split
seed from it, and judge the results by exactly what was locked.

:func:`prereg_document` turns the spec's ``preregistration`` into a plain
object: the hypothesis, the criterion (normalised), the kill text, alpha,
power, planned n, baseline accuracy, the tests the criterion uses and its
thresholds, the family of tests whose p values are Holm-adjusted together,
the Set-G split rule (fractions, stratification, the seed rule), the
**design** (every stage, resolved, of the conditions the criterion, the
family and the analysis name, and of the conditions they start from; the
Set-G mining; the evaluation), the **SHA-256 of every data file the spec
names** (``data``, the identity suite, a noise-floor result), and the
**power** of each threshold before any data (:mod:`.power`), with
``allow_underpowered`` and its reason. It is written as canonical JSON
(sorted keys, no spaces, UTF-8) and hashed with SHA-256; the split seed is
``int(sha256[:8], 16)``.

:func:`lock` writes ``DIR/prereg.json`` the first time (atomically, before
any step runs), refusing an under-powered criterion unless the spec allows
it with a reason; afterwards it refuses a spec whose document differs
(criteria, design, or data), naming the fields that changed. A directory
that already holds finished steps but no lock is refused too: a
pre-registration must come before the training, not after.
:func:`read_lock` refuses a lock whose record was edited (its canonical
text, its hash, the parsed document and the split seed must agree) and
:func:`verify_data` one whose data files changed since: ``run`` and
``report`` both call them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..io.files import atomic_write_text
from .criterion import TEST_DESCRIPTIONS, parse
from .layout import LOCK_FILE
from .outputs import sha256_file
from .power import family_of, power_table, underpowered
from .resolve import calibration_source, condition_stages, model_shaping
from .spec import Spec

FORMAT = "pyfuse-prereg/2"
SEED_RULE = "int(sha256[:8], 16)"


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_seed_of(sha: str) -> int:
    return int(sha[:8], 16)


def sha256_path(path: Path) -> str:
    """SHA-256 of a file's bytes; of a directory, of the canonical list of
    ``[relative path, SHA-256]`` of its files (hidden entries skipped)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    entries = [[p.relative_to(path).as_posix(), sha256_file(p)] for p in sorted(path.rglob("*"))
               if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sha256_text(canonical_json(entries))


def data_paths(spec: Spec) -> dict[str, Path]:
    """Every data file the spec names, by field: ``data.NAME``,
    ``evaluation.identity.suite``, ``preregistration.discordance_from``, a
    fuse stage's ``calibration`` given as a path."""
    out = {f"data.{name}": spec.resolve(p) for name, p in spec.data.items()}
    for name in spec.conditions:
        for where, kind, opts in condition_stages(spec, name):
            ref = opts.get("calibration") if kind == "fuse" else None
            if ref is not None and calibration_source(spec, ref)[0] == "path":
                out[f"{where}.calibration"] = spec.resolve(ref)
    if spec.evaluation.identity is not None and spec.evaluation.identity.suite is not None:
        out["evaluation.identity.suite"] = spec.resolve(spec.evaluation.identity.suite)
    if spec.evaluation.persona is not None and spec.evaluation.persona.suite is not None:
        out["evaluation.persona.suite"] = spec.resolve(spec.evaluation.persona.suite)
    if spec.preregistration is not None and spec.preregistration.discordance_from is not None:
        out["preregistration.discordance_from"] = spec.resolve(spec.preregistration.discordance_from)
    return out


def _hashes(paths: dict[str, Path]) -> dict[str, str]:
    missing = [f"{k} ({p})" for k, p in paths.items() if not p.exists()]
    if missing:
        raise UserError(f"cannot lock or verify the pre-registration: missing {', '.join(missing)}")
    return {k: sha256_path(p) for k, p in paths.items()}


def _design(spec: Spec, names) -> dict:
    out = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in out or name not in spec.conditions:
            continue
        cond = spec.conditions[name]
        stages = [{kind: model_shaping(opts) if kind == "fuse" else opts}  # measurement-only options left out
                  for _, kind, opts in condition_stages(spec, name)]
        out[name] = {"from": cond.from_, "stages": stages, "seeds": cond.seeds,
                     "from_kind": "condition" if cond.from_ in spec.conditions else "model"}
        if cond.from_ in spec.conditions:
            todo.append(cond.from_)
    return out


def _named(spec: Spec, crit) -> list[str]:
    """The conditions the criterion, the family and the analysis name."""
    from .criterion import parse_pvalue

    names = {a for s in crit.stats() for a in s.args}
    for text in spec.preregistration.family or []:
        names |= set(parse_pvalue(text).args)
    if spec.analysis is not None:
        names |= {v for v in spec.analysis.model_dump().values() if v is not None}
    return sorted(names)


def prereg_document(spec: Spec, *, data: dict[str, str] | None = None, power: list[dict] | None = None) -> dict | None:
    """The document that is locked (see the module doc); ``data`` (the data
    files' hashes) and ``power`` (:func:`.power.power_table`) as computed by
    :func:`lock`."""
    pr = spec.preregistration
    if pr is None:
        return None
    crit = parse(pr.criterion)
    design = _design(spec, _named(spec, crit))
    if spec.setg is not None:  # Set-G's models are part of the design too
        design.update({k: v for k, v in _design(spec, [spec.setg.base, spec.setg.persona]).items()
                       if k not in design})
    setg = None
    if spec.setg is not None:
        setg = spec.setg.model_dump(exclude={"seed"})
    evaluation = {}
    mc_sets = [mc.model_dump(exclude={"batch_size"} if mc.method == "logprob" else set())
               for mc in spec.evaluation.mc_sets]
    if mc_sets:
        evaluation["mc"] = mc_sets[0] if len(mc_sets) == 1 else mc_sets
    if spec.evaluation.identity is not None:
        evaluation["identity"] = spec.evaluation.identity.model_dump(exclude={"suite"})
    tests = sorted({st.func for st in crit.stats()} | {t.split("(")[0] for t in family_of(pr)})
    return {
        "format": FORMAT,
        "hypothesis": pr.hypothesis,
        "criterion": str(crit),
        "kill": pr.kill,
        "family": family_of(pr),
        "alpha": pr.alpha,
        "power": pr.power,
        "planned_n": pr.planned_n,
        "baseline_accuracy": pr.baseline_accuracy,
        "expected_discordance": pr.expected_discordance,
        "tests": {s: TEST_DESCRIPTIONS[s] for s in tests},
        "thresholds": crit.thresholds(),
        "split": ({**spec.setg.split.model_dump(), "valid_frac": spec.setg.valid_frac, "stratified_by": "category",
                   "seed": SEED_RULE} if spec.setg is not None else None),
        "setg": setg,
        "design": design,
        "analysis": spec.analysis.model_dump() if spec.analysis is not None else None,
        "evaluation": evaluation,
        "data": data,
        "power_before_data": power,
        "allow_underpowered": pr.allow_underpowered,
        "underpowered_reason": pr.underpowered_reason,
    }


@dataclass
class Lock:
    sha256: str
    split_seed: int
    document: dict
    canonical: str
    path: Path
    created: bool  # written by this call
    data_paths: dict[str, str] = field(default_factory=dict)  # where the locked data files were

    @property
    def criterion(self) -> str:
        return self.document["criterion"]


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        path = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict) and prefix.count(".") < 1:
            out += _changed_fields(a, b, path + ".")
        else:
            out.append(path)
    return out


def read_lock(out_dir: Path) -> Lock | None:
    """The lock of ``out_dir`` (None when there is none), refused when its
    record was edited: the canonical text must hash to the recorded SHA-256,
    and the recorded document and split seed must be the ones it gives."""
    path = Path(out_dir) / LOCK_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        canonical, sha = data["canonical"], data["sha256"]
        document = json.loads(canonical)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable pre-registration lock ({err}); it must not be edited") from None
    if not isinstance(canonical, str) or sha256_text(canonical) != sha:
        raise UserError(f"{path}: the locked pre-registration does not match its SHA-256 (was the lock "
                        "edited?); refusing to continue in this directory")
    forged = [k for k, v in (("document", document), ("split_seed", split_seed_of(sha)),
                             ("seed_rule", SEED_RULE)) if data.get(k) != v]
    if forged:
        raise UserError(f"{path}: {', '.join(forged)} no longer match the locked canonical text (was the lock "
                        "edited?); refusing to use this directory")
    return Lock(sha256=sha, split_seed=split_seed_of(sha), document=document, canonical=canonical,
                path=path, created=False, data_paths=dict(data.get("data_paths") or {}))


def verify_data(lock: Lock) -> None:
    """Re-hash the data files the lock names (where they were when it was
    written) and refuse any that changed or is gone."""
    locked = lock.document.get("data") or {}
    paths = lock.data_paths
    gone = [k for k in locked if k not in paths or not Path(paths[k]).exists()]
    if gone:
        raise UserError(f"{lock.path}: cannot verify the locked data: {', '.join(f'{k} ({paths.get(k)})' for k in gone)} "
                        "no longer exists")
    changed = [k for k, sha in locked.items() if sha256_path(Path(paths[k])) != sha]
    if changed:
        raise UserError(f"{lock.path}: the data changed since the pre-registration was locked: "
                        + ", ".join(f"{k} ({paths[k]})" for k in changed)
                        + "; a verdict rests on the locked data: restore it, or start over in a new directory")


def _underpowered_error(rows: list[dict]) -> UserError:
    return UserError("the pre-registered criterion is under-powered before any data: " + "; ".join(r["text"] for r in rows)
                     + ". Plan more items (pyfuse experiment validate prints the table), or lock it anyway with "
                     "allow_underpowered: true and underpowered_reason: TEXT under preregistration")


def check_power(spec: Spec) -> list[dict]:
    """The power table (:mod:`.power`), or a UserError when a threshold is
    under-powered and the spec does not allow it."""
    table = power_table(spec)
    weak = underpowered(table)
    if weak and not spec.preregistration.allow_underpowered:
        raise _underpowered_error(weak)
    return table


def lock(spec: Spec, out_dir: Path, *, has_finished_steps: bool) -> Lock | None:
    """Lock the spec's pre-registration in ``out_dir`` (or check it against
    the existing lock). Returns None when the spec has no pre-registration
    (and refuses a spec without one in a directory that has a lock)."""
    out_dir = Path(out_dir)
    existing = read_lock(out_dir)
    if spec.preregistration is None:
        if existing is not None:
            raise UserError(f"{existing.path} locks a pre-registration (sha256 {existing.sha256[:12]}), but "
                            "the spec has none; restore its preregistration section or use a new --out "
                            "directory")
        return None
    paths = data_paths(spec)
    document = prereg_document(spec, data=_hashes(paths), power=power_table(spec))
    canonical = canonical_json(document)
    sha = sha256_text(canonical)
    if existing is not None:
        if existing.sha256 != sha:
            changed = _changed_fields(existing.document, document)
            raise UserError(
                f"{existing.path} locks a different pre-registration (sha256 {existing.sha256[:12]}, this "
                f"spec {sha[:12]}); changed: {', '.join(changed) or 'formatting'}. A locked "
                "pre-registration cannot change (its data neither): restore the locked criteria and data or "
                "start over in a new --out directory")
        return existing
    if has_finished_steps:
        raise UserError(f"{out_dir} already holds finished steps but no pre-registration lock: a "
                        "pre-registration must be locked before any training; use a new --out directory")
    weak = underpowered(document["power_before_data"])
    if weak and not spec.preregistration.allow_underpowered:
        raise _underpowered_error(weak)
    path = out_dir / LOCK_FILE
    record = {
        "sha256": sha,
        "split_seed": split_seed_of(sha),
        "seed_rule": SEED_RULE,
        "canonical": canonical,
        "document": document,
        "locked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "spec": str(spec._path) if spec._path is not None else None,
        "data_paths": {k: str(p) for k, p in paths.items()},
    }
    atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return Lock(sha256=sha, split_seed=split_seed_of(sha), document=document, canonical=canonical,
                path=path, created=True, data_paths=record["data_paths"])
