"""``pyfuse fuse``: a streaming drop-in for ``mlx_lm fuse``."""

from __future__ import annotations

from ..options import DEFAULT_POLICY, POLICIES
from ._args import add_force, add_model, add_quiet, add_seed, console, print_warnings

HELP = "fuse an mlx-lm LoRA/DoRA adapter into a (quantized) model, streaming, with a fidelity report"
DESCRIPTION = """\
Fuse an mlx-lm adapter directory into an mlx-lm model directory, like
`mlx_lm fuse` (same --model/--adapter-path/--save-path/--dequantize flags),
tensor by tensor: memory stays near one tensor, untouched tensors are copied
byte for byte, and the output appears at --save-path only when complete.

Re-quantization policies (--policy):
  stock       what mlx_lm fuse does (dequantize, add the delta, re-quantize);
              bit-identical to it for every fused tensor
  preserve    keep every group's scale and bias; a zero adapter changes nothing
  stochastic  like preserve, with stochastic rounding seeded by --seed: the
              delta survives in expectation
  calibrated  keep every group's scale and bias; GPTQ-style error-feedback
              rounding steered by X^T X of each module's inputs (per expert),
              from running the base model over --calibration DATA.jsonl; a zero
              adapter changes nothing

--requant-bits B with preserve/stochastic/calibrated first moves the base
exactly onto the finer grid (scale / 2^m, codes * 2^m: every dequantized
weight bit-identical), so the delta lands on 2^m-times finer steps.

A table of what survived re-quantization is printed (retention = share of
the adapter's delta that is really in the fused weights, noise = the rest of
the change in units of the delta); --report writes every figure as JSON.
"""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"model": "--model", "adapter_path": "--adapter-path"}
OUTPUTS = {"save_path": "--save-path", "report": "--report"}
NESTED_OK = [("--report", "--save-path")]  # the report may go into the new model directory

def add_arguments(p) -> None:
    add_model(p, "the mlx-lm model directory (default: mlx_model)", default="mlx_model")
    p.add_argument("--adapter-path", default="adapters",
                   help="the adapter directory: adapter_config.json + adapters.safetensors "
                        "(default: adapters)")
    p.add_argument("--save-path", default="fused_model",
                   help="where to write the fused model (default: fused_model)")
    p.add_argument("--dequantize", action="store_true",
                   help="write a full-precision model (every quantized module), as mlx_lm fuse --dequantize")
    p.add_argument("--policy", "--requant", dest="policy", choices=POLICIES, default=DEFAULT_POLICY,
                   help=f"re-quantization policy for fused quantized tensors (default: {DEFAULT_POLICY}; "
                        "--requant is its older name)")
    add_seed(p, "seed of --policy stochastic")
    p.add_argument("--calibration", metavar="DATA.jsonl", default=None,
                   help="--policy calibrated: mlx-lm data (text, messages or prompt/completion rows; a .jsonl "
                        "file or a data directory) run through the base model once for X^T X per fused "
                        "module and expert; every 4th sequence is held out for the report's output error")
    p.add_argument("--calibration-min-tokens", type=int, default=None, metavar="N",
                   help="experts with fewer calibration tokens are rounded plainly (default: the module's "
                        "number of inputs, at least 32: fewer leave X^T X rank-deficient)")
    p.add_argument("--damp", type=float, default=None,
                   help="--policy calibrated: H + damp * mean(diag H) * I is inverted (default: 0.01)")
    p.add_argument("--report", metavar="FILE.json", default=None,
                   help="write the fidelity report (every tensor and a summary) as JSON")
    p.add_argument("--requant-bits", type=int, default=None, metavar="N",
                   help="re-quantize the fused tensors with N bits (recorded per module in config.json)")
    p.add_argument("--requant-group-size", type=int, default=None, metavar="G",
                   help="re-quantize the fused tensors with group size G")
    p.add_argument("--only", metavar="REGEX", default=None,
                   help="fuse only the modules whose path matches REGEX (e.g. 'layers\\.(10|11)\\.')")
    p.add_argument("--link-unchanged", action="store_true",
                   help="hard-link (or copy) the shards that hold no fused tensor")
    add_force(p, "--save-path")
    p.add_argument("--exact-report", action="store_true",
                   help="measure every weight for the report (default: tensors over 2M weights are "
                        "measured on evenly spaced rows; slower on CPU)")
    add_quiet(p, "print no table, only warnings and errors")


def run(args) -> int:
    from ..fuse import format_table, fuse_model

    result = fuse_model(
        args.model, args.adapter_path, args.save_path,
        dequantize=args.dequantize, policy=args.policy, seed=args.seed, report=args.report,
        requant_bits=args.requant_bits, requant_group_size=args.requant_group_size,
        only=args.only, link_unchanged=args.link_unchanged, force=args.force,
        calibration=args.calibration, calibration_min_tokens=args.calibration_min_tokens, damp=args.damp,
        **({"report_sample": None} if args.exact_report else {}),
    )
    s = result.summary
    if not args.quiet and result.report["tensors"]:
        longest = max(len(r["name"]) for r in result.report["tensors"])
        console(min_width=longest + 90).print(format_table(result.report))
    print_warnings("pyfuse fuse", s["warnings"])
    extra = []
    if s["configured_without_weights"]:
        extra.append(f"{len(s['configured_without_weights'])} configured without weights")
    if s["excluded_by_only"]:
        extra.append(f"{len(s['excluded_by_only'])} excluded by --only")
    if s["dequantized_modules"]:
        extra.append(f"{s['dequantized_modules']} more dequantized")
    print(f"pyfuse fuse: wrote {result.save_path} ({s['modules_fused']} module(s) fused, "
          f"--policy {s['policy']}" + "".join(f", {e}" for e in extra) + f", {s['seconds']:.1f} s)"
          + (f"; report: {result.report_path}" if result.report_path else ""))
    return 0
