"""Pre-registration: lock the criterion before any training, derive the split
seed from it, and judge the results by exactly what was locked.

:func:`prereg_document` turns the spec's ``preregistration`` into a plain
object: the hypothesis, the criterion (normalised), the kill text, alpha,
power, planned n, baseline accuracy, the tests the criterion uses and its
thresholds, the Set-G split rule (train fraction, stratification, the seed
rule) and the **design**: every stage (resolved options) of the conditions
the criterion names and of the conditions they start from, the Set-G
mining and the evaluation. It is written as canonical JSON (sorted keys, no
spaces, UTF-8) and hashed with SHA-256; the split seed is
``int(sha256[:8], 16)``.

:func:`lock` writes ``DIR/prereg.json`` the first time (atomically, before
any step runs) and afterwards refuses a spec whose document differs,
naming the fields that changed. A directory that already holds finished
steps but no lock is refused too: a pre-registration must come before the
training, not after.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..io.files import atomic_write_text
from .criterion import TEST_DESCRIPTIONS, parse
from .layout import LOCK_FILE
from .spec import Spec, condition_stages

FORMAT = "pyfuse-prereg/1"
SEED_RULE = "int(sha256[:8], 16)"


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_seed_of(sha: str) -> int:
    return int(sha[:8], 16)


def _design(spec: Spec, names) -> dict:
    out = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in out or name not in spec.conditions:
            continue
        cond = spec.conditions[name]
        stages = []
        for _, kind, opts in condition_stages(spec, name):
            stages.append({kind: opts})
        out[name] = {"from": cond.from_, "stages": stages,
                     "from_kind": "condition" if cond.from_ in spec.conditions else "model"}
        if cond.from_ in spec.conditions:
            todo.append(cond.from_)
    return out


def prereg_document(spec: Spec) -> dict | None:
    pr = spec.preregistration
    if pr is None:
        return None
    crit = parse(pr.criterion)
    names = sorted({a for s in crit.stats() for a in s.args})
    design = _design(spec, names)
    if spec.setg is not None:  # Set-G's models are part of the design too
        design.update({k: v for k, v in _design(spec, [spec.setg.base, spec.setg.persona]).items()
                       if k not in design})
    setg = None
    if spec.setg is not None:
        setg = spec.setg.model_dump(exclude={"seed"})
    evaluation = {}
    if spec.evaluation.mc is not None:
        evaluation["mc"] = spec.evaluation.mc.model_dump(exclude={"batch_size"}
                                                         if spec.evaluation.mc.method == "logprob" else set())
    if spec.evaluation.identity is not None:
        ident = spec.evaluation.identity.model_dump(exclude={"suite"})
        evaluation["identity"] = ident
    return {
        "format": FORMAT,
        "hypothesis": pr.hypothesis,
        "criterion": str(crit),
        "kill": pr.kill,
        "alpha": pr.alpha,
        "power": pr.power,
        "planned_n": pr.planned_n,
        "baseline_accuracy": pr.baseline_accuracy,
        "tests": {s: TEST_DESCRIPTIONS[s] for s in sorted({st.func for st in crit.stats()})},
        "thresholds": crit.thresholds(),
        "split": ({"train_frac": spec.setg.train_frac, "stratified_by": "category", "seed": SEED_RULE}
                  if spec.setg is not None else None),
        "setg": setg,
        "design": design,
        "evaluation": evaluation,
    }


@dataclass
class Lock:
    sha256: str
    split_seed: int
    document: dict
    canonical: str
    path: Path
    created: bool  # written by this call

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
    path = Path(out_dir) / LOCK_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        canonical = data["canonical"]
        sha = data["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable pre-registration lock ({err}); it must not be edited") from None
    if sha256_text(canonical) != sha:
        raise UserError(f"{path}: the locked pre-registration does not match its SHA-256 (was the lock "
                        "edited?); refusing to continue in this directory")
    document = json.loads(canonical)
    return Lock(sha256=sha, split_seed=split_seed_of(sha), document=document, canonical=canonical,
                path=path, created=False)


def lock(spec: Spec, out_dir: Path, *, has_finished_steps: bool) -> Lock | None:
    """Lock the spec's pre-registration in ``out_dir`` (or check it against
    the existing lock). Returns None when the spec has no pre-registration
    (and refuses a spec without one in a directory that has a lock)."""
    out_dir = Path(out_dir)
    document = prereg_document(spec)
    existing = read_lock(out_dir)
    if document is None:
        if existing is not None:
            raise UserError(f"{existing.path} locks a pre-registration (sha256 {existing.sha256[:12]}), but "
                            "the spec has none; restore its preregistration section or use a new --out "
                            "directory")
        return None
    canonical = canonical_json(document)
    sha = sha256_text(canonical)
    if existing is not None:
        if existing.sha256 != sha:
            changed = _changed_fields(existing.document, document)
            raise UserError(
                f"{existing.path} locks a different pre-registration (sha256 {existing.sha256[:12]}, this "
                f"spec {sha[:12]}); changed: {', '.join(changed) or 'formatting'}. A locked "
                "pre-registration cannot change: restore the locked criteria or start over in a new "
                "--out directory")
        return existing
    if has_finished_steps:
        raise UserError(f"{out_dir} already holds finished steps but no pre-registration lock: a "
                        "pre-registration must be locked before any training; use a new --out directory")
    path = out_dir / LOCK_FILE
    record = {
        "sha256": sha,
        "split_seed": split_seed_of(sha),
        "seed_rule": SEED_RULE,
        "canonical": canonical,
        "document": document,
        "locked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "spec": str(spec._path) if spec._path is not None else None,
    }
    atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return Lock(sha256=sha, split_seed=split_seed_of(sha), document=document, canonical=canonical,
                path=path, created=True)


# ---------------------------------------------------------------------------
# Power
# ---------------------------------------------------------------------------


def power_warnings(document: dict, *, observed_n: dict | None = None,
                   observed_acc: dict | None = None) -> list[dict]:
    """For every locked threshold ``diff(A, B) >= T`` (or ``>``) with T > 0:
    the minimum detectable effect at the planned n (else the observed n of
    A) from the baseline accuracy (else B's observed accuracy), at the
    locked alpha and power. Returns one record per threshold, ``warn`` true
    when the design is under-powered (MDE > T)."""
    from ..stats import min_detectable_effect

    out = []
    for th in document.get("thresholds", []):
        stat, op = th["statistic"], th["op"]
        if not stat.startswith("diff(") or op not in (">=", ">"):
            continue
        threshold = float(_num_value(th["value"]))
        if threshold <= 0:
            continue
        a, b = [x.strip() for x in stat[len("diff("):-1].split(",")]
        n = document.get("planned_n") or (observed_n or {}).get(a)
        n_source = "planned" if document.get("planned_n") else "observed"
        p0 = document.get("baseline_accuracy")
        p0_source = "pre-registered baseline"
        if p0 is None and observed_acc and b in observed_acc:
            p0, p0_source = observed_acc[b], f"observed accuracy of {b}"
        if n is None or p0 is None or not 0 < p0 < 1 or n < 2:
            out.append({"statistic": stat, "threshold": threshold, "mde": None, "warn": False,
                        "text": f"power of {stat} {op} {th['value']} not computed (needs planned_n and "
                                "baseline_accuracy, or results)"})
            continue
        mde = min_detectable_effect(n, p0, alpha=document["alpha"], power=document["power"])
        warn = math.isnan(mde) or mde > threshold
        text = (f"at n = {n} ({n_source}) per condition, alpha {document['alpha']:g}, power "
                f"{document['power']:g}, from {p0 * 100:.1f} % ({p0_source}) the minimum detectable effect is "
                + ("more than the room above the baseline" if math.isnan(mde) else f"{mde * 100:.1f} points")
                + (f": the {threshold * 100:g}-point threshold of {stat} is under-powered" if warn else
                   f", within the {threshold * 100:g}-point threshold of {stat}"))
        out.append({"statistic": stat, "threshold": threshold, "mde": None if math.isnan(mde) else mde,
                    "n": n, "baseline": p0, "warn": warn, "text": text})
    return out


def _num_value(text: str):
    from fractions import Fraction

    if text.endswith("pp"):
        return Fraction(text[:-2]) / 100
    return Fraction(text)
