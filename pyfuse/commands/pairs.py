"""``pyfuse pairs``: DPO pairs from an SFT data set (real reply vs the model's own)."""

from __future__ import annotations

import argparse

from ._args import add_force, add_model, print_warnings

HELP = "build DPO pairs: each SFT row's real reply (chosen) vs the model's own greedy reply (rejected)"
DESCRIPTION = """\
Build preference pairs for `pyfuse train --train-mode dpo` from an SFT data
set: for every chat row (its last assistant turn is the real reply) or
completions row, the model's greedy reply to the same prompt (batched,
thinking off) is the rejected answer and the real reply the chosen one.
Writes train.jsonl (and valid.jsonl when the data has one) of
{"messages", "chosen", "rejected"} rows; rows whose generated reply equals
the real one are left out.

  pyfuse pairs --model BASE --data persona/ --out dpo-pairs/
  pyfuse train --model SFT_FUSED --data dpo-pairs/ --train-mode dpo --beta 0.1 ..."""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"model": "--model", "data": "--data", "adapter_path": "--adapter-path"}
OUTPUTS = {"out": "--out"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, help="the model whose replies are the rejected answers (the base model)")
    p.add_argument("--data", required=True, help="SFT data: a directory with train.jsonl [+ valid.jsonl] or a .jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (train.jsonl, valid.jsonl)")
    p.add_argument("--adapter-path", default=None, help="an unfused adapter to apply to --model")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8)")
    p.add_argument("--max-tokens", type=int, default=256, help="generation budget per reply (default: 256)")
    p.add_argument("--limit", type=int, default=None, help="the first N rows of each file")
    add_force(p, "--out")


def run(args: argparse.Namespace) -> int:
    from ..data.pairs import make_pairs

    r = make_pairs(args.model, args.data, args.out, adapter_path=args.adapter_path, batch_size=args.batch_size,
                   max_tokens=args.max_tokens, limit=args.limit, force=args.force)
    print_warnings("pyfuse pairs", r.warnings)
    counts = ", ".join(f"{n} {name}" for name, n in r.written.items())
    print(f"pyfuse pairs: wrote {r.out} ({counts} pairs)")
    return 0
