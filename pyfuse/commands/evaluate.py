"""``pyfuse eval``: multiple-choice (MMLU-Pro) and identity-consistency evals."""

from __future__ import annotations

import argparse
import json
import sys

from ._args import add_force, add_json, add_model, add_out, comma_list, console, print_warnings

HELP = "evaluate a model: multiple choice (MMLU-Pro, generate or logprob), identity consistency, behaviour rates"
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
      Across processes or Macs: mlx.launch --hostfile hosts.json -- pyfuse eval mc ...
      (each rank scores whole batches; rank 0 writes the same rows; docs/distributed.md).

  pyfuse eval identity --model M [--suite my_suite.yaml] [--persona-name Nova]
      The identity-consistency suite (default: the shipped 20-prompt template;
      `pyfuse eval identity --print-suite > my_suite.yaml` to start your own):
      rule checks per prompt (states the persona's name, never claims to be the
      base model or its vendor, stays in persona under pressure), scored out of
      N. Run the base model too (--control BASE_MODEL): it is the control and
      must score low.

  pyfuse eval behaviour --model M [--model M2 ...] --suite behaviours.yaml
      Behaviour rates (`--print-suite` prints the template): K generations
      per prompt (greedy, or sampled with a seed), one rule per behaviour
      (marker string, regex, forbidden phrases, answer letter), the rate of
      each with its Wilson interval, overall and per prompt group; every
      further --model is compared with the first on the same (prompt,
      sample) pairs (exact McNemar)."""


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
    add_force(p, "--out")
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
    add_force(p, "--out")
    add_json(p, "the summary")
    p.add_argument("--print-suite", action="store_true",
                   help="print the shipped suite template and exit (copy it, then edit it)")
    p.set_defaults(_eval=_run_identity)
    _add_behaviour(sub)
    _add_persona(sub)


def _add_behaviour(sub) -> None:
    p = sub.add_parser("behaviour", help="behaviour rates (marker, regex, forbidden phrase, answer letter) "
                       "with Wilson intervals; paired comparisons between models",
                       description="Behaviour rates (see `pyfuse eval --help` and `--print-suite`).")
    add_model(p, "an mlx-lm model directory (repeatable: each further model is compared with the first)",
              action="append", default=None)
    p.add_argument("--suite", default=None, help="the behaviour suite (YAML or JSON)")
    p.add_argument("--samples", type=int, default=None, help="generations per prompt (overrides the suite)")
    p.add_argument("--temperature", type=float, default=None, help="0: greedy (overrides the suite)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (overrides the suite)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (overrides the suite)")
    p.add_argument("--max-tokens", type=int, default=None, help="generation budget (overrides the suite)")
    p.add_argument("--batch-size", type=int, default=None, help="generations per batch (overrides the suite)")
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level of the intervals (default: 0.05)")
    p.add_argument("--adapter-path", default=None, help="an unfused mlx-lm adapter to apply (to every --model)")
    add_out(p, "write one JSON line per generation (every model's)", metavar="RESULTS.jsonl")
    add_force(p, "--out")
    add_json(p, "the rates and comparisons")
    p.add_argument("--print-suite", action="store_true", help="print the suite template and exit")
    p.set_defaults(_eval=_run_behaviour)




def run(args: argparse.Namespace) -> int:
    return args._eval(args)


def _run_mc(args) -> int:
    from rich.table import Table

    from ..evals.mc import evaluate_mc

    r = evaluate_mc(args.model, args.data, method=args.method, batch_size=args.batch_size, limit=args.limit,
                    max_tokens=args.max_tokens, out=args.out, categories=args.categories,
                    system_prompt=args.system_prompt, answer_prefix=args.answer_prefix,
                    adapter_path=args.adapter_path, force=args.force)
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
                          adapter_path=args.adapter_path, control=args.control, force=args.force)
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


def _run_behaviour(args) -> int:
    from ..errors import UserError
    from ..evals.behaviour import compare_behaviour, default_suite_path, evaluate_behaviour
    from ..io.files import jsonl_text
    from ..io.outputs import check_file_destination, publish_text

    if args.print_suite:
        sys.stdout.write(default_suite_path().read_text(encoding="utf-8"))
        return 0
    if not args.model or args.suite is None:
        raise UserError("--model and --suite are required (or --print-suite)")
    if args.out:
        check_file_destination(args.out, args.force, "--out")  # before any work
    overrides = {k: getattr(args, k) for k in ("samples", "temperature", "top_p", "seed", "max_tokens",
                                               "batch_size")}
    results = [evaluate_behaviour(m, args.suite, adapter_path=args.adapter_path, alpha=args.alpha, **overrides)
               for m in args.model]
    comparisons = [compare_behaviour(r, results[0]) for r in results[1:]]
    if args.out:
        publish_text(args.out, jsonl_text([{"model": r.model, **row} for r in results for row in r.rows]),
                     args.force, "--out")
    if args.json:
        print(json.dumps({"results": [r.summary() for r in results],
                          "comparisons": [{"a": c.a, "b": c.b, "tests": c.tests} for c in comparisons]}, indent=2))
        return 0
    from rich.table import Table

    level = f"{100 * (1 - args.alpha):g} %"
    table = Table(title=f"behaviour rates ({level} Wilson intervals)", title_justify="left")
    table.add_column("behaviour")
    table.add_column("group")
    for i, r in enumerate(results):
        table.add_column(f"[{i}] {r.model}", justify="right")
    for name in results[0].rates:
        groups = [None, *results[0].rates[name]["per_group"]]
        for g in groups:
            cells = [_rate_cell(r.rates[name] if g is None else r.rates[name]["per_group"].get(g)) for r in results]
            table.add_row(name if g is None else "", "all" if g is None else g, *cells)
    console(min_width=120).print(table)
    for i, c in enumerate(comparisons, 1):
        tests = "; ".join(f"{n} {100 * t['diff']:+.1f} pts (McNemar p = {t['pvalue']:.3g}, {t['a_only']} vs "
                          f"{t['b_only']} discordant)" for n, t in c.tests.items())
        print(f"[{i}] vs [0]: {tests}")
    secs = sum(r.seconds or 0 for r in results)
    print(f"pyfuse eval behaviour: {len(results[0].rows)} generations per model in {secs:.1f} s"
          + (f"; wrote {args.out}" if args.out else ""))
    return 0


def _rate_cell(rate: dict | None) -> str:
    if rate is None or not rate["n"]:
        return "-"
    return f"{rate['k']}/{rate['n']} {100 * rate['rate']:.1f} % [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def _add_persona(sub) -> None:
    p = sub.add_parser("persona", help="persona check: forbidden phrases, markers, length; good vs bad examples",
                       description="The persona check (pyfuse.evals.persona): each prompt's greedy reply must hold "
                                   "no forbidden phrase, one of the markers (if any) and at most max_words words; "
                                   "and log P(good example) vs log P(bad example) says which voice the model "
                                   "prefers. Default suite: the persona recipe's three validation prompts "
                                   "(--print-suite shows it).")
    add_model(p, default=None)
    p.add_argument("--suite", default=None, help="the suite (YAML or JSON; default: the built-in example)")
    p.add_argument("--adapter-path", default=None, help="an unfused mlx-lm adapter to apply")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch (default: 8)")
    add_out(p, "write one JSON line per prompt", metavar="RESULTS.jsonl")
    add_force(p, "--out")
    add_json(p, "the summary")
    p.add_argument("--print-suite", action="store_true", help="print the built-in suite (YAML) and exit")
    p.set_defaults(_eval=_run_persona)


def _run_persona(args) -> int:
    from ..errors import UserError
    from ..evals.persona import BUILTIN_SUITE, evaluate_persona
    from ..io.files import jsonl_text
    from ..io.outputs import check_file_destination, publish_text

    if args.print_suite:
        import yaml

        sys.stdout.write(yaml.safe_dump(BUILTIN_SUITE, sort_keys=False, allow_unicode=True))
        return 0
    if args.model is None:
        raise UserError("--model is required")
    if args.out:
        check_file_destination(args.out, args.force, "--out")  # before any work
    r = evaluate_persona(args.model, args.suite, adapter_path=args.adapter_path, batch_size=args.batch_size)
    print_warnings("pyfuse eval persona", r.warnings)
    if args.out:
        publish_text(args.out, jsonl_text(r.rows), args.force, "--out")
    s = r.summary()
    if args.json:
        print(json.dumps({**s, "rows": r.rows}, indent=2))
        return 0
    for row in r.rows:
        verdict = "pass" if row["passes"] else "FAIL"
        why = ", ".join(filter(None, [f"forbidden {row['forbidden']}" if row["forbidden"] else "",
                                      "too long" if row["too_long"] else "",
                                      "" if row["marker"] else "no marker"]))
        print(f"[{verdict}] {row['prompt']}\n    -> {row['output'].strip()[:160]!r}"
              f"{' (' + why + ')' if why else ''}; prefers {'good' if row['prefers_good'] else 'bad'} "
              f"(margin {row['margin']:+.2f} nats)")
    print(f"pyfuse eval persona: {s['passed']}/{s['n']} replies pass, {s['prefers_good']}/{s['n']} prefer the "
          f"good example (mean margin {s['mean_margin']:+.2f} nats), {s['forbidden_hits']} with a forbidden phrase")
    return 0
