"""The calibrated policy: the native kernel vs its NumPy reference (the test
oracle) and vs the native preserve fuse of the same tensor, all measured in
this run; plus the Hessian factorisation (H -> P, NumPy float64) it needs.
The expert shape is the real one (OUT x IN = 2048 x 512); the NumPy reference
is timed on a few experts only and scaled per expert.

    python bench/bench_calibrated.py [--experts 8] [--reference-experts 2] [--bits 3] [--group-size 64]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import pyfuse  # noqa: E402
from pyfuse.kernel.calibrated import propagation_matrix  # noqa: E402
from pyfuse.kernel.reference import fuse_requant_reference  # noqa: E402
from kernel_cases import IN, expert_tensor  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--reference-experts", type=int, default=2)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    if not pyfuse.native_available():
        sys.exit("bench_calibrated: the native extension is not built")
    gs, bits, n = args.group_size, args.bits, args.experts
    w, s, b, a, bb = expert_tensor(group_size=gs, bits=bits, experts=n)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 256, 16)) @ rng.normal(size=(n, 16, IN)) + 0.3 * rng.normal(size=(n, 256, IN))
    h = mx.array((np.swapaxes(x, -1, -2) @ x).astype(np.float32))
    print(f"{n} experts of 2048 x {IN}, {bits}-bit g{gs}, bf16; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f} at the start\n")

    t_prop, prop = timed(lambda: propagation_matrix(h))
    t_pres, _ = timed(lambda: mx.eval(pyfuse.fuse_requant(w, s, b, a, bb, group_size=gs, bits=bits,
                                                           policy="preserve")))
    t_nat, nat = timed(lambda: mx.eval(pyfuse.fuse_requant(w, s, b, a, bb, group_size=gs, bits=bits,
                                                           policy="calibrated", hessian=h)))
    r = args.reference_experts
    t_ref, ref = timed(lambda: fuse_requant_reference(w[:r], s[:r], b[:r], a[:r], bb[:r], group_size=gs,
                                                      bits=bits, policy="calibrated", propagation=prop[:r]))
    nat = pyfuse.fuse_requant(w[:r], s[:r], b[:r], a[:r], bb[:r], group_size=gs, bits=bits,
                              policy="calibrated", hessian=h[:r])
    same = all(mx.array_equal(p, q).item() for p, q in zip(nat, ref))
    per_ref = t_ref / r
    per_nat = t_nat / n
    print("| step | seconds per expert | vs native calibrated |")
    print("|---|---:|---:|")
    print(f"| H -> P (NumPy float64, {IN} x {IN}) | {t_prop / n:.4f} | {t_prop / t_nat:.2f} |")
    print(f"| native preserve | {t_pres / n:.4f} | {t_pres / t_nat:.3f} |")
    print(f"| native calibrated | {per_nat:.4f} | 1.00 |")
    print(f"| NumPy reference calibrated | {per_ref:.4f} | {per_ref / per_nat:.1f} |")
    print(f"\nnative == reference on {r} experts: {same}")


if __name__ == "__main__":
    main()
