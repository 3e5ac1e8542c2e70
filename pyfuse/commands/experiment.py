"""``pyfuse experiment run|validate|report``: declarative experiments."""

from __future__ import annotations

import sys

from ._args import add_out, add_quiet, console, print_warnings

HELP = "run, validate or report a declarative experiment (conditions, zero-delta controls, pre-registration)"
DESCRIPTION = """\
Declarative experiments (a YAML spec): models and data, conditions built
from ordered stages (train an adapter, make its zero-delta twin, fuse it with
a policy, stack another adapter), evaluation suites (multiple choice,
identity), Set-G mining, comparisons and a pre-registered criterion.

  pyfuse experiment validate SPEC.yaml        check the spec (field-named errors; missing paths listed)
  pyfuse experiment run SPEC.yaml --out DIR   run or resume it: DIR/results.json, DIR/report.md
  pyfuse experiment report DIR                rewrite DIR/report.md and its plots

Before any model runs, validate and run print the predicted n of every
multiple-choice dataset (from the data and the split) and, for every threshold of
the pre-registered criterion, the minimum detectable effect at that n, unpaired
(two-proportion) and paired (McNemar, from an expected discordance rate); a
criterion that cannot detect its own threshold is refused unless the spec says
allow_underpowered: true with a reason. Then the pre-registration (criterion,
tests, family, alpha, thresholds, split rule, design, the power table and the
SHA-256 of every data file) is written to DIR/prereg.json as canonical JSON and
hashed (SHA-256); the Set-G split seed is int(sha256[:8], 16). A later run whose
pre-registration or data differ refuses to continue in DIR, and so does report.
Every step's output is content-addressed, published atomically and hashed: a
rerun checks and skips finished steps, and a run killed at any moment resumes
where it stopped. Fused models no longer needed are removed unless --keep-models.

Across processes or Macs: mlx.launch --hostfile hosts.json -- pyfuse experiment
run SPEC --out DIR (DIR on a filesystem every host shares): rank 0 runs the plan
and writes everything, every rank scores its share of each multiple-choice
evaluation and fuses its share of each fuse's modules; the outputs are those
of one process (docs/distributed.md). --data-parallel-train also shares the
training (equal to one process to float rounding only).

Examples: examples/stacking-confound.yaml, examples/identity-stacking.yaml."""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"spec": "SPEC"}
OUTPUTS = {"out": "--out"}

def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    r = sub.add_parser("run", help="run (or resume) an experiment")
    r.add_argument("spec", metavar="SPEC.yaml")
    add_out(r, "the run directory (created; reused to resume)", required=True)
    r.add_argument("--keep-models", action="store_true",
                   help="keep every fused model (default: remove those no pending step needs)")
    r.add_argument("--data-parallel-train", action="store_true",
                   help="under mlx.launch: train steps on every rank, each on its share of every batch (the "
                        "batch size a multiple of the ranks); the adapters then equal one process's to float "
                        "rounding, not bit for bit (default: training on rank 0 alone; no effect without a "
                        "launcher)")
    add_quiet(r, "print only warnings, errors and the verdict")
    v = sub.add_parser("validate", help="check a spec without running it")
    v.add_argument("spec", metavar="SPEC.yaml")
    v.add_argument("--strict", action="store_true", help="missing model/data/suite paths are errors too")
    rp = sub.add_parser("report", help="rewrite DIR/report.md and its plots")
    rp.add_argument("dir", metavar="DIR")
    p.set_defaults(_experiment_parser=p)


def run(args) -> int:
    action = getattr(args, "action", None)
    if action is None:
        args._experiment_parser.print_help()
        return 2
    return {"run": _run, "validate": _validate, "report": _report}[action](args)


def _validate(args) -> int:
    from ..experiment.load import load_checked_spec
    from ..experiment.power import power_lines
    from ..experiment.prereg import check_power
    from ..experiment.validate import missing_paths

    spec = load_checked_spec(args.spec, check_paths=args.strict)
    missing = missing_paths(spec)
    stages = sum(len(c.stages) for c in spec.conditions.values())
    prog = "pyfuse experiment validate"
    print(f"{prog}: {args.spec} is valid ({len(spec.conditions)} conditions, {stages} stages, "
          f"{len(spec.comparisons)} comparisons"
          + (", pre-registered" if spec.preregistration else ", no pre-registration") + ")")
    print_warnings(prog, [f"{where}: {what} does not exist (yet): {path}" for where, what, path in missing],
                   label="note")
    if missing:
        print(f"{prog}: {len(missing)} path(s) must exist before `run`", file=sys.stderr)
    if spec.preregistration is None and spec.comparisons:
        print_warnings(prog, ["comparisons without a preregistration section are exploratory "
                              "(no locked criterion, no verdict)"])
    for line in power_lines(spec):
        print(f"{prog}: {line}")
    if spec.preregistration is not None:
        rows = check_power(spec)  # refuses what `run` would refuse to lock
        print_warnings(prog, [f"under-powered design (allowed: {spec.preregistration.underpowered_reason}): "
                              f"{r['text']}" for r in rows if r["underpowered"]])
    return 0


def _run(args) -> int:
    from ..experiment.layout import REPORT_FILE, RESULTS_FILE
    from ..experiment.runner import run_experiment

    err = console(stderr=True)

    def echo(msg: str) -> None:
        if not args.quiet or msg.startswith("warning"):
            err.print(f"pyfuse experiment: {msg}")

    res = run_experiment(args.spec, args.out, keep_models=args.keep_models, echo=echo,
                         data_parallel_train=args.data_parallel_train)
    v = res.results.get("verdict")
    print(f"pyfuse experiment: {len(res.executed)} step(s) run, {len(res.skipped)} skipped"
          + (f", {len(res.pruned)} fused model(s) pruned" if res.pruned else "")
          + f" in {res.seconds:.1f} s; wrote {res.out / RESULTS_FILE} and {res.out / REPORT_FILE}")
    if v is not None:
        print(f"pyfuse experiment: verdict: {v['text']}")
    return 0


def _report(args) -> int:
    from ..experiment.report import write_report

    path = write_report(args.dir)
    print(f"pyfuse experiment report: wrote {path}")
    return 0
