"""Does this machine's build fuse the bytes it should? Every kernel path
available here against its oracle, over a grid of small cases (every bits x
group size x dtype x policy, zero / tiny / normal / large deltas, odd
shapes), each comparison bit for bit:

* ``cpu:<build>``: the native CPU kernel (each instruction-set build this
  processor runs) against the pure-MLX reference on the CPU
  (:func:`pyfuse.kernel.reference.fuse_requant_reference`);
* ``metal-source``: the Metal kernel source, compiled into the extension as
  C++ and run over a simulated grid, against the CPU kernel under MLX's
  Metal quantizer rules (every build has it);
* ``metal-gpu`` (a Mac whose MLX has Metal): the real Metal kernel on the
  GPU against the pure-MLX reference on the GPU for ``stock`` (MLX's Metal
  quantizer) and on the CPU for ``preserve`` / ``stochastic`` (pyfuse's own
  policies, the same on every backend).

DoRA cases (a magnitude per row) are compared where the oracle computes the
row norm the kernel's way (``metal-source``); MLX's own norm sums in another
order, so the reference can differ in a last bit there (see
tests/unit/test_kernel.py). The same case grid feeds the standalone C++
harness of the kernel math (tests/native)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..options import POLICIES, SUPPORTED_BITS, SUPPORTED_DTYPES, SUPPORTED_GROUP_SIZES
from . import native as _native
from .reference import fuse_requant_reference

# The size of the delta relative to the weights (std 0.02): none at all (the
# policies' exactness), below half a code step (most codes unchanged),
# typical, and large enough to push groups off their grid (re-fits).
DELTA_STD = {"zero": 0.0, "tiny": 1e-5, "normal": 0.01, "large": 0.08}
# (leading dims, out, in groups, rank): a Linear and SwitchLinears with odd
# expert and row counts and ranks, rows of 1 to 5 groups.
SHAPES = (((), 7, 3, 1), ((3,), 5, 1, 2), ((2,), 9, 5, 7))


@dataclass(frozen=True)
class Case:
    bits: int
    group_size: int
    dtype: str
    policy: str
    delta: str
    lead: tuple
    out_dims: int
    in_dims: int
    rank: int
    dora: bool
    seed: int

    @property
    def label(self) -> str:
        shape = "x".join(map(str, (*self.lead, self.out_dims, self.in_dims)))
        return (f"{self.bits}-bit g{self.group_size} {self.dtype} {self.policy} {self.delta} delta "
                f"{shape} r{self.rank}{' DoRA' if self.dora else ''}")


def case_grid(bits=SUPPORTED_BITS, group_sizes=SUPPORTED_GROUP_SIZES, dtypes=SUPPORTED_DTYPES,
              policies=POLICIES, deltas=tuple(DELTA_STD)) -> list[Case]:
    """Every combination of the given values, each once; the shape, DoRA
    and seed vary with the case's position so that every delta size meets
    every shape across the grid."""
    cases = []
    for i, (b, g, dt, pol, dl) in enumerate(itertools.product(bits, group_sizes, dtypes, policies, deltas)):
        lead, out_dims, n_groups, rank = SHAPES[i % len(SHAPES)]
        cases.append(Case(b, g, dt, pol, dl, lead, out_dims, n_groups * g, rank, dora=i % 5 == 4, seed=i))
    return cases


def case_inputs(case: Case):
    """``(w, scales, biases, a, b, magnitude or None)``: normal(0, 0.02)
    weights quantized by MLX, a LoRA with the case's delta size, and for
    DoRA magnitudes 5 % above the rows' norms."""
    rng = np.random.default_rng(case.seed)
    weights = rng.normal(0, 0.02, size=(*case.lead, case.out_dims, case.in_dims)).astype(np.float32)
    w, scales, biases = mx.quantize(mx.array(weights).astype(getattr(mx, case.dtype)),
                                    group_size=case.group_size, bits=case.bits)
    std = DELTA_STD[case.delta]
    a = rng.normal(0, 1, size=(*case.lead, case.rank, case.in_dims)).astype(np.float32)
    b = rng.normal(0, 1, size=(*case.lead, case.out_dims, case.rank)).astype(np.float32)
    b *= std / np.sqrt(case.rank)  # delta entries ~ normal(0, std)
    magnitude = None
    if case.dora:
        rows = mx.dequantize(w, scales, biases, group_size=case.group_size, bits=case.bits)
        magnitude = mx.linalg.norm(rows.astype(mx.float32), axis=-1) * 1.05
    return w, scales, biases, mx.array(a), mx.array(b), magnitude


@dataclass
class PathResult:
    path: str
    compared: int = 0
    mismatches: list = None

    def __post_init__(self):
        self.mismatches = [] if self.mismatches is None else self.mismatches


def _same(x, y) -> bool:
    return all(p.dtype == q.dtype and p.shape == q.shape and mx.array_equal(p, q).item()
               for p, q in zip(x, y))


def _kwargs(case: Case, magnitude):
    return dict(scale=1.0, group_size=case.group_size, bits=case.bits, policy=case.policy,
                seed=case.seed, magnitude=magnitude)


def metal_gpu_available() -> bool:
    """Whether this build has Metal kernels and MLX sees a Metal GPU."""
    ext = _native.ext
    return bool(ext is not None and getattr(ext, "has_metal", False) and mx.metal.is_available())


def paths() -> list[str]:
    """The kernel paths this machine can compare (none without the native
    extension)."""
    ext = _native.ext
    if ext is None:
        return []
    found = [f"cpu:{build}" for build in ext.cpu_kernels()["available"]] + ["metal-source"]
    return found + (["metal-gpu"] if metal_gpu_available() else [])


def _compare(path: str, case: Case, inputs) -> bool:
    # Everything of a comparison, the reference's delta matmul included, on
    # the device of the path (a Mac's default device is the GPU).
    with mx.stream(mx.gpu if path == "metal-gpu" else mx.cpu):
        return _compare_on_device(path, case, inputs)


def _compare_on_device(path: str, case: Case, inputs) -> bool:
    ext = _native.ext
    w, s, b, a, bb, magnitude = inputs
    if path.startswith("cpu:"):
        kw = _kwargs(case, None)
        ext.set_cpu_kernels(path.split(":", 1)[1])
        try:
            got = ext.fuse_requant(w, s, b, a, bb, **kw, stream=mx.cpu)
        finally:
            ext.set_cpu_kernels("auto")
        return _same(got, fuse_requant_reference(w, s, b, a, bb, **kw, stream=mx.cpu))
    if path == "metal-source":
        extra = [] if magnitude is None else [magnitude]
        sim = ext.simulate_metal_fuse_requant([w, s, b, a, bb, *extra], 1.0, case.group_size, case.bits,
                                              POLICIES.index(case.policy), case.seed)
        return _same(sim, ext.fuse_requant(w, s, b, a, bb, **_kwargs(case, magnitude), metal_rules=True,
                                           stream=mx.cpu))
    if path == "metal-gpu":
        kw = _kwargs(case, None)
        got = ext.fuse_requant(w, s, b, a, bb, **kw, stream=mx.gpu)
        if case.policy == "stock":
            return _same(got, fuse_requant_reference(w, s, b, a, bb, **kw, stream=mx.gpu))
        with mx.stream(mx.cpu):
            return _same(got, fuse_requant_reference(w, s, b, a, bb, **kw, stream=mx.cpu))
    raise ValueError(f"unknown kernel path {path!r}")


def self_check(cases: list[Case], on_case=None) -> list[PathResult]:
    """Compares every available path on every case; ``on_case()`` is called
    after each case (progress)."""
    results = {p: PathResult(p) for p in paths()}
    for case in cases:
        inputs = case_inputs(case)
        mx.eval([x for x in inputs if x is not None])
        for path, result in results.items():
            result.compared += 1
            if not _compare(path, case, inputs):
                result.mismatches.append(case.label)
        if on_case is not None:
            on_case()
    return list(results.values())
