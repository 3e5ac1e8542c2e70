"""``pyfuse demo``: the stacking-confound experiment on the built-in tiny model."""

from __future__ import annotations

import sys
import time

from ._args import add_out, add_quiet, console

HELP = "run the stacking-confound experiment end to end on a built-in tiny MoE model (no download)"
DESCRIPTION = """\
Runs the whole stacking-confound study on pyfuse's built-in default model (a
tiny 3-bit MoE, built in under a minute on first use and cached in
$PYFUSE_CACHE or ~/.cache/pyfuse; no download): a persona LoRA fused into the
base, Set-G mining (the items base and persona both get wrong), a factual
LoRA trained on Set-G and fused with stock re-quantization (A1), its
zero-delta twin through the identical pipeline (A0), the same two with the
`preserve` policy, the adapter unfused and fused with `stochastic` rounding,
two null distributions (placebo adapters, dithered zero-delta fuses), the
power of the design before any data, the evaluations (multiple choice on
Set-G test and a stratified sample, identity), the noise floor of every
fuse, Holm-adjusted statistics, flips by margin and the pre-registered
verdict ("A1 - A0 >= 5 points and McNemar p < 0.05"), which it prints last.

Writes OUT/results.json, OUT/report.md (with plots) and OUT/demo.yaml, the
experiment spec it ran: copy it to run the same study on your own model with
`pyfuse experiment run`. Running the command again on the same OUT resumes
(finished steps are skipped: seconds).

  pyfuse demo                     about 3 minutes of CPU once the model is built, into ./pyfuse-demo
  pyfuse demo --out runs/demo     elsewhere
  pyfuse demo --quick             a reduced configuration (about a minute once the model is built)"""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {}
OUTPUTS = {"out": "--out", "cache": "--cache"}

def add_arguments(p) -> None:
    add_out(p, "the run directory (created; reused to resume; default: ./pyfuse-demo)", default="pyfuse-demo")
    p.add_argument("--quick", action="store_true",
                   help="a reduced configuration (fewer items, a shorter identity suite, fewer training steps)")
    p.add_argument("--keep-models", action="store_true",
                   help="keep every fused model in OUT/steps (default: remove those no pending step needs)")
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="where the default model is built and cached (default: $PYFUSE_CACHE or ~/.cache/pyfuse)")
    add_quiet(p, "print only the verdict")


def run(args) -> int:
    from ..demo.run import details, run_demo

    err = console(stderr=True)
    started = time.monotonic()
    echo = (lambda msg: None) if args.quiet else (lambda msg: err.print(f"pyfuse demo: {msg}"))
    res = run_demo(args.out, quick=args.quick, keep_models=args.keep_models, cache=args.cache, echo=echo)
    run_ = res.run
    if not args.quiet:
        err.print(f"pyfuse demo: {len(run_.executed)} step(s) run, {len(run_.skipped)} already done, "
                  f"in {time.monotonic() - started:.1f} s")
    out = sys.stdout
    if not args.quiet:
        print("", file=out)
        for line in details(res.results):
            print(line, file=out)
        for w in (res.results.get("verdict") or {}).get("warnings", []):
            print(f"Warning: {w}", file=out)
        print("", file=out)
    print(f"Verdict: {res.summary}", file=out)
    print(f"Report: {res.out / 'report.md'}", file=out)
    return 0
