"""How two adapters' deltas relate, module by module: the principal angles
between their column spaces (the output directions each delta writes),
between their row spaces (the input directions it reads), their norms and
the cosine of the two deltas as vectors.

Everything is computed from the low-rank factors, never from a dense delta
(an expert tensor's delta is ``E x out x in``): with the kernel layout
``delta = scale * b @ a`` (``b [out, r]``, ``a [r, in]``), QR of ``b`` and of
``a^T`` gives ``delta = Qb (scale * Rb Ra^T) Qa^T``; the SVD of the small
``r x r`` core ``U S V^T`` gives the delta's own singular values ``S`` (its
norm, its numerical rank) and orthonormal bases ``Qb U`` (columns) and
``Qa V`` (rows) of exactly its rank, so a rank-deficient or zero delta is
not credited with directions it does not use. The principal angles between
two orthonormal bases ``U1``, ``U2`` are the arccosines of the singular
values of ``U1^T U2`` (Björck & Golub); ``overlap`` is the mean of their
squared cosines: 1 for the same subspace, 0 for orthogonal ones (for
subspaces of different dimensions, the smaller one inside the larger gives
1); ``chance`` is what two random subspaces of the same ranks give on
average, ``max(k1, k2) / out`` (a rank-8 delta of an 8-expert router spans
every direction: its overlap is 1 whatever it learned). A SwitchLinear (MoE experts) is compared expert by expert and
summarized (mean, min, max over the experts where both deltas are non-zero).

DoRA magnitudes are left out: the comparison is of the low-rank directions.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import progress
from ..errors import UserError
from ..fuse.mapping import is_embedding_name, kernel_factors
from ..io.adapter_dir import Adapter, AdapterModule, read_adapter
from ..io.names import layer_index, natural_key

# A singular value of the delta counts towards its rank above this share of
# the largest one (float32 factors: smaller values are rounding noise).
RANK_RTOL = 1e-5


@dataclass
class LowRank:
    """One (expert's) delta as ``U diag(s) V^T``, rank = ``len(s)``."""

    u: np.ndarray  # [out, k] orthonormal columns
    s: np.ndarray  # [k] singular values, descending, > 0
    v: np.ndarray  # [in, k] orthonormal columns

    @property
    def norm(self) -> float:
        return float(np.sqrt(np.sum(self.s ** 2)))


def low_rank(a: np.ndarray, b: np.ndarray, scale: float) -> LowRank:
    """The thin SVD of ``scale * b @ a`` from its factors (``a [r, in]``, ``b [out, r]``)."""
    qb, rb = np.linalg.qr(np.asarray(b, dtype=np.float64))
    qa, ra = np.linalg.qr(np.asarray(a, dtype=np.float64).T)
    u, s, vt = np.linalg.svd(scale * rb @ ra.T)
    keep = s > (s[0] * RANK_RTOL if s.size and s[0] > 0 else np.inf)
    return LowRank(qb @ u[:, keep], s[keep], qa @ vt[keep].T)


def principal_angles(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spans of two
    matrices with orthonormal columns: ``min(k1, k2)`` of them."""
    if u1.shape[1] == 0 or u2.shape[1] == 0:
        return np.zeros(0)
    cos = np.linalg.svd(u1.T @ u2, compute_uv=False)
    return np.arccos(np.clip(cos, 0.0, 1.0))


def overlap(angles: np.ndarray) -> float | None:
    """Mean squared cosine of the principal angles (None without any)."""
    return float(np.mean(np.cos(angles) ** 2)) if angles.size else None


def delta_inner(x: LowRank, y: LowRank) -> float:
    """``<delta_x, delta_y>`` (Frobenius) from the factors."""
    return float(np.sum((x.u.T @ y.u) * np.outer(x.s, y.s) * (x.v.T @ y.v)))


@dataclass
class PairStats:
    """The comparison of two (expert) deltas."""

    rank_a: int
    rank_b: int
    norm_a: float
    norm_b: float
    angles: list[float]  # degrees, ascending (column spaces)
    overlap: float | None  # column spaces
    input_overlap: float | None  # row spaces
    cosine: float | None  # of the deltas as vectors
    chance: float | None = None  # the expected overlap of random subspaces of these ranks


def chance_overlap(k1: int, k2: int, dim: int) -> float | None:
    """The mean overlap of a uniformly random ``k1``- and ``k2``-dimensional
    subspace of R^dim: ``E trace(P1 P2) = k1 k2 / dim`` over ``min(k1, k2)``
    angles, i.e. ``max(k1, k2) / dim`` (1 when a rank reaches ``dim``, as for
    a router of few experts: there every subspace overlaps)."""
    if not k1 or not k2:
        return None
    return min(1.0, max(k1, k2) / dim)


def compare_pair(x: LowRank, y: LowRank) -> PairStats:
    col = principal_angles(x.u, y.u)
    row = principal_angles(x.v, y.v)
    denom = x.norm * y.norm
    return PairStats(rank_a=int(x.s.size), rank_b=int(y.s.size), norm_a=x.norm, norm_b=y.norm,
                     angles=[float(d) for d in np.degrees(col)], overlap=overlap(col),
                     input_overlap=overlap(row), cosine=delta_inner(x, y) / denom if denom > 0 else None,
                     chance=chance_overlap(x.s.size, y.s.size, x.u.shape[0]))


@dataclass
class ModuleComparison:
    """One module both adapters touch. For a SwitchLinear, ``overlap`` /
    ``input_overlap`` / ``cosine`` are means over the experts where both
    deltas are non-zero (``experts_compared``), the norms are over all
    experts, and ``per_expert`` holds each expert's comparison."""

    path: str
    kind: str  # linear | switch | embedding
    layer: int | None
    norm_a: float
    norm_b: float
    overlap: float | None
    input_overlap: float | None
    cosine: float | None
    chance: float | None = None  # what random subspaces of the same ranks give (:func:`chance_overlap`)
    angles: list[float] | None = None  # degrees (not for a SwitchLinear: see per_expert)
    experts: int | None = None
    experts_compared: int | None = None
    overlap_min: float | None = None
    overlap_max: float | None = None
    per_expert: list[dict] | None = None


@dataclass
class AdapterComparison:
    a: str
    b: str
    modules: list[ModuleComparison] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    @property
    def overlap(self) -> float | None:
        """Mean overlap over the shared modules where it is defined."""
        vals = [m.overlap for m in self.modules if m.overlap is not None]
        return float(np.mean(vals)) if vals else None

    @property
    def max_overlap(self) -> ModuleComparison | None:
        defined = [m for m in self.modules if m.overlap is not None]
        return max(defined, key=lambda m: m.overlap) if defined else None

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "overlap": self.overlap, "shared": len(self.modules),
                "only_a": self.only_a, "only_b": self.only_b,
                "modules": [asdict(m) for m in self.modules]}


def _kind(mod: AdapterModule) -> str:
    if mod.lora_a.ndim == 3:
        return "switch"
    return "embedding" if is_embedding_name(mod.path) else "linear"


def kernel_factors_np(mod: AdapterModule) -> tuple[str, np.ndarray, np.ndarray]:
    """``(kind, a, b)`` in the kernel layout, as float32 NumPy arrays."""
    kind = _kind(mod)
    a, b = kernel_factors(mod, kind)
    return kind, np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))


def _compare_module(path: str, ad_a: Adapter, ad_b: Adapter) -> ModuleComparison:
    kind_a, a1, b1 = kernel_factors_np(ad_a.modules[path])
    kind_b, a2, b2 = kernel_factors_np(ad_b.modules[path])
    if kind_a != kind_b or a1.shape[:-2] != a2.shape[:-2] or a1.shape[-1] != a2.shape[-1] \
            or b1.shape[-2] != b2.shape[-2]:
        raise UserError(f"{path}: the two adapters' shapes differ (lora_a {list(a1.shape)} vs {list(a2.shape)}, "
                        f"lora_b {list(b1.shape)} vs {list(b2.shape)}): are they for the same model?")
    hit = layer_index(path)
    layer = hit[1] if hit else None
    if kind_a != "switch":
        st = compare_pair(low_rank(a1, b1, ad_a.scale), low_rank(a2, b2, ad_b.scale))
        return ModuleComparison(path, kind_a, layer, st.norm_a, st.norm_b, st.overlap, st.input_overlap,
                                st.cosine, chance=st.chance, angles=st.angles)
    per = [compare_pair(low_rank(a1[e], b1[e], ad_a.scale), low_rank(a2[e], b2[e], ad_b.scale))
           for e in range(a1.shape[0])]
    both = [p for p in per if p.overlap is not None]

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    return ModuleComparison(
        path, kind_a, layer,
        norm_a=float(np.sqrt(sum(p.norm_a ** 2 for p in per))),
        norm_b=float(np.sqrt(sum(p.norm_b ** 2 for p in per))),
        overlap=mean([p.overlap for p in both]), input_overlap=mean([p.input_overlap for p in both]),
        cosine=mean([p.cosine for p in both]), chance=mean([p.chance for p in both]),
        experts=len(per), experts_compared=len(both),
        overlap_min=min((p.overlap for p in both), default=None),
        overlap_max=max((p.overlap for p in both), default=None),
        per_expert=[asdict(p) for p in per])


def compare_adapters(a: str | Path | Adapter, b: str | Path | Adapter, *,
                     modules: str | None = None) -> AdapterComparison:
    """Compare two mlx-lm adapter directories module by module (``modules``:
    a regular expression the module paths must match)."""
    ad_a = a if isinstance(a, Adapter) else read_adapter(a)
    ad_b = b if isinstance(b, Adapter) else read_adapter(b)
    try:
        only_re = re.compile(modules) if modules is not None else None
    except re.error as err:
        raise UserError(f"modules: not a valid regular expression ({err})") from None

    def touched(ad: Adapter) -> set[str]:
        return {p for p, m in ad.modules.items() if m.has_delta and (only_re is None or only_re.search(p))}

    ta, tb = touched(ad_a), touched(ad_b)
    out = AdapterComparison(str(ad_a.path), str(ad_b.path), only_a=sorted(ta - tb, key=natural_key),
                            only_b=sorted(tb - ta, key=natural_key))
    
    for path in progress.track(sorted(ta & tb, key=natural_key), "compare modules"):
        out.modules.append(_compare_module(path, ad_a, ad_b))
    return out
