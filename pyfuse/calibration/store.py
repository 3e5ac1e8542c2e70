"""Collected ``X^T X`` sums (:func:`pyfuse.calibration.collect_hessians`) on
disk, so several fuses of the same model over the same data share one
calibration pass (the experiment's ``calibrate`` step): the arrays in
``hessians.safetensors`` (``PATH.fit``, ``PATH.held_out``; float32, read
back bit for bit), the token counts and fallback experts in
``hessians.json``. The caller writes into a directory it publishes
atomically (the experiment runner's step directory)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from .collect import ModuleHessian

ARRAYS = "hessians.safetensors"
META = "hessians.json"


def save_hessians(hessians: dict[str, ModuleHessian], out: Path) -> None:
    """Write ``hessians`` into the directory ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays, meta = {}, {}
    for path, mh in hessians.items():
        arrays[f"{path}.fit"] = mh.fit
        if mh.held_out is not None:
            arrays[f"{path}.held_out"] = mh.held_out
        meta[path] = {"tokens": mh.tokens, "held_out_tokens": mh.held_out_tokens, "fallback": mh.fallback,
                      "held_out": mh.held_out is not None}
    mx.save_safetensors(str(out / ARRAYS), arrays)
    (out / META).write_text(json.dumps({"modules": meta}, indent=2) + "\n", encoding="utf-8")


def load_hessians(directory: Path) -> dict[str, ModuleHessian]:
    """What :func:`save_hessians` wrote into ``directory``."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))["modules"]
        arrays = mx.load(str(directory / ARRAYS))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"cannot read the collected calibration sums in {directory}: {err}") from None
    return {path: ModuleHessian(path=path, fit=arrays[f"{path}.fit"],
                                held_out=arrays[f"{path}.held_out"] if m["held_out"] else None,
                                tokens=list(m["tokens"]), held_out_tokens=list(m["held_out_tokens"]),
                                fallback=list(m["fallback"]))
            for path, m in meta.items()}
