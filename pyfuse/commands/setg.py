"""``pyfuse setg``: mine the items both models get wrong and split them into
mlx-lm training data; ``pyfuse setg mine``: the stratified MMLU-Pro sample
they are mined from."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ._args import add_force, add_out, add_seed, console

HELP = "Set-G: the items base and persona both get wrong, split into train/test data (and `mine`: sample MMLU-Pro)"
DESCRIPTION = """\
Mine Set-G: the items that both the base and the persona model answer wrongly,
from two per-item eval result files (pyfuse eval mc) over the same items.

Set-G is split by category (stratified, seeded, deterministic) into train and
test by --split (default train=0.7,test=0.3, the study's 70/30): round(train * n)
items of each category go to train, the rest to test. --valid-frac F carves a
validation set (mlx-lm's validation loss) out of each category's train share.
Written to --out: train.jsonl, test.jsonl [, valid.jsonl] (mlx-lm chat format:
the question with lettered options -> \\boxed{X} and a one-line justification),
items.json (ids per split) and counts.json (counts per category and split).

  pyfuse setg --base base.jsonl --persona persona.jsonl --data mmlu_pro_6000.jsonl \\
      --split train=0.7,test=0.3 --seed 0 --out setg/

The items both are evaluated on, first: a stratified sample of a local MMLU-Pro
copy (JSONL or Parquet, its own schema), N rows over its categories:

  pyfuse setg mine --data mmlu_pro_test.parquet --n 6000 --seed 0 --out mmlu_pro_6000.jsonl"""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"base_results": "--base", "persona_results": "--persona", "data": "--data", "mine_data": "--data"}
OUTPUTS = {"out": "--out"}

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", dest="base_results", metavar="BASE.jsonl",
                        help="per-item eval results of the base model (required)")
    parser.add_argument("--persona", dest="persona_results", metavar="PERSONA.jsonl",
                        help="per-item eval results of the persona model, same items (required)")
    parser.add_argument("--data", metavar="MMLU_FILE", help="the MMLU-Pro file (JSONL or Parquet) the evals ran on "
                        "(required)")
    parser.add_argument("--split", type=_split, default=None, metavar="train=F,test=F",
                        help="the train/test fractions of each category (default: train=0.7,test=0.3)")
    parser.add_argument("--valid-frac", type=float, default=0.0,
                        help="share of train carved out as valid.jsonl (default: 0, no validation set)")
    add_seed(parser, "split seed")
    add_out(parser, "output directory (required)")
    add_force(parser, "--out")
    sub = parser.add_subparsers(dest="setg_command", metavar="[mine]")
    m = sub.add_parser("mine", help="stratified sample of an MMLU-Pro file (the items to mine Set-G from)",
                       description="N rows of a local MMLU-Pro copy, spread over its categories "
                       "(proportionally by default), deterministic from --seed; written with every column, "
                       "as JSONL, or Parquet when --out ends in .parquet.")
    m.add_argument("--data", dest="mine_data", required=True, metavar="MMLU_FILE",
                   help="MMLU-Pro rows (JSONL or Parquet: question_id, question, options, answer, "
                        "answer_index, cot_content, category, src)")
    m.add_argument("--n", type=int, required=True, help="rows to sample, e.g. 6000")
    m.add_argument("--allocation", choices=("proportional", "equal"), default="proportional",
                   help="rows per category: proportional to its size (default) or equal")
    add_seed(m, "sampling seed")
    add_out(m, "output file (.jsonl or .parquet)", required=True, metavar="FILE")
    add_force(m, "--out")
    parser.set_defaults(_setg_parser=parser)


def _split(text: str) -> dict:
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected train=F,test=F, got {text!r}")
    return out


def run(args: argparse.Namespace) -> int:
    if args.setg_command == "mine":
        return _mine(args)
    missing = [flag for flag, v in (("--base", args.base_results), ("--persona", args.persona_results),
                                    ("--data", args.data), ("--out", args.out)) if v is None]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)} (or `pyfuse setg mine`)")
    return _split_setg(args)


def _split_setg(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..data.setg import SPLITS, mine_setg

    result = mine_setg(args.base_results, args.persona_results, args.data, split=args.split,
                       valid_frac=args.valid_frac, seed=args.seed, out=args.out,
                       force=args.force)
    out = console()
    out.print(f"Set-G: {result.n_setg} of {result.n_items} items wrong for both (seed {result.seed}, split "
              f"train {result.split['train']:g} / test {result.split['test']:g}"
              + (f", valid {result.valid_frac:g} of train" if result.valid_frac else "") + ")")
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
    files = [f"{s}.jsonl" for s in SPLITS if s != "valid" or totals["valid"]]
    out.print(f"wrote {', '.join(files)}, items.json, counts.json to {result.out}")
    return 0


def _mine(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..data.sampler import sample_mmlu

    result = sample_mmlu(args.mine_data, args.n, seed=args.seed, allocation=args.allocation, out=args.out,
                         force=args.force)
    out = console()
    out.print(f"sampled {result.n} of {result.n_rows} rows over {len(result.counts)} categories "
              f"({result.allocation}, seed {result.seed})")
    table = Table()
    for col in ("category", "available", "sampled"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for cat, c in result.counts.items():
        table.add_row(cat, str(c["available"]), str(c["chosen"]))
    out.print(table)
    out.print(f"wrote {result.out}")
    return 0
