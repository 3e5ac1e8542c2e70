#!/usr/bin/env python
"""``pyfuse eval mc`` on 2 ranks (``mlx.launch -n 2 --backend ring`` on this
machine) vs one process: the speed-up of the evaluation step, same model,
same items, same run.

A tiny qwen3_moe is built in code (pyfuse.demo.tiny_model) and MMLU-style
items are made as in bench_eval.py. Each method runs first as one process
(``python -m pyfuse eval mc ... --json``), then as 2 ranks through
pyfuse.distributed.local; both write their rows, which must be byte-
identical. Two ratios per method: the scoring time that ``pyfuse eval mc``
reports (rank 0's, which includes waiting for the slower rank and the
gather) and the wall-clock time of the whole command (Python start-up and
one model load per rank included). Both processes of the 2-rank run share
this machine's cores with each other (and with whatever else runs): on 2
cores expect well under 2x.

    python bench/bench_distributed.py                     # 32 items, generate 32 tokens and logprob
    python bench/bench_distributed.py --items 64 --hidden-size 256 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_eval import make_items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--methods", default="generate,logprob")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    from pyfuse.demo.tiny_model import build_tiny_model
    from pyfuse.distributed.local import launch_local
    from pyfuse.io.files import write_jsonl

    env = {**os.environ, "PYFUSE_PROGRESS": "0"}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model", hidden_size=args.hidden_size,
                                 moe_intermediate_size=args.hidden_size, intermediate_size=2 * args.hidden_size)
        data = write_jsonl(tmp / "items.jsonl", make_items(args.items))
        for method in args.methods.split(","):
            def command(out):
                return [sys.executable, "-m", "pyfuse", "eval", "mc", "--model", model, "--data", data,
                        "--method", method, "--batch-size", str(args.batch_size), "--max-tokens",
                        str(args.max_tokens), "--out", out, "--json"]

            t = time.perf_counter()
            one = subprocess.run(command(tmp / f"{method}-1.jsonl"), env=env, capture_output=True, text=True,
                                 check=True)
            wall_one = time.perf_counter() - t
            t = time.perf_counter()
            many = launch_local(args.ranks, command(tmp / f"{method}-n.jsonl"), timeout=3600, env=env)
            wall_many = time.perf_counter() - t
            if many.timed_out or many.failed_ranks():
                raise SystemExit(f"the {args.ranks}-rank run failed: {many.stderr}")
            same = (tmp / f"{method}-1.jsonl").read_bytes() == (tmp / f"{method}-n.jsonl").read_bytes()
            s_one, s_many = json.loads(one.stdout)["seconds"], json.loads(many.stdout)["seconds"]
            figures[method] = {"scoring_seconds_1": round(s_one, 2), f"scoring_seconds_{args.ranks}": round(s_many, 2),
                               "scoring_speedup": round(s_one / s_many, 2), "wall_seconds_1": round(wall_one, 2),
                               f"wall_seconds_{args.ranks}": round(wall_many, 2),
                               "wall_speedup": round(wall_one / wall_many, 2), "rows_identical": same}
    out = {"items": args.items, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
           "hidden_size": args.hidden_size, "ranks": args.ranks, "cpus": os.cpu_count(), **figures}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for method, f in figures.items():
        print(f"{method:9s} scoring {f['scoring_seconds_1']:.1f} s -> {f[f'scoring_seconds_{args.ranks}']:.1f} s "
              f"({f['scoring_speedup']:.2f}x), whole command {f['wall_seconds_1']:.1f} s -> "
              f"{f[f'wall_seconds_{args.ranks}']:.1f} s ({f['wall_speedup']:.2f}x); rows identical: "
              f"{f['rows_identical']}")
    print(f"{args.ranks} ranks on this machine ({os.cpu_count()} CPUs), {args.items} items, --batch-size "
          f"{args.batch_size}, --max-tokens {args.max_tokens}, hidden size {args.hidden_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
