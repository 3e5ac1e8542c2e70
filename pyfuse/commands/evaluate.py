"""``pyfuse eval``: multiple-choice (MMLU-Pro) and identity-consistency evals."""

from __future__ import annotations

import argparse
import json
import sys

from ._args import add_json, add_model, add_out, comma_list, console, print_warnings

HELP = "evaluate a model: multiple choice (MMLU-Pro, generate or logprob) or identity consistency"
DESCRIPTION = """\
Evaluate an mlx-lm model (greedy, temperature 0, thinking disabled; on MLX's
CPU backend bfloat16/float16 parameters run widened to float32, as in
`pyfuse noise-floor`: exact for the stored weights and several times faster).

  pyfuse eval mc --model M --data mmlu_pro.parquet [--method generate|logprob]
                 [--batch-size 8] [--limit N] --out results.jsonl
      Multiple choice on MMLU-Pro rows (JSONL or Parquet). generate: greedy
      decoding with mlx-lm's batch_generate in fixed batches of --batch-size
      consecutive items (the same batches for every model), answer extracted
      from the text (\\boxed{X} first). logprob: one forward pass per item,
      the option letter with the highest log P(\\boxed{X} | prompt) - the
      answer the model gives if it answers at once; much faster, no decoding
      (the same scorer gives `pyfuse noise-floor --mc` its answers).
      One JSON line per item (id, category, gold, prediction, rule, correct,
      output, ...) for `pyfuse stats mcnemar` and `pyfuse setg`.

  pyfuse eval identity --model M [--suite my_suite.yaml] [--persona-name Nova]
      The identity-consistency suite (default: the shipped 20-prompt template;
      `pyfuse eval identity --print-suite > my_suite.yaml` to start your own):
      rule checks per prompt (states the persona's name, never claims to be the
      base model or its vendor, stays in persona under pressure), scored out of
      N. Run the base model too (--control BASE_MODEL): it is the control and
      must score low."""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"model": "--model", "data": "--data", "adapter_path": "--adapter-path", "suite": "--suite",
          "control": "--control"}
OUTPUTS = {"out": "--out"}

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="SUITE", required=True)

    p = sub.add_parser("mc", help="multiple choice (MMLU-Pro rows), generate or logprob",
                       description="Multiple-choice evaluation on MMLU-Pro rows (see `pyfuse eval --help`).")
    add_model(p)
    p.add_argument("--data", required=True, help="MMLU-Pro rows: .jsonl or .parquet")
    p.add_argument("--method", choices=("generate", "logprob"), default="generate",
                   help="generate (greedy decoding + extraction, the reference) or logprob "
                        "(score the option letters after \\boxed{, one forward pass; default: generate)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="items per generation batch: consecutive items, the same for every model (default: 8)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items only")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="generation budget per item for --method generate (default: 1024)")
    p.add_argument("--categories", type=comma_list, default=None, metavar="CAT[,CAT...]",
                   help="evaluate only these categories")
    p.add_argument("--system-prompt", default=None, help="a system turn before every question")
    p.add_argument("--answer-prefix", default="\\boxed{",
                   help="what --method logprob puts before the letter (default: \\boxed{)")
    p.add_argument("--adapter-path", default=None, help="an unfused mlx-lm adapter to apply")
    add_out(p, "write one JSON line per item", metavar="RESULTS.jsonl")
    add_json(p, "the summary")
    p.set_defaults(_eval=_run_mc)

    p = sub.add_parser("identity", help="identity-consistency suite (rule checks, scored out of N)",
                       description="Identity-consistency suite (see `pyfuse eval --help`).")
    add_model(p, default=None)
    p.add_argument("--suite", default=None,
                   help="the suite (YAML or JSON; default: the shipped template, which needs --persona-name)")
    p.add_argument("--persona-name", default=None, help="the persona's name (overrides the suite)")
    p.add_argument("--alias", dest="aliases", action="append", default=None, metavar="NAME",
                   help="another accepted name (repeatable; overrides the suite's aliases)")
    p.add_argument("--base-name", dest="base_names", action="append", default=None, metavar="NAME",
                   help="a base-model name the persona must not claim (repeatable; overrides the suite)")
    p.add_argument("--vendor", dest="vendors", action="append", default=None, metavar="NAME",
                   help="the base model's vendor (repeatable; overrides the suite)")
    p.add_argument("--system-prompt", default=None, help="system turn (overrides the suite)")
    p.add_argument("--max-tokens", type=int, default=None, help="generation budget (overrides the suite)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8)")
    p.add_argument("--adapter-path", default=None, help="an unfused mlx-lm adapter to apply")
    p.add_argument("--control", default=None, metavar="BASE_MODEL",
                   help="also run the base model (the control, which must score low) and compare")
    add_out(p, "write one JSON line per prompt", metavar="RESULTS.jsonl")
    add_json(p, "the summary")
    p.add_argument("--print-suite", action="store_true",
                   help="print the shipped suite template and exit (copy it, then edit it)")
    p.set_defaults(_eval=_run_identity)


def run(args: argparse.Namespace) -> int:
    return args._eval(args)


def _run_mc(args) -> int:
    from rich.table import Table

    from ..evals.mc import evaluate_mc

    r = evaluate_mc(args.model, args.data, method=args.method, batch_size=args.batch_size, limit=args.limit,
                    max_tokens=args.max_tokens, out=args.out, categories=args.categories,
                    system_prompt=args.system_prompt, answer_prefix=args.answer_prefix,
                    adapter_path=args.adapter_path)
    if args.json:
        print(json.dumps({**r.summary(), "out": str(r.out) if r.out else None}, indent=2))
        return 0
    table = Table(title=f"{args.method}: {r.correct}/{r.n} correct ({100 * r.accuracy:.2f} %)",
                  title_justify="left")
    table.add_column("category")
    table.add_column("correct", justify="right")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    for cat, c in r.per_category.items():
        table.add_row(cat, str(c["correct"]), str(c["n"]), f"{100 * c['accuracy']:.1f} %")
    console(min_width=120).print(table)
    extra = ""
    if args.method == "generate":
        none = sum(1 for row in r.rows if row["prediction"] is None)
        cut = sum(1 for row in r.rows if row["truncated"])
        extra = f"; {none} without an extractable answer, {cut} cut at --max-tokens"
    print(f"pyfuse eval mc: {r.n} items in {r.seconds:.1f} s ({r.items_per_second:.2f} items/s){extra}"
          + (f"; wrote {r.out}" if r.out else ""))
    return 0


def _run_identity(args) -> int:
    from ..errors import UserError
    from ..evals.identity import default_suite_path, evaluate_identity

    if args.print_suite:
        sys.stdout.write(default_suite_path().read_text(encoding="utf-8"))
        return 0
    if args.model is None:
        raise UserError("--model is required (or --print-suite)")
    r = evaluate_identity(args.model, args.suite, persona_name=args.persona_name, aliases=args.aliases,
                          base_names=args.base_names, vendors=args.vendors, system_prompt=args.system_prompt,
                          max_tokens=args.max_tokens, batch_size=args.batch_size, out=args.out,
                          adapter_path=args.adapter_path, control=args.control)
    print_warnings("pyfuse eval identity", r.warnings)
    if args.json:
        print(json.dumps({**r.summary(), "out": str(r.out) if r.out else None}, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"identity ({r.persona}): {r.score}/{r.n}", title_justify="left")
    for col in ("id", "category", "pass", "failed"):
        table.add_column(col)
    table.add_column("output", no_wrap=True, max_width=60)
    for row in r.rows:
        out = " ".join(row["output"].split())
        table.add_row(str(row["id"]), row["category"], "yes" if row["passed"] else "NO",
                      ", ".join(row["failed"]), out[:57] + ("..." if len(out) > 57 else ""))
    console(min_width=120).print(table)
    cats = ", ".join(f"{c} {v['score']}/{v['n']}" for c, v in r.per_category.items())
    control = f"; control {r.control.model}: {r.control.score}/{r.control.n}" if r.control else ""
    print(f"pyfuse eval identity: {r.score}/{r.n} ({cats}) in {r.seconds:.1f} s{control}"
          + (f"; wrote {r.out}" if r.out else ""))
    return 0
