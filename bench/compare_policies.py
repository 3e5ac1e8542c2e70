"""Every policy, with and without exact refinement to 8 bits, on the tiny
qwen3_moe (3-bit g64, pyfuse.demo.tiny_model) with a random rank-4 LoRA on
the experts' down_proj of a few per cent of a 3-bit step, measured in this
run: weight retention (the fuse report), output error and output retention
on held-out calibration tokens (pyfuse.calibration.fidelity), KL divergence
and top-1 agreement of the next-token distributions against the base model
with the adapter applied unfused (mlx-lm), weights the zero-delta twin
changes, and the bytes the fused modules grow by. Prints a Markdown table
(docs/faithful_fuse.md quotes it).

    python bench/compare_policies.py [--rows 200] [--b-std 5e-4] [--work DIR]
"""

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import DOWN, make_adapter, model_tensors, write_jsonl  # noqa: E402

from pyfuse.calibration import collect_hessians  # noqa: E402
from pyfuse.calibration.fidelity import output_fidelity  # noqa: E402
from pyfuse.calibration.texts import calibration_sequences  # noqa: E402
from pyfuse.demo.tiny_model import build_tiny_model, build_tokenizer  # noqa: E402
from pyfuse.fuse import fuse_model  # noqa: E402
from pyfuse.lm.agreement import compare_to_reference, reference_logits  # noqa: E402
from pyfuse.lm.load import load_for_inference  # noqa: E402

WORDS = ("the a cat dog runs jumps over under big small red blue water fire city river model expert token "
         "layer data paris france four eight").split()
POLICIES = ("stock", "preserve", "stochastic", "calibrated")


def module_output(base, fused, adapter, mh, bits):
    path = mh.path
    ad = mx.load(str(adapter / "adapters.safetensors"))

    def deq(t, e, b):
        return mx.dequantize(t[f"{path}.weight"][e], t[f"{path}.scales"][e], t[f"{path}.biases"][e],
                             group_size=64, bits=b)

    experts = base[f"{path}.weight"].shape[0]
    return output_fidelity(lambda e: (deq(base, e, 3), deq(fused, e, bits)), experts, ad[f"{path}.lora_a"],
                           ad[f"{path}.lora_b"], 20.0, mh.held_out)


def changed_share(base, twin, paths, bits):
    """The share of the modules' dequantized weights the zero-delta twin changed."""
    diff = total = 0
    for p in paths:
        def deq(t, b):
            return mx.dequantize(t[f"{p}.weight"], t[f"{p}.scales"], t[f"{p}.biases"], group_size=64, bits=b)
        d = deq(base, 3) != deq(twin, bits)
        diff, total = diff + int(mx.sum(d).item()), total + d.size
    return f"{diff / total:.4f}"


def fused_bytes(model_dir, fused_dir, paths):
    def size(d):
        t = model_tensors(d)
        return sum(t[k].nbytes for k in t if k.rsplit(".", 1)[0] in paths)
    return size(fused_dir) - size(model_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200, help="calibration sequences (every 4th held out)")
    ap.add_argument("--b-std", type=float, default=5e-4, help="std of the random lora_b (scale 20, rank 4)")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="compare_policies_"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = build_tokenizer(work / "tokenizer")
    model = build_tiny_model(work / "moe", tokenizer_dir=tok, arch="qwen3_moe", quantize={"group_size": 64, "bits": 3})
    rng = random.Random(0)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))} for _ in range(args.rows)]
    data = write_jsonl(work / "calib.jsonl", rows)
    adapter = make_adapter(model, work / "adapter", keys=[DOWN], b_std=args.b_std)
    zero = make_adapter(model, work / "zero", keys=[DOWN], b_std=0.0)
    paths = [f"model.layers.{i}.{DOWN}" for i in (2, 3)]
    hessians = collect_hessians(model, data, paths)
    held = [s for i, s in enumerate(calibration_sequences(load_for_inference(model).tokenizer, data,
                                                          max_seq_len=2048)) if i % 4 == 3]
    reference = reference_logits(model, held, adapter=adapter)
    base = model_tensors(model)
    print(f"tiny qwen3_moe 3-bit g64; LoRA rank 4 on down_proj of layers 2-3 (b std {args.b_std}, scale 20); "
          f"{args.rows} calibration sequences, {len(held)} held out\n")
    print("| policy | grid | weight retention | output error | output retention | KL to unfused | top-1 agree "
          "| share of weights the zero twin changes | bytes added |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for policy in POLICIES:
        for rb in (None, 8):
            calib = {"calibration": data} if policy == "calibrated" else {}
            tag = f"{policy}_{rb or 3}"
            res = fuse_model(model, adapter, work / tag, policy=policy, requant_bits=rb, seed=1, **calib)
            twin = fuse_model(model, zero, work / f"{tag}_zero", policy=policy, requant_bits=rb, seed=1, **calib)
            fused = model_tensors(res.save_path)
            outs = [module_output(base, fused, adapter, hessians[p], rb or 3) for p in paths]
            err = float(np.mean([o["output_error"] for o in outs]))
            ret = float(np.mean([o["output_retention"] for o in outs]))
            agree = compare_to_reference(reference, res.save_path)
            kl, top1 = agree.kl_mean, agree.top1_agreement
            changed = changed_share(base, model_tensors(twin.save_path), paths, rb or 3)
            grid = "3-bit" if rb is None else ("8-bit refined" if policy != "stock" else "8-bit re-fitted")
            print(f"| {policy} | {grid} | {res.summary['retention']:.3f} | {err:.3f} | {ret:.3f} | {kl:.2e} | "
                  f"{top1:.4f} | {changed} | {fused_bytes(model, res.save_path, paths)} |")
    reference.close()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
