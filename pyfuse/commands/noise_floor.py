"""``pyfuse noise-floor``: the re-quantization noise floor of a model."""

from __future__ import annotations

import shlex
import sys

from ..errors import UserError

HELP = "measure what a zero-delta fuse changes (weights and outputs) per group size, bits and policy"
DESCRIPTION = """\
Measure the re-quantization noise floor of an mlx-lm model: how much a fuse
changes the model when the adapter contributes nothing, and (with
--adapter-path) how much of a real adapter survives.

For each group size x bits x policy: a zero-delta fuse of every quantized
tensor through pyfuse's kernel (--rounds K successive fuses: what stacking
K adapters does), compared with the baseline:
  weights changed   share of weights whose dequantized value changed
  codes changed     share whose integer code changed
  rel. error        ||change|| / ||W||;  max abs: the largest |change|
  retention, noise  (--adapter-path) share of the adapter's delta that
                    survives, and the rest of the change in units of it
  KL mean / p99     KL(baseline || fused) of next-token distributions on a
                    prompt set (built-in, or --prompts JSONL), teacher-forced
  top-1 flip        share of positions whose most likely token changes
  MC flip           (--mc, MMLU-Pro rows) share of items whose answer flips:
                    the answer `pyfuse eval mc --method logprob` gives

The baseline: a full-precision model is quantized at each setting (mlx-lm's
quantize_model); a quantized model is measured as stored at its own setting
(source "model", each module at its own bits and group size) and, from its
dequantized weights, at the others (source "requantized"). Figures describe the model after all --rounds fuses; the
JSON's "drift" lists every round.

Writes --out/noise_floor.json, noise_floor.md, noise_floor_tensors.jsonl,
noise_floor_mc.jsonl (with --mc: every item's answer and option
log-probabilities, baseline and fused) and PNG plots.

  pyfuse noise-floor --model mlx_model --bits 3,4 --group-sizes 64 --out nf
"""


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="the mlx-lm model directory (full precision or quantized)")
    p.add_argument("--group-sizes", default="32,64,128", metavar="G,...",
                   help="group sizes to measure (default: 32,64,128)")
    p.add_argument("--bits", default="2,3,4,5,6,8", metavar="B,...",
                   help="bit widths to measure (default: 2,3,4,5,6,8)")
    p.add_argument("--policies", default="stock,preserve,stochastic", metavar="P,...",
                   help="re-quantization policies (default: stock,preserve,stochastic)")
    p.add_argument("--rounds", type=int, default=1, metavar="K",
                   help="successive zero-delta fuses (default: 1)")
    p.add_argument("--adapter-path", default=None, metavar="DIR",
                   help="an mlx-lm adapter directory: report its retention and noise per setting")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='prompts for the output level: {"text": ...} or {"messages": [...]} rows '
                        "(default: a built-in dozen)")
    p.add_argument("--mc", default=None, metavar="FILE",
                   help="MMLU-Pro rows (JSONL or Parquet): report the share of answers (as `pyfuse eval mc "
                        "--method logprob` scores them) that flip")
    p.add_argument("--mc-limit", type=int, default=None, metavar="N", help="use the first N --mc items")
    p.add_argument("--no-outputs", dest="outputs", action="store_false",
                   help="weights only: no tokenizer, no forward passes")
    p.add_argument("--out", default="noise_floor", metavar="DIR",
                   help="output directory (default: noise_floor)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stochastic policy (default: 0)")
    p.add_argument("--quiet", action="store_true", help="do not print the table")


def _list(text: str, name: str, cast=int) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"{name}: empty list")
    if cast is int:
        out = []
        for t in items:
            try:
                out.append(int(t))
            except ValueError:
                raise UserError(f"{name}: {t!r} is not an integer") from None
        return out
    return items


def _command_line(args) -> str:
    """The command that reproduces this run (for the Markdown report)."""
    parts = ["pyfuse", "noise-floor", "--model", str(args.model)]
    defaults = {"group_sizes": "32,64,128", "bits": "2,3,4,5,6,8", "policies": "stock,preserve,stochastic",
                "rounds": 1, "adapter_path": None, "prompts": None, "mc": None, "mc_limit": None, "seed": 0}
    for key, default in defaults.items():
        value = getattr(args, key)
        if value != default:
            parts += ["--" + key.replace("_", "-"), str(value)]
    if not args.outputs:
        parts.append("--no-outputs")
    parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    from ..noise_floor.measure import format_markdown, measure_noise_floor, write_outputs

    result = measure_noise_floor(
        args.model,
        group_sizes=_list(args.group_sizes, "--group-sizes"),
        bits=_list(args.bits, "--bits"),
        policies=_list(args.policies, "--policies", cast=str),
        rounds=args.rounds,
        adapter_path=args.adapter_path,
        prompts=args.prompts,
        mc=args.mc,
        mc_limit=args.mc_limit,
        outputs=args.outputs,
        out=None,
        seed=args.seed,
    )
    command = _command_line(args)
    files = write_outputs(result, args.out, command=command)
    if not args.quiet:
        from rich.console import Console
        from rich.markdown import Markdown

        table = format_markdown(result)
        Console(width=max(120, Console().width)).print(Markdown(table))
    else:  # the table's notes carry the warnings otherwise
        for w in result.warnings:
            print(f"pyfuse noise-floor: note: {w}", file=sys.stderr)
    print(f"pyfuse noise-floor: {len(result.rows)} rows in {result.meta['seconds']:.1f} s; wrote "
          + ", ".join(str(p) for p in files.values()))
    return 0
