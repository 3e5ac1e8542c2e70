"""``pyfuse noise-floor``: the re-quantization noise floor of a model."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..options import DATA_FREE_POLICIES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from ._args import add_force, add_model, add_out, add_quiet, add_seed, checked_list, console, print_warnings

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
  adapter KL, top-1 (--adapter-path, with the output level) the adapter's
                    fuse at each setting against the model as given with the
                    adapter applied unfused (mlx-lm's loader), on the same
                    prompts as KL mean: per-token KL(unfused || fused) and
                    top-1 agreement
  adapter out. err. (--adapter-path and --calibration DATA) per fused module,
                    ||X (W_hat - W - delta)|| / ||X delta|| on the held-out
                    calibration tokens (every 4th sequence; 1 = as bad as
                    dropping the adapter), and the output retention; mean
                    over the adapter's modules, as `pyfuse fuse --calibration`
                    reports them per module

The baseline: a full-precision model is quantized at each setting (mlx-lm's
quantize_model); a quantized model is measured as stored at its own setting
(source "model", each module at its own bits and group size) and, from its
dequantized weights, at the others (source "requantized"). Figures describe the model after all --rounds fuses; the
JSON's "drift" lists every round.

Writes --out/noise_floor.json, noise_floor.md, noise_floor_tensors.jsonl,
noise_floor_mc.jsonl (with --mc: every item's answer and option
log-probabilities, baseline and fused) and PNG plots; the directory is
published whole at the end, and an existing one is replaced only with --force.

  pyfuse noise-floor --model mlx_model --bits 3,4 --group-sizes 64 --out nf
"""


# The list flags measure every supported setting unless told otherwise.
_LIST_DEFAULTS = {"group_sizes": ",".join(map(str, SUPPORTED_GROUP_SIZES)),
                  "bits": ",".join(map(str, SUPPORTED_BITS)), "policies": ",".join(DATA_FREE_POLICIES)}


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"model": "--model", "adapter_path": "--adapter-path", "calibration": "--calibration",
          "prompts": "--prompts", "mc": "--mc"}
OUTPUTS = {"out": "--out"}

def add_arguments(p) -> None:
    add_model(p, "the mlx-lm model directory (full precision or quantized)")
    p.add_argument("--group-sizes", default=_LIST_DEFAULTS["group_sizes"], metavar="G,...",
                   help=f"group sizes to measure (default: {_LIST_DEFAULTS['group_sizes']})")
    p.add_argument("--bits", default=_LIST_DEFAULTS["bits"], metavar="B,...",
                   help=f"bit widths to measure (default: {_LIST_DEFAULTS['bits']})")
    p.add_argument("--policies", default=_LIST_DEFAULTS["policies"], metavar="P,...",
                   help=f"re-quantization policies (default: {_LIST_DEFAULTS['policies']})")
    p.add_argument("--rounds", type=int, default=1, metavar="K",
                   help="successive zero-delta fuses (default: 1)")
    p.add_argument("--adapter-path", default=None, metavar="DIR",
                   help="an mlx-lm adapter directory: report its retention and noise per setting")
    p.add_argument("--calibration", default=None, metavar="DATA",
                   help="mlx-lm data (.jsonl or data directory: text, messages or prompt/completion rows), "
                        "with --adapter-path: the adapter fuse's output error and retention per setting on "
                        "its held-out sequences (the KL stays on the --prompts)")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help='prompts for the output level: {"text": ...} or {"messages": [...]} rows '
                        "(default: a built-in dozen)")
    p.add_argument("--mc", default=None, metavar="FILE",
                   help="MMLU-Pro rows (JSONL or Parquet): report the share of answers (as `pyfuse eval mc "
                        "--method logprob` scores them) that flip")
    p.add_argument("--mc-limit", type=int, default=None, metavar="N", help="use the first N --mc items")
    p.add_argument("--no-outputs", dest="outputs", action="store_false",
                   help="weights only: no tokenizer, no forward passes")
    add_out(p, "output directory (default: noise_floor)", default="noise_floor")
    add_force(p, "--out")
    add_seed(p, "seed of the stochastic policy")
    add_quiet(p, "do not print the table")


def _command_line(args) -> str:
    """The command that reproduces this run (for the Markdown report)."""
    parts = ["pyfuse", "noise-floor", "--model", str(args.model)]
    defaults = {**_LIST_DEFAULTS, "rounds": 1, "adapter_path": None, "calibration": None, "prompts": None,
                "mc": None,
                "mc_limit": None, "seed": 0}
    for key, default in defaults.items():
        value = getattr(args, key)
        if value != default:
            parts += ["--" + key.replace("_", "-"), str(value)]
    if not args.outputs:
        parts.append("--no-outputs")
    parts += ["--out", str(args.out)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    from ..io.outputs import check_destination, staged_dir
    from ..noise_floor.measure import format_markdown, measure_noise_floor, write_outputs

    group_sizes = checked_list(args.group_sizes, "--group-sizes", cast=int)
    bits = checked_list(args.bits, "--bits", cast=int)
    policies = checked_list(args.policies, "--policies")
    check_destination(args.out, args.force, "--out")  # before any work
    result = measure_noise_floor(
        args.model,
        group_sizes=group_sizes,
        bits=bits,
        policies=policies,
        rounds=args.rounds,
        adapter_path=args.adapter_path,
        calibration=args.calibration,
        prompts=args.prompts,
        mc=args.mc,
        mc_limit=args.mc_limit,
        outputs=args.outputs,
        out=None,
        seed=args.seed,
    )
    command = _command_line(args)
    with staged_dir(args.out, args.force, "--out") as tmp:  # the whole directory, or nothing
        files = {name: Path(args.out) / p.name for name, p in write_outputs(result, tmp, command=command).items()}
    if not args.quiet:
        from rich.markdown import Markdown

        console(min_width=120).print(Markdown(format_markdown(result)))
    else:  # the table's notes carry the warnings otherwise
        print_warnings("pyfuse noise-floor", result.warnings, label="note")
    print(f"pyfuse noise-floor: {len(result.rows)} rows in {result.meta['seconds']:.1f} s; wrote "
          + ", ".join(str(p) for p in files.values()))
    return 0
