"""Every policy, with and without exact refinement to 8 bits, on the tiny
qwen3_moe (3-bit g64, pyfuse.demo.tiny_model) with a random rank-4 LoRA on
the experts' down_proj of a few per cent of a 3-bit step, measured in this
run: weight retention (the fuse report), output error and output retention
on held-out calibration tokens (pyfuse.calibration.fidelity), KL divergence
and top-1 agreement of the next-token distributions against the base model
with the adapter applied unfused (mlx-lm), weights the zero-delta twin
changes, and the bytes the fused modules grow by: what `pyfuse fuse
--compare-policies` measures (pyfuse.fuse.compare), on a model built here.
Prints a Markdown table (docs/faithful_fuse.md quotes it).

    python bench/compare_policies.py [--rows 200] [--b-std 5e-4] [--work DIR]
"""

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import DOWN, make_adapter, write_jsonl  # noqa: E402

from pyfuse.demo.tiny_model import build_tiny_model, build_tokenizer  # noqa: E402
from pyfuse.fuse.compare import compare_policies  # noqa: E402

WORDS = ("the a cat dog runs jumps over under big small red blue water fire city river model expert token "
         "layer data paris france four eight").split()


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
    result = compare_policies(model, adapter, calibration=data, seed=1)
    print(f"tiny qwen3_moe 3-bit g64; LoRA rank 4 on down_proj of layers 2-3 (b std {args.b_std}, scale 20); "
          f"{args.rows} calibration sequences; KL on {result.meta['agreement_tokens']} held-out tokens\n")
    print("| policy | grid | weight retention | output error | output retention | KL to unfused | top-1 agree "
          "| share of weights the zero twin changes | bytes added |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in result.rows:
        print(f"| {r['policy']} | {r['grid']} | {r['weight_retention']:.3f} | {r['output_error']:.3f} | "
              f"{r['output_retention']:.3f} | {r['kl_to_unfused']:.2e} | {r['top1_agreement']:.4f} | "
              f"{r['zero_twin_weights_changed']:.4f} | {r['bytes_added']} |")
    for w in result.warnings:
        print(f"\nnote: {w}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
