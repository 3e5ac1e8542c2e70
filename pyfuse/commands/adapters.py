"""``pyfuse adapters``: inspect adapters (``compare``: how two adapters' deltas relate)."""

from __future__ import annotations

import argparse
import json

from ._args import add_json, console

HELP = "inspect adapters: compare two adapters' subspaces, norms and shared modules"
DESCRIPTION = """\
  pyfuse adapters compare A B [--modules REGEX] [--json]
      Per module that both adapters touch: the principal angles between the
      column spaces of the two deltas (the output directions each writes),
      their overlap (the mean squared cosine of those angles: 1 for the same
      subspace, 0 for orthogonal ones; "chance" is what random subspaces
      of the same ranks give), the overlap of their row spaces
      (input directions), the cosine of the deltas as vectors, and both
      norms; then the modules only one of them touches. Computed from the
      low-rank factors (no dense delta); a SwitchLinear (MoE experts) is
      compared expert by expert and summarized (mean, min, max).

      Two adapters that write into the same subspace of a module can
      interfere when stacked; train them on disjoint modules (--keys /
      --layers of `pyfuse train`) to test that."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    p = sub.add_parser("compare", help="principal angles / subspace overlap of two adapters, per module",
                       description="Compare two mlx-lm adapters module by module (see `pyfuse adapters --help`).")
    p.add_argument("a", metavar="A", help="an mlx-lm adapter directory")
    p.add_argument("b", metavar="B", help="another one, for the same model")
    p.add_argument("--modules", default=None, metavar="REGEX", help="compare only modules matching REGEX")
    p.add_argument("--per-expert", action="store_true",
                   help="with --json: keep every expert's comparison of a SwitchLinear")
    add_json(p, "the comparison")
    p.set_defaults(_action=_run_compare)


def run(args) -> int:
    return args._action(args)


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def _run_compare(args) -> int:
    from ..analysis.subspace import compare_adapters

    res = compare_adapters(args.a, args.b, modules=args.modules)
    if args.json:
        data = res.to_dict()
        if not args.per_expert:
            for m in data["modules"]:
                m.pop("per_expert", None)
        print(json.dumps(data, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"A = {res.a}\nB = {res.b}")
    table.add_column("module", no_wrap=True)
    for col in ("kind", "|dA|", "|dB|", "overlap", "chance", "input overlap", "cosine", "angles (deg)"):
        table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=True)
    for m in res.modules:
        if m.kind == "switch":  # per expert: how many have both deltas, and their overlaps' range
            angles = f"{m.experts_compared}/{m.experts} experts"
            if m.experts_compared:
                angles += f", {m.overlap_min:.2f}-{m.overlap_max:.2f}"
        else:
            angles = ", ".join(f"{a:.0f}" for a in m.angles[:4]) + (" ..." if len(m.angles) > 4 else "")
        table.add_row(m.path, m.kind, _fmt(m.norm_a, ".3g"), _fmt(m.norm_b, ".3g"), _fmt(m.overlap),
                      _fmt(m.chance), _fmt(m.input_overlap), _fmt(m.cosine), angles)
    out = console(min_width=max([120] + [len(m.path) + 100 for m in res.modules]))
    out.print(table)
    out.print(f"{len(res.modules)} module(s) in both, mean overlap {_fmt(res.overlap)}; "
              f"only in A: {len(res.only_a)}, only in B: {len(res.only_b)}")
    for label, names in (("only in A", res.only_a), ("only in B", res.only_b)):
        if names:
            out.print(f"{label}: " + ", ".join(names))
    return 0
