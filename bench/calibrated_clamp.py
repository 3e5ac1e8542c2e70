"""Why calibrated + refined fell short of preserve + refined on the tiny
MoE, and what head-room at the bottom of the refined grid changes
(docs/faithful_fuse.md): the output error on held-out tokens of one refined
3 -> 8-bit down_proj, on the refined grid with head-room
(``refine_grid(headroom=True)``, ``--refine-headroom``) and without it (the default), under
calibrated rounding with the groups the delta leaves re-fitted (the policy),
with codes clamped to [0, 255] (``--on-range-overflow clip``), with codes
left unbounded (as if the grid had room), and under plain nearest rounding
(re-fitted as preserve does, or clamped). Run after
`python bench/compare_policies.py --work DIR` (it reuses DIR's model,
adapter and calibration data).

    python bench/calibrated_clamp.py --work DIR
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import DOWN, model_tensors  # noqa: E402

from pyfuse.calibration import collect_hessians  # noqa: E402
from pyfuse.calibration.fidelity import output_fidelity  # noqa: E402
from pyfuse.kernel.calibrated import calibrated_codes, calibrated_reference_codes, propagation_matrix  # noqa: E402
from pyfuse.kernel.reference import delta_f32, unpack_codes  # noqa: E402
from pyfuse.kernel.refine import refine_grid  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="the --work directory of bench/compare_policies.py")
    ap.add_argument("--layer", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    path = f"model.layers.{args.layer}.{DOWN}"
    base = model_tensors(work / "moe")
    ad = mx.load(str(work / "adapter" / "adapters.safetensors"))
    mh = collect_hessians(work / "moe", work / "calib.jsonl", [path])[path]
    w, s, b = (base[f"{path}.{n}"] for n in ("weight", "scales", "biases"))
    a, bb = ad[f"{path}.lora_a"], ad[f"{path}.lora_b"]
    old = np.asarray(mx.dequantize(w, s, b, group_size=64, bits=3))
    prop = propagation_matrix(mh.fit)
    delta = delta_f32(a, bb, 20.0)
    print(f"{path}, refined 3 -> 8 bits; {sum(mh.held_out_tokens)} held-out routed tokens\n")
    print("| refined grid | rounding | output error | output retention | codes outside [0, 255] "
          "| groups re-fitted |")
    print("|---|---|---:|---:|---:|---:|")
    for headroom in (False, True):
        w8, s8, b8 = refine_grid(w, s, b, group_size=64, bits=3, to_bits=8, headroom=headroom)
        moved = float(np.mean(np.asarray(b8 != b)))
        grid = f"head-room ({moved:.0%} of groups moved up)" if headroom else "codes x 32 (no head-room)"
        codes = unpack_codes(w8, 64, 8)
        for name, (new, new_s, new_z) in _roundings(codes, s8, b8, delta, prop).items():
            deq = np.asarray(new) * _per_weight(new_s) + _per_weight(new_z)
            fid = output_fidelity(lambda e: (mx.array(old[e]), mx.array(deq[e])), w.shape[0], a, bb, 20.0,
                                  mh.held_out)
            refit = int(np.sum(np.asarray((new_s != s8) | (new_z != b8))))
            outside = int(np.sum((np.asarray(new) < 0) | (np.asarray(new) > 255)))
            print(f"| {grid} | {name} | {fid['output_error']:.3f} | {fid['output_retention']:.3f} | "
                  f"{outside} | {refit} of {s8.size} |")


def _per_weight(x):
    return np.asarray(mx.repeat(x.astype(mx.float32), 64, axis=-1))


def _roundings(codes, s8, b8, delta, prop):
    """Each rounding's (codes, scales, biases) on the refined grid."""
    scale = _per_weight(s8)
    steps = (np.asarray(delta) / scale).astype(np.float32)
    inv = (np.float32(1) / scale).astype(np.float32)
    c = np.asarray(codes)
    policy = partial(calibrated_reference_codes, codes, s8, b8, delta, group_size=64, bits=8)
    nearest = partial(calibrated_reference_codes, codes, s8, b8, delta, group_size=64, bits=8, prop=None)
    return {"calibrated, groups left re-fitted (the policy)": policy(prop=prop),
            "calibrated, clamped (--on-range-overflow clip)": policy(prop=prop, refit=False),
            "calibrated, codes unbounded": (calibrated_codes(c, steps, inv, scale, np.asarray(prop), 8,
                                                             clamp=False), s8, b8),
            "nearest, groups left re-fitted (= preserve)": nearest(),
            "nearest, clamped": nearest(refit=False)}


if __name__ == "__main__":
    main()
