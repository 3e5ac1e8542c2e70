"""``pyfuse fuse``: a streaming drop-in for ``mlx_lm fuse``."""

from __future__ import annotations

from ..options import DEFAULT_GGUF_PATH, DEFAULT_POLICY, DEFAULT_RANGE_OVERFLOW, POLICIES, RANGE_OVERFLOW_ACTIONS
from ..errors import UserError
from ._args import (Default, add_force, add_json, add_model, add_quiet, add_seed, checked_list, comma_list,
                    console, given, print_warnings)

HELP = "fuse an mlx-lm LoRA/DoRA adapter into a (quantized) model, streaming, with a fidelity report"
DESCRIPTION = """\
Fuse an mlx-lm adapter directory into an mlx-lm model directory, like
`mlx_lm fuse` (its flags work as there), tensor by tensor: memory stays near
one tensor, untouched tensors are copied byte for byte, and the output
appears at --save-path only when complete. An adapter mlx-lm's loader
refuses (weights outside its config's num_layers or keys; DoRA on a
SwitchLinear without m) is refused; --lenient fuses it anyway. A full
fine-tune (fine_tune_type full) replaces the base's tensors with its trained
ones; a trained float weight of a module stored quantized is quantized by
--policy (mlx-lm cannot load that one). mlx-lm-lora's DoRA marker
(lora_parameters.use_dora) is read as fine_tune_type dora.

Re-quantization policies (--policy):
  stock       mlx_lm fuse's algorithm (dequantize, add the delta, re-quantize
              with MLX's quantizer): the same bytes for every fused tensor,
              except (1) DoRA on a bf16/fp16 model, where mlx-lm writes the
              layer's weight or scales and biases in float32 (its magnitude's
              dtype) and pyfuse keeps the model's dtype, and (2) bf16/fp16
              adapter tensors, which pyfuse multiplies in float32 (mlx-lm in
              their dtype; mlx_lm lora saves float32, where both agree)
  preserve    keep every group's scale and bias and move its codes by
              delta/scale: a zero adapter changes nothing. A group whose new
              codes leave [0, 2^bits-1] cannot keep its grid; --on-range-overflow
              says what it gets: refit (default: a new scale and bias fitted to
              its fused values, as stock does), clip (codes clamped, grid kept,
              the delta saturates) or error (refuse, naming the module). The
              share of such groups is printed, per module in --report
  stochastic  like preserve, with stochastic rounding seeded by --seed: the
              delta survives in expectation (same range rule)
  calibrated  keep every group's scale and bias; GPTQ-style error-feedback
              rounding steered by X^T X of each module's inputs (per expert),
              from running the base model over --calibration DATA.jsonl; a zero
              adapter changes nothing. A group whose nearest codes leave the
              range gets --on-range-overflow as under preserve (refit first)

Where else the output differs from mlx_lm fuse: modules the adapter config
names but holds no weights for are left byte-identical (mlx-lm re-quantizes
them with a zero delta); the shard layout, tokenizer files and config.json
are kept (config.json changes only with --dequantize / --requant-*).

Under mlx.launch (docs/distributed.md) every rank fuses its share of the
modules and rank 0 writes the model: the same bytes as one process.

--requant-bits B with preserve/stochastic/calibrated first moves the base
exactly onto the finer grid (scale / 2^m, codes * 2^m: every dequantized
weight bit-identical), so the delta lands on 2^m-times finer steps.

--compare-policies fuses the adapter under stock, preserve, stochastic and
calibrated (calibrated with --calibration only), each on the stored grid and
refined to --requant-bits (default 8), into temporary directories (under
$TMPDIR) that are removed (no model is written), and prints per policy x grid: weight
retention, output error and output retention on held-out calibration tokens
(with --calibration), KL(unfused || fused) per token and top-1 agreement
against the base model with the adapter applied unfused (on
--agreement-prompts, or the held-out calibration sequences), the share of
weights the adapter's zero-delta twin changes, and the bytes added; --json
prints it as JSON. --save-path and --policy are refused then.

  pyfuse fuse --model M --adapter-path A --compare-policies --calibration calib.jsonl

A table of what survived re-quantization is printed (retention = share of
the adapter's delta that is really in the fused weights, noise = the rest of
the change in units of the delta); --report writes every figure as JSON.
"""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"model": "--model", "adapter_path": "--adapter-path", "agreement_prompts": "--agreement-prompts"}
OUTPUTS = {"save_path": "--save-path", "report": "--report"}
NESTED_OK = [("--report", "--save-path")]  # the report may go into the new model directory


def add_arguments(p) -> None:
    add_model(p, "the mlx-lm model directory, or a Hugging Face repo id resolved like mlx-lm does "
                 "(the local cache first) (default: mlx_model)", default="mlx_model")
    p.add_argument("--adapter-path", default="adapters",
                   help="the adapter directory: adapter_config.json + adapters.safetensors, LoRA, "
                        "DoRA or a full fine-tune (default: adapters)")
    p.add_argument("--save-path", default=Default("fused_model"),
                   help="where to write the fused model (default: fused_model)")
    p.add_argument("--dequantize", action="store_true",
                   help="write a full-precision model (every quantized module), as mlx_lm fuse --dequantize")
    p.add_argument("--export-gguf", action="store_true",
                   help="also write the fused model as GGUF with mlx-lm's export (llama, mixtral, mistral; "
                        "full precision: add --dequantize for a quantized model)")
    p.add_argument("--gguf-path", default=DEFAULT_GGUF_PATH,
                   help=f"the GGUF file, inside --save-path (default: {DEFAULT_GGUF_PATH})")
    p.add_argument("--upload-repo", default=None, metavar="REPO",
                   help="then upload --save-path to this Hugging Face repo (mlx-lm's upload_to_hub)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accept a model whose config.json names a custom architecture module "
                        "(model_file), as mlx_lm fuse does with this flag (pyfuse runs none of it)")
    p.add_argument("--policy", "--requant", dest="policy", choices=POLICIES, default=Default(DEFAULT_POLICY),
                   help=f"re-quantization policy for fused quantized tensors (default: {DEFAULT_POLICY}; "
                        "--requant is its older name)")
    add_seed(p, "seed of --policy stochastic")
    p.add_argument("--on-range-overflow", choices=RANGE_OVERFLOW_ACTIONS, default=DEFAULT_RANGE_OVERFLOW,
                   help="preserve/stochastic/calibrated: what a group whose fused values leave its grid's "
                        "range gets: "
                        "refit (a new scale and bias fitted to its values), clip (codes clamped to "
                        "[0, 2^bits-1], scale and bias kept) or error (refuse, naming the module) "
                        f"(default: {DEFAULT_RANGE_OVERFLOW})")
    p.add_argument("--calibration", metavar="DATA.jsonl", default=None,
                   help="mlx-lm data (text, messages or prompt/completion rows; a .jsonl file or a data "
                        "directory) run through the base model once for X^T X per fused module and expert: "
                        "it steers --policy calibrated (which needs it); every 4th sequence is held out for "
                        "the report's output error and output retention per module (under every policy) and "
                        "is --agreement-prompts' default (with --compare-policies: for every row)")
    p.add_argument("--calibration-min-tokens", type=int, default=None, metavar="N",
                   help="experts with fewer calibration tokens are rounded plainly (default: the module's "
                        "number of inputs, at least 32: fewer leave X^T X rank-deficient)")
    p.add_argument("--damp", type=float, default=None,
                   help="--policy calibrated: H + damp * mean(diag H) * I is inverted (default: 0.01)")
    p.add_argument("--agreement-prompts", metavar="DATA.jsonl", default=None,
                   help="mlx-lm data (text, messages or prompt/completion rows; a .jsonl file or a data "
                        "directory) on which the fused model's next-token distributions are compared with "
                        "the base model's with the adapter applied unfused: KL(unfused || fused) per token and "
                        "top-1 agreement, printed and in --report (default with --calibration: its held-out "
                        "sequences)")
    p.add_argument("--no-agreement", dest="agreement", action="store_false",
                   help="skip that comparison (it loads the base model and the fused model once more)")
    p.add_argument("--report", metavar="FILE.json", default=None,
                   help="write the fidelity report (every tensor and a summary) as JSON")
    p.add_argument("--requant-bits", type=int, default=None, metavar="N",
                   help="re-quantize the fused tensors with N bits (recorded per module in config.json)")
    p.add_argument("--requant-group-size", type=int, default=None, metavar="G",
                   help="re-quantize the fused tensors with group size G")
    p.add_argument("--refine-headroom", action="store_true",
                   help="with --requant-bits under preserve/stochastic/calibrated: move each refined group's "
                        "codes off 0 (bias z - k*scale) where mx.dequantize on this device gives every weight "
                        "bit for bit, so a delta lowering a code-0 weight needs no re-fit (exact under MLX's "
                        "unfused dequantize rule only; see docs/faithful_fuse.md)")
    p.add_argument("--only", metavar="REGEX", default=None,
                   help="fuse only the modules whose path matches REGEX (e.g. 'layers\\.(10|11)\\.')")
    p.add_argument("--layers", default=None, metavar="GROUP|RANGE",
                   help="fuse only these transformer blocks: early, middle, late (thirds), all, or indices "
                        "like '0-3,8' (negative: from the end)")
    p.add_argument("--modules", type=comma_list, default=None, metavar="GLOB[,GLOB...]",
                   help="fuse only modules whose whole path matches a glob (e.g. '*.self_attn.*')")
    p.add_argument("--link-unchanged", action="store_true",
                   help="hard-link (or copy) the shards that hold no fused tensor")
    add_force(p, "--save-path (and --report)")
    p.add_argument("--lenient", action="store_true",
                   help="fuse adapter modules mlx-lm's loader refuses (outside the adapter config's "
                        "num_layers/keys, DoRA on SwitchLinear without m) instead of refusing the "
                        "adapter; they are listed in a warning and the report")
    p.add_argument("--exact-report", action="store_true",
                   help="measure every weight for the report (default: tensors over 2M weights are "
                        "measured on evenly spaced rows; slower on CPU)")
    p.add_argument("--compare-policies", nargs="?", const="all", default=None, metavar="P,...",
                   help="write no model: fuse under every policy (or these), on the stored grid and refined "
                        "to --requant-bits (default 8), and print what each keeps and costs (see above)")
    add_json(p, "the --compare-policies table")
    add_quiet(p, "print no table, only warnings and errors")


# Flags that ask for an output, which --compare-policies does not write.
_WRITING = {"dequantize": "--dequantize", "export_gguf": "--export-gguf", "upload_repo": "--upload-repo",
            "report": "--report"}
# Flags --compare-policies has no use for; refused only when given (their defaults are Default).
_IGNORED = {"save_path": "--save-path", "policy": "--policy"}


def run_compare(args) -> int:
    from ..fuse.compare import compare_policies, format_comparison, legend

    asked = [flag for dest, flag in _WRITING.items() if getattr(args, dest)]
    if asked:
        raise UserError(f"--compare-policies writes no model: {', '.join(asked)} cannot be combined with it")
    if explicit := [flag for dest, flag in _IGNORED.items() if given(args, dest)]:
        raise UserError(f"--compare-policies writes no model and runs every policy (or those it names): "
                        f"{', '.join(explicit)} cannot be combined with it")
    policies = None if args.compare_policies == "all" else checked_list(args.compare_policies, "--compare-policies")
    result = compare_policies(
        args.model, args.adapter_path, policies=policies, requant_bits=args.requant_bits,
        calibration=args.calibration, calibration_min_tokens=args.calibration_min_tokens,
        agreement_prompts=args.agreement_prompts, agreement=args.agreement,
        seed=args.seed, on_range_overflow=args.on_range_overflow, only=args.only, layers=args.layers,
        modules=args.modules, lenient=args.lenient, trust_remote_code=args.trust_remote_code,
        requant_group_size=args.requant_group_size, damp=args.damp, refine_headroom=args.refine_headroom,
        **({"report_sample": None} if args.exact_report else {}))
    if args.json:
        import json

        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if not args.quiet:
        console(min_width=150).print(format_comparison(result))
        print("\n".join(legend(result)))
    print_warnings("pyfuse fuse", result.warnings, label="note")
    return 0


def run(args) -> int:
    if args.compare_policies is not None:
        return run_compare(args)
    if args.json:
        raise UserError("--json prints the --compare-policies table; the fuse's report is --report FILE.json")
    from ..fuse import format_table, fuse_model
    from ..fuse.agreement import format_agreement

    result = fuse_model(
        args.model, args.adapter_path, args.save_path,
        dequantize=args.dequantize, policy=args.policy, seed=args.seed, report=args.report,
        requant_bits=args.requant_bits, requant_group_size=args.requant_group_size,
        only=args.only, layers=args.layers, modules=args.modules, link_unchanged=args.link_unchanged,
        force=args.force, lenient=args.lenient,
        on_range_overflow=args.on_range_overflow, export_gguf=args.export_gguf, gguf_path=args.gguf_path,
        upload_repo=args.upload_repo, trust_remote_code=args.trust_remote_code,
        calibration=args.calibration, calibration_min_tokens=args.calibration_min_tokens, damp=args.damp,
        agreement_prompts=args.agreement_prompts, agreement=args.agreement, refine_headroom=args.refine_headroom,
        **({"report_sample": None} if args.exact_report else {}),
    )
    s = result.summary
    if not args.quiet and result.report["tensors"]:
        longest = max(len(r["name"]) for r in result.report["tensors"])
        console(min_width=longest + 90).print(format_table(result.report))
    print_warnings("pyfuse fuse", s["warnings"])
    if (line := format_agreement(s)) is not None:
        print(f"pyfuse fuse: {line}")
    extra = []
    if s["configured_without_weights"]:
        extra.append(f"{len(s['configured_without_weights'])} configured without weights")
    if s["excluded_by_only"]:
        extra.append(f"{len(s['excluded_by_only'])} excluded by --only/--layers/--modules")
    if s.get("replaced"):
        extra.append(f"{len(s['replaced'])} tensor(s) replaced by the full fine-tune")
    if s["dequantized_modules"]:
        extra.append(f"{s['dequantized_modules']} more dequantized")
    print(f"pyfuse fuse: wrote {result.save_path} ({s['modules_fused']} module(s) fused, "
          f"--policy {s['policy']}" + "".join(f", {e}" for e in extra) + f", {s['seconds']:.1f} s)"
          + (f"; report: {result.report_path}" if result.report_path else "")
          + (f"; GGUF: {result.gguf_path}" if result.gguf_path else "")
          + (f"; uploaded to {args.upload_repo}" if args.upload_repo else ""))
    return 0
