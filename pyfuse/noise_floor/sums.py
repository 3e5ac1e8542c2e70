"""Per-tensor figures of the noise floor and their sums over the tensors of a row.

:func:`pyfuse.kernel.fidelity.tensor_fidelity` computes every figure of one
tensor (natively, in one float64-exact pass, when the extension is loaded).
Additions here: a tensor bit-identical to its baseline is recognised from
the packed arrays (much cheaper than a full pass), ||W||^2, needed to
aggregate ``rel_error`` over tensors, is recovered from ||change|| /
rel_error or, for a tensor no fuse changed, computed once; and the sums
that make one row's figures (retention and noise through the one formula,
:func:`pyfuse.kernel.fidelity.retention_and_noise`).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..kernel.fidelity import Fidelity, dequantize_exact, retention_and_noise

__all__ = ["AdapterSums", "Sums", "WeightNorms", "identical", "zero_factors", "zero_fidelity"]

_CHUNK_ELEMENTS = 1 << 22


def identical(old, new) -> bool:
    """Whether two (w, scales, biases) triples are bit-identical."""
    return all(x.shape == y.shape and x.dtype == y.dtype and mx.array_equal(x, y).item()
               for x, y in zip(old, new))


def zero_fidelity(w, group_size: int, bits: int) -> Fidelity:
    """The figures of a tensor that did not change."""
    in_dims = w.shape[-1] * 32 // bits
    groups = math.prod(w.shape[:-1]) * (in_dims // group_size)
    return Fidelity(delta_norm=0.0, change_norm=0.0, retention=None, noise=None, weights_changed=0.0,
                    codes_changed=0.0, groups_refit=0, groups=groups, rel_error=0.0, max_abs=0.0)


def zero_factors(base, in_dims: int):
    """LoRA factors (kernel layout) of a zero delta for a (w, scales, biases) triple."""
    lead = base[0].shape[:-2]
    out = base[0].shape[-2]
    return mx.zeros((*lead, 1, in_dims), mx.float32), mx.zeros((*lead, out, 1), mx.float32)


def _weight_sq_norm(base, group_size: int, bits: int) -> float:
    """||W||^2 of the dequantized weight (float32 values, float64 total)."""
    w, s, b = base
    rows = math.prod(w.shape[:-1])
    in_dims = w.shape[-1] * 32 // bits
    w, s, b = (x.reshape(rows, x.shape[-1]) for x in (w, s, b))
    step = max(1, _CHUNK_ELEMENTS // in_dims)
    total = 0.0
    for i in range(0, rows, step):
        x = dequantize_exact(w[i:i + step], s[i:i + step], b[i:i + step], group_size, bits)
        total += float(np.asarray((x * x).sum(axis=-1), dtype=np.float64).sum())
    return total


class WeightNorms:
    """||W||^2 per module of one baseline: learnt from a fuse's figures when
    it changed something, computed otherwise (and only when asked)."""

    def __init__(self, qmods):
        self._qmods = {q.path: q for q in qmods}
        self._known: dict[str, float] = {}

    def learn(self, path: str, fid: Fidelity) -> None:
        if fid.change_norm > 0 and fid.rel_error > 0 and path not in self._known:
            self._known[path] = (fid.change_norm / fid.rel_error) ** 2

    def __call__(self, path: str) -> float:
        if path not in self._known:
            q = self._qmods[path]
            self._known[path] = _weight_sq_norm(q.base, q.group_size, q.bits)
        return self._known[path]


class Sums:
    """Weight-level sums of one round over the tensors of a row."""

    def __init__(self):
        self.n = self.wchg = self.cchg = self.refit = self.groups = 0
        self.cc = self.max_abs = 0.0
        self.modules: list[str] = []

    def add(self, path: str, fid: Fidelity, n: int) -> None:
        self.modules.append(path)
        self.n += n
        self.wchg += round(fid.weights_changed * n)
        self.cchg += round(fid.codes_changed * n)
        self.refit += fid.groups_refit
        self.groups += fid.groups
        self.cc += fid.change_norm ** 2
        self.max_abs = max(self.max_abs, fid.max_abs)

    def figures(self, sq_norm) -> dict:
        """``sq_norm(path)`` gives ||W||^2 of a module (asked only when something changed)."""
        rel = 0.0
        if self.cc > 0:
            rel = math.sqrt(self.cc) / math.sqrt(sum(sq_norm(p) for p in self.modules))
        return {"weights_changed": self.wchg / self.n if self.n else None,
                "codes_changed": self.cchg / self.n if self.n else None,
                "rel_error": rel, "max_abs": self.max_abs, "groups_refit": self.refit}


class AdapterSums:
    """<c, d>, ||d||^2 and ||c||^2 summed over the adapted tensors, so that
    retention and noise are those of the whole adapter (one retention for
    all tensors: noise = ||c - R d|| / ||d|| with the global R, not the sum
    of per-tensor residuals)."""

    def __init__(self):
        self.dd = self.cd = self.cc = 0.0
        self.modules = 0

    def add(self, fid: Fidelity) -> None:
        dd = fid.delta_norm ** 2
        self.dd += dd
        self.cc += fid.change_norm ** 2
        self.modules += 1
        if fid.retention is not None:
            self.cd += fid.retention * dd

    def figures(self) -> dict:
        retention, noise = retention_and_noise(self.dd, self.cd, self.cc)
        return {"retention": retention, "noise": noise}
