"""``pyfuse stats``: significance tests, intervals and power for accuracies."""

from __future__ import annotations

import argparse
import json

from ._args import add_json, console

HELP = "compare accuracies: z-test, McNemar, Newcombe interval, power (unpaired and paired)"
DESCRIPTION = """\
Compare multiple-choice accuracies between two conditions.

  pyfuse stats ztest K1 N1 K2 N2        two-proportion z-test (independent samples)
  pyfuse stats mcnemar A.jsonl B.jsonl  exact McNemar on two eval result files
                                        (the same items: the right test for paired runs)
  pyfuse stats ci K1 N1 K2 N2           Newcombe interval for p1 - p2
  pyfuse stats mde --n 692 --p0 0.178   minimum detectable effect (power analysis)
  pyfuse stats paired --n 692 --discordance 0.1 --effect 0.05
                                        the same for the paired McNemar test: power, minimum
                                        detectable effect and items needed, from the share of
                                        items answered right by one condition only (or from a
                                        noise-floor result: --noise-floor DIR/noise_floor.json)

Every subcommand prints a small table, or JSON with --json."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="stats_command", metavar="TEST", required=True)

    def counts(p):
        for name, help_ in (("k1", "correct items, condition 1"), ("n1", "items, condition 1"),
                            ("k2", "correct items, condition 2"), ("n2", "items, condition 2")):
            p.add_argument(name, type=int, metavar=name.upper(), help=help_)

    p = sub.add_parser("ztest", help="two-proportion z-test of K1/N1 vs K2/N2")
    counts(p)
    p.add_argument("--alternative", choices=("two-sided", "larger", "smaller"), default="two-sided",
                   help="alternative hypothesis about p1 - p2 (default: two-sided)")
    p.set_defaults(_stats=_ztest)

    p = sub.add_parser("mcnemar", help="exact McNemar test on two eval result files (matched by id)")
    p.add_argument("results_a", metavar="A.jsonl", help="per-item results of condition A")
    p.add_argument("results_b", metavar="B.jsonl", help="per-item results of condition B")
    p.set_defaults(_stats=_mcnemar)

    p = sub.add_parser("ci", help="Newcombe confidence interval for p1 - p2")
    counts(p)
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level (default: 0.05)")
    p.set_defaults(_stats=_ci)

    p = sub.add_parser("mde", help="minimum detectable effect of a two-proportion comparison")
    p.add_argument("--n", type=int, required=True, help="items per condition")
    p.add_argument("--p0", type=float, required=True, help="baseline accuracy, e.g. 0.178")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="target power (default: 0.8)")
    p.add_argument("--effect", type=float, default=None,
                   help="also report the power to detect this difference (e.g. 0.05)")
    p.set_defaults(_stats=_mde)

    p = sub.add_parser("paired", help="power of the paired McNemar test from a discordance rate")
    p.add_argument("--n", type=int, default=None, help="paired items (both conditions scored on them)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--discordance", type=float, default=None,
                     help="share of items one condition gets right and the other wrong (p10 + p01)")
    src.add_argument("--noise-floor", default=None, metavar="NOISE_FLOOR.json",
                     help="take it from a noise-floor result: the share of multiple-choice answers a "
                          "zero-delta fuse changes (pyfuse noise-floor --mc; an upper bound of the discordance)")
    p.add_argument("--policy", default="stock", help="the noise-floor row's policy (default: stock)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level, two-sided (default: 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="target power (default: 0.8)")
    p.add_argument("--effect", type=float, default=None,
                   help="the difference in accuracy to detect (p10 - p01), e.g. 0.05")
    p.set_defaults(_stats=_paired)

    for p in sub.choices.values():
        add_json(p)


def run(args: argparse.Namespace) -> int:
    title, rows, data = args._stats(args)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_table(title, rows)
    return 0


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    console().print(table)


def _pct(p: float) -> str:
    return f"{100 * p:.2f} %"


def _pp(d: float) -> str:
    return f"{100 * d:+.2f} pp"


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.2e}"


def _ztest(args):
    from ..stats import two_proportion_ztest

    r = two_proportion_ztest(args.k1, args.n1, args.k2, args.n2, alternative=args.alternative)
    rows = [("condition 1", f"{r.k1}/{r.n1} = {_pct(r.p1)}"),
            ("condition 2", f"{r.k2}/{r.n2} = {_pct(r.p2)}"),
            ("difference", _pp(r.diff)), ("z", f"{r.statistic:.3f}"), ("p", _p(r.pvalue))]
    return f"two-proportion z-test ({r.alternative})", rows, r.to_dict()


def _mcnemar(args):
    from ..data.mmlu import match_results, read_results
    from ..stats import mcnemar

    pairs = match_results(read_results(args.results_a), read_results(args.results_b),
                          args.results_a, args.results_b)
    r = mcnemar([a.correct for a, _ in pairs], [b.correct for _, b in pairs])
    rows = [("items", str(r.n)), ("A accuracy", _pct(r.acc_a)), ("B accuracy", _pct(r.acc_b)),
            ("difference", _pp(r.diff)), ("both correct", str(r.both_correct)),
            ("only A correct", str(r.a_only)), ("only B correct", str(r.b_only)),
            ("both wrong", str(r.both_wrong)), ("p (exact)", _p(r.pvalue))]
    data = {**r.to_dict(), "results_a": args.results_a, "results_b": args.results_b}
    return "exact McNemar test (paired)", rows, data


def _ci(args):
    from ..stats import diff_confint

    r = diff_confint(args.k1, args.n1, args.k2, args.n2, alpha=args.alpha)
    level = f"{100 * (1 - r.alpha):g} %"
    rows = [("condition 1", f"{r.k1}/{r.n1} = {_pct(r.p1)}"),
            ("condition 2", f"{r.k2}/{r.n2} = {_pct(r.p2)}"),
            ("difference", _pp(r.diff)), (f"{level} interval", f"[{_pp(r.low)}, {_pp(r.high)}]")]
    return f"Newcombe {level} interval for p1 - p2", rows, r.to_dict()


def _mde(args):
    from ..stats import min_detectable_effect, power_two_proportions

    mde = min_detectable_effect(args.n, args.p0, alpha=args.alpha, power=args.power)
    data = {"n": args.n, "p0": args.p0, "alpha": args.alpha, "power": args.power, "mde": mde}
    rows = [("items per condition", str(args.n)), ("baseline accuracy", _pct(args.p0)),
            ("alpha (two-sided)", f"{args.alpha:g}"), ("power", f"{args.power:g}"),
            ("minimum detectable effect",
             "not reachable (even p1 = 100 %)" if mde != mde else _pp(mde))]
    if args.effect is not None:
        pw = power_two_proportions(args.n, args.p0, args.effect, alpha=args.alpha)
        verdict = "under-powered" if pw < args.power else "adequately powered"
        rows.append((f"power at {_pp(args.effect)}", f"{pw:.3f} ({verdict})"))
        data.update(effect=args.effect, power_at_effect=pw, underpowered=pw < args.power)
    if mde != mde:
        data["mde"] = None  # JSON has no NaN
    return "minimum detectable effect (two-proportion test)", rows, data



def _paired(args):
    from ..errors import UserError
    from ..experiment.power import discordance_from_noise_floor
    from ..stats import mcnemar_mde, mcnemar_power, mcnemar_sample_size

    if args.n is None and args.effect is None:
        raise UserError("give --n (for the minimum detectable effect) and/or --effect (for the items needed)")
    if args.noise_floor is not None:
        psi, source = discordance_from_noise_floor(args.noise_floor, policy=args.policy)
    else:
        psi, source = args.discordance, "given"
    data = {"discordance": psi, "discordance_source": source, "alpha": args.alpha, "power": args.power,
            "n": args.n, "effect": args.effect, "method": "Connor (1987) normal approximation"}
    rows = [("discordance (p10 + p01)", f"{psi:.4g} ({source})"), ("alpha (two-sided)", f"{args.alpha:g}"),
            ("power", f"{args.power:g}")]
    if args.n is not None:
        mde = mcnemar_mde(args.n, psi, alpha=args.alpha, power=args.power)
        rows += [("paired items", str(args.n)),
                 ("minimum detectable effect", "not reachable" if mde != mde else _pp(mde))]
        data["mde"] = None if mde != mde else mde
        if args.effect is not None:
            pw = mcnemar_power(args.n, psi, args.effect, alpha=args.alpha)
            rows.append((f"power at {_pp(args.effect)}",
                         f"{pw:.3f} ({'under-powered' if pw < args.power else 'adequately powered'})"))
            data.update(power_at_effect=pw, underpowered=pw < args.power)
    if args.effect is not None:
        needed = mcnemar_sample_size(psi, args.effect, alpha=args.alpha, power=args.power)
        rows.append((f"items needed for {_pp(args.effect)}", str(needed)))
        data["n_needed"] = needed
    return "paired McNemar test: power (Connor 1987)", rows, data
