"""What a finished step wrote, recorded and checked: ``done.json`` lists the
size and SHA-256 of every output file of the step (:func:`record_outputs`,
when it is published), and a resumed run checks them before it reuses the
step (:func:`check_outputs`): files up to 64 MB by SHA-256, larger ones
(model shards) by size, so that a resume stays fast. The fused model of a
pruned step is gone on purpose and not checked."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError
from .layout import DONE, MODEL, PRUNED

HASH_LIMIT = 64 << 20  # files up to this size are checked (and fingerprinted, :mod:`.plan`) by content
_NOT_OUTPUTS = {DONE, PRUNED}


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_outputs(step_dir: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file the step wrote."""
    out = {}
    for p in sorted(Path(step_dir).rglob("*")):
        rel = p.relative_to(step_dir).as_posix()
        if p.is_file() and rel not in _NOT_OUTPUTS:
            out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def check_outputs(step_dir: Path, label: str = "") -> None:
    """Refuse a finished step whose outputs differ from its record."""
    step_dir = Path(step_dir)
    what = f"step {step_dir.name}" + (f" ({label})" if label else "")
    try:
        recorded = json.loads((step_dir / DONE).read_text(encoding="utf-8"))["outputs"]
        assert isinstance(recorded, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{what}: its {DONE} has no readable record of its outputs; remove {step_dir} to "
                        "run the step again") from None
    pruned = (step_dir / PRUNED).exists()
    for rel, rec in recorded.items():
        if pruned and rel.split("/", 1)[0] == MODEL:
            continue
        p = step_dir / rel
        problem = None
        if not p.is_file():
            problem = "is missing"
        elif p.stat().st_size != rec.get("size"):
            problem = "changed size"
        elif rec["size"] <= HASH_LIMIT and sha256_file(p) != rec.get("sha256"):
            problem = "changed (SHA-256 differs)"
        if problem:
            raise UserError(f"{what}: its output {rel} {problem} since the step finished; a resumed run does not "
                            f"reuse edited results: remove {step_dir} to run the step again")
