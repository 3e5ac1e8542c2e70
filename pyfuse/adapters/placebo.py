"""Placebo adapters: the size of a trained adapter's change without its content.

:func:`placebo_adapter` writes, for a trained LoRA adapter, an adapter of
the same structure (config byte for byte, tensor names, shapes, dtypes and
order) whose delta in each module (each expert of a SwitchLinear) has the
trained delta's singular values on random orthonormal directions:

    trained:  delta = scale * b @ a = U diag(s) V^T        (rank r)
    placebo:  delta' = Q_out diag(s) Q_in^T

with ``Q_out`` ``[out, r]`` and ``Q_in`` ``[in, r]`` drawn uniformly (Haar)
from the orthonormal frames: the QR decomposition of a Gaussian matrix with
the signs of R's diagonal moved into Q. So ``||delta'|| = ||delta||``, the
spectrum is the same and every direction is random: a fuse of the placebo
perturbs the model by as much as the real adapter does, with nothing
learned in it. Several seeds give a null distribution for the trained
adapter's effect. The generator of a module is seeded with ``(seed,
crc32(module path))``, so a module's placebo does not depend on the others.

The singular values come from the factors' QR decompositions (the SVD of
an ``r x r`` matrix), not from the full delta. The placebo's factors are
``b' = Q_out diag(s / scale)``, ``a' = Q_in^T`` in the kernel layout
(:mod:`pyfuse.fuse.mapping`), stored in mlx-lm's layout of each module
(Linear, SwitchLinear, Embedding). DoRA adapters are refused: a learned
magnitude is content with no placebo.

Next to the adapter files, ``placebo_adapter.json`` records the parent,
the seed and the singular values of every module.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..fuse.mapping import is_embedding_name
from ..io.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterModule, read_adapter
from ..io.outputs import staged_dir
from ..io.safetensors import SafetensorsFile, SafetensorsWriter

PROVENANCE = "placebo_adapter.json"

__all__ = ["PlaceboResult", "placebo_adapter", "kernel_factors", "random_frame"]


@dataclass
class PlaceboResult:
    out: Path
    seed: int
    singular_values: dict[str, list] = field(default_factory=dict)  # module -> [s] (or [[s] per expert])


def kernel_factors(mod: AdapterModule) -> tuple[np.ndarray, np.ndarray, str]:
    """``(a [..., r, in], b [..., out, r], layout)`` of a module in float64,
    the kernel's layout (``delta = scale * b @ a``; see pyfuse.fuse.mapping)."""
    la = np.asarray(mod.lora_a.astype(mx.float32), dtype=np.float64)
    lb = np.asarray(mod.lora_b.astype(mx.float32), dtype=np.float64)
    if la.ndim == 3:
        return la, lb, "switch"
    if is_embedding_name(mod.path):
        return lb, la, "embedding"
    return la.T, lb.T, "linear"


def _stored(a: np.ndarray, b: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Kernel-layout factors back to mlx-lm's ``(lora_a, lora_b)``."""
    if layout == "switch":
        return a, b
    if layout == "embedding":
        return b, a
    return a.T, b.T


def random_frame(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A Haar-uniform ``rows x cols`` matrix with orthonormal columns."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _placebo_factors(a: np.ndarray, b: np.ndarray, scale: float, rng: np.random.Generator):
    """One matrix's placebo ``(a', b', s)``: ``scale * b' @ a'`` has the
    singular values ``s`` of ``scale * b @ a`` on random directions."""
    rank = a.shape[0]
    qb, rb = np.linalg.qr(b)  # b = qb rb, a^T = qa ra  ->  b a = qb (rb ra^T) qa^T
    qa, ra = np.linalg.qr(a.T)
    s = np.linalg.svd(scale * rb @ ra.T, compute_uv=False)
    k = min(rank, b.shape[0], a.shape[1])
    s_full = np.zeros(rank)
    s_full[:s.size] = s
    b_new = np.zeros_like(b)
    a_new = np.zeros_like(a)
    b_new[:, :k] = random_frame(rng, b.shape[0], k) * (s_full[:k] / scale)
    a_new[:k, :] = random_frame(rng, a.shape[1], k).T
    return a_new, b_new, s_full[:k]


def placebo_adapter(adapter_path: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0,
                    force: bool = False) -> PlaceboResult:
    """Write the placebo of the LoRA adapter ``adapter_path`` to ``out`` (see
    the module doc). UserError on a DoRA adapter, an unreadable adapter or
    ``out`` existing without ``force``."""
    src, final = Path(adapter_path), Path(out)
    adapter = read_adapter(src)
    if adapter.is_dora:
        raise UserError(f"{src} is a DoRA adapter: placebo adapters are defined for LoRA (a learned "
                        "magnitude is content with no placebo)")
    if final.resolve() == src.resolve():
        raise UserError(f"--out {final} is the adapter itself; choose another directory")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if (final.exists() or final.is_symlink()) and not force:
        raise UserError(f"{final} exists (pass force=True to replace it)")
    result = PlaceboResult(out=final, seed=seed)
    new: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path, mod in adapter.modules.items():
        if not mod.has_delta:
            continue
        a, b, layout = kernel_factors(mod)
        rng = np.random.default_rng([seed, zlib.crc32(path.encode("utf-8"))])
        if layout == "switch":
            parts = [_placebo_factors(a[e], b[e], adapter.scale, rng) for e in range(a.shape[0])]
            a2, b2 = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
            result.singular_values[path] = [p[2].tolist() for p in parts]
        else:
            a2, b2, s = _placebo_factors(a, b, adapter.scale, rng)
            result.singular_values[path] = s.tolist()
        new[path] = _stored(a2, b2, layout)
    with staged_dir(final, force=True) as tmp:  # --force was checked before any work
        shutil.copyfile(src / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
        with SafetensorsFile(src / ADAPTER_WEIGHTS) as f:
            entries = [(t.name, t.dtype, t.shape) for t in f.tensors.values()]
            with SafetensorsWriter(tmp / ADAPTER_WEIGHTS, entries, metadata=f.metadata) as w:
                for name in f.tensors:
                    module, _, leaf = name.rpartition(".")
                    if module in new and leaf in ("lora_a", "lora_b"):
                        arr = new[module][0 if leaf == "lora_a" else 1]
                        dtype = getattr(adapter.modules[module], leaf).dtype
                        w.write(name, mx.array(arr.astype(np.float32)).astype(dtype))
                    else:
                        w.copy_from(f, name)
        (tmp / PROVENANCE).write_text(json.dumps({
            "placebo_of": str(src.resolve()), "seed": seed,
            "construction": "per module (per expert): the trained delta's singular values on Haar-random "
                            "orthonormal directions",
            "singular_values": result.singular_values}, indent=1) + "\n")
    return result
