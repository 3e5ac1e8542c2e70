"""``pyfuse setg``: mine the items both models get wrong and split them into
mlx-lm training data."""

from __future__ import annotations

import argparse

from ._args import add_out, add_seed, console

HELP = "mine Set-G (items base and persona both get wrong) into train/valid/test chat data"
DESCRIPTION = """\
Mine Set-G: the items that both the base and the persona model answer wrongly,
from two per-item eval result files (pyfuse eval mc) over the same items.

Set-G is split by category (stratified, seeded, deterministic): round(train_frac * n)
items of each category go to train, the rest is halved between valid and test (an
odd leftover goes alternately to test and valid across categories). Written to --out:
train.jsonl, valid.jsonl, test.jsonl (mlx-lm chat format: the question with lettered
options -> \\boxed{X} and a one-line justification), items.json (ids per split) and
counts.json (counts per category and split).

  pyfuse setg --base base.jsonl --persona persona.jsonl --data mmlu_pro_test.parquet \\
      --train-frac 0.7 --seed 0 --out setg/"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", dest="base_results", required=True, metavar="BASE.jsonl",
                        help="per-item eval results of the base model")
    parser.add_argument("--persona", dest="persona_results", required=True, metavar="PERSONA.jsonl",
                        help="per-item eval results of the persona model (same items)")
    parser.add_argument("--data", required=True, metavar="MMLU_FILE",
                        help="the MMLU-Pro file (JSONL or Parquet) the evals ran on")
    parser.add_argument("--train-frac", type=float, default=0.7,
                        help="fraction of each category used for training (default: 0.7)")
    add_seed(parser, "split seed")
    add_out(parser, "output directory", required=True)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..data.setg import SPLITS, mine_setg

    result = mine_setg(args.base_results, args.persona_results, args.data,
                       train_frac=args.train_frac, seed=args.seed, out=args.out)
    out = console()
    out.print(f"Set-G: {result.n_setg} of {result.n_items} items wrong for both "
              f"(seed {result.seed}, train_frac {result.train_frac:g})")
    table = Table()
    table.add_column("category")
    for split in (*SPLITS, "total"):
        table.add_column(split, justify="right")
    for cat, counts in result.counts.items():
        table.add_row(cat, *(str(counts[s]) for s in (*SPLITS, "total")))
    totals = result.totals()
    table.add_section()
    table.add_row("all", *(str(totals[s]) for s in SPLITS), str(result.n_setg), style="bold")
    out.print(table)
    out.print(f"wrote {', '.join(f'{s}.jsonl' for s in SPLITS)}, items.json, counts.json "
              f"to {result.out}")
    return 0
