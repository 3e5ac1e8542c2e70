"""``pyfuse probe``: hidden-state centroids and MoE routing of prompt sets, per layer, across models."""

from __future__ import annotations

import argparse
import json

from ._args import add_force, add_json, add_out, console

HELP = "per-layer hidden-state centroids and MoE routing of prompt sets; how they move between models"
DESCRIPTION = """\
  pyfuse probe --model BASE [--model SFT ...] --prompts suite.yaml [--adapter-path A ...] --out DIR

For each prompt set (the groups of a behaviour suite, e.g. villain and
helper, or a text file with one prompt a line) and each model: the centroid
of the hidden state per layer (the input of every block and the last
block's output; the last prompt token's state, or --pool mean over the
prompt) and, for MoE models, the share of router choices each expert gets
per block. Then, against the first model: how far each centroid moved
(distance, relative to its norm, and cosine) and how far the routing moved
(total variation); and for each --adapter-path, how much each module's delta
reads from / writes along the first model's centroid direction, against
the 1/sqrt(hidden) of a random direction.

The blocks are tapped in place (no copy of the model), prompts run in
batches of --batch-size and only per-layer sums are kept. --out DIR writes
probe.json (with --centroids, the centroids themselves) and the plots."""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"model": "--model", "prompts": "--prompts", "adapter_path": "--adapter-path"}
OUTPUTS = {"out": "--out"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True,
                   help="an mlx-lm model directory (repeatable; the first is the reference)")
    p.add_argument("--prompts", action="append", required=True, metavar="FILE",
                   help="a behaviour suite (one set per group) or a text file (repeatable)")
    p.add_argument("--system-prompt", default=None, help="the system turn of text-file prompts (and suite prompts)")
    p.add_argument("--adapter-path", action="append", default=[], metavar="DIR",
                   help="an adapter whose deltas are compared with the centroids (repeatable)")
    p.add_argument("--pool", choices=("last", "mean"), default="last",
                   help="last prompt token (default) or mean over the prompt's tokens")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default: 8)")
    add_out(p, "write probe.json and the plots here (a new directory)")
    add_force(p, "--out")
    p.add_argument("--centroids", action="store_true", help="also write the centroids into probe.json")
    add_json(p, "the result")


def run(args) -> int:
    from ..io.files import atomic_write_text
    from ..io.outputs import check_destination, staged_dir
    from ..lm.generate import check_positive
    from ..probes.compare import plot_probe, probe

    check_positive("--batch-size", args.batch_size)
    if args.out:
        check_destination(args.out, args.force, "--out")  # before any work
    res = probe(args.model, args.prompts, adapters=args.adapter_path, system_prompt=args.system_prompt,
                pool=args.pool, batch_size=args.batch_size)
    data = res.to_dict(centroids=args.centroids)
    plots = []
    if args.out:
        with staged_dir(args.out, args.force, "--out") as tmp:  # the whole directory, or nothing
            atomic_write_text(tmp / "probe.json", json.dumps(data, indent=2) + "\n")
            plots = plot_probe(res, tmp)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    _print_tables(res)
    print(f"pyfuse probe: {len(res.models)} model(s), {len(res.sets)} prompt set(s) "
          f"({', '.join(f'{s}: {res.stats[res.models[0]][s].n}' for s in res.sets)})"
          + (f"; wrote {args.out}/probe.json" + "".join(f", {p.name}" for p in plots) if args.out else ""))
    return 0


def _print_tables(res) -> None:
    from rich.table import Table

    out = console(min_width=120)
    for sh in res.shifts:
        t = Table(title=f"{sh['model']} vs {sh['reference']}: {sh['set']}", title_justify="left")
        for col in ("layer", "distance", "relative", "cosine") + (("routing TV",) if sh.get("routing_tv") else ()):
            t.add_column(col, justify="right")
        for i, (d, r, c) in enumerate(zip(sh["distance"], sh["relative"], sh["cosine"])):
            extra = ()
            if sh.get("routing_tv"):
                tv = sh["routing_tv"][i] if i < len(sh["routing_tv"]) else None
                extra = ("-" if tv is None else f"{tv:.3f}",)
            t.add_row(str(i), f"{d:.4g}", f"{r:.4f}", f"{c:.4f}", *extra)
        out.print(t)
    for al in res.alignment:
        t = Table(title=f"{al['adapter']} along the {al['set']} centroid (chance {al['chance']:.3f})",
                  title_justify="left")
        for col in ("module", "|dW|", "read", "write"):
            t.add_column(col, justify="left" if col == "module" else "right", no_wrap=True)
        for m in al["modules"]:
            t.add_row(m["module"], f"{m['norm']:.3g}", "-" if m["read"] is None else f"{m['read']:.3f}",
                      "-" if m["write"] is None else f"{m['write']:.3f}")
        out.print(t)
