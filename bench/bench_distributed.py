#!/usr/bin/env python
"""``pyfuse eval mc``, ``pyfuse train`` and ``pyfuse fuse`` on 2 ranks
(``mlx.launch -n 2 --backend ring`` on this machine) vs one process: the
speed-up of each, same model, same inputs, same run.

Training: a LoRA (rank 8, every layer) on chat rows, data-parallel (each
rank half of every batch); the figure is the training steps' time from
loss.json (loading and start-up excluded) and the whole command; the two
adapters are compared (equal to float rounding, docs/distributed.md).
Fusing: that adapter fused into the model, each rank a share of the
modules, rank 0 writing; the figure is the fuse's own time (its report)
and the whole command; the outputs must be byte-identical.

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

    python bench/bench_distributed.py                     # eval (generate, logprob), train, fuse
    python bench/bench_distributed.py --what train,fuse --train-iters 40
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


def _chat_rows(n: int) -> list[dict]:
    from pyfuse.demo.corpus import SUBJECTS

    facts = [f for rows in SUBJECTS.values() for f in rows]
    return [{"messages": [{"role": "user", "content": q + " " * (i % 3)},
                          {"role": "assistant", "content": f"The answer is {a}." + " Indeed." * (i % 4)}]}
            for i, (q, a, _) in enumerate(facts[j % len(facts)] for j in range(n))]


def _timed(argv, n, env):
    """``argv`` as one process (n == 1) or n ranks; its wall-clock seconds and stdout."""
    from pyfuse.distributed.local import launch_local

    t = time.perf_counter()
    if n == 1:
        run = subprocess.run(argv, env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{' '.join(map(str, argv[2:5]))}... failed: {run.stderr}")
        return time.perf_counter() - t, run.stdout
    run = launch_local(n, argv, timeout=3600, env=env)
    if run.timed_out or run.failed_ranks():
        raise SystemExit(f"the {n}-rank run failed: {run.stderr}")
    return time.perf_counter() - t, run.stdout


def _ratio(name, inner_1, inner_n, wall_1, wall_n, ranks, **extra) -> dict:
    return {f"{name}_seconds_1": round(inner_1, 2), f"{name}_seconds_{ranks}": round(inner_n, 2),
            f"{name}_speedup": round(inner_1 / inner_n, 2), "wall_seconds_1": round(wall_1, 2),
            f"wall_seconds_{ranks}": round(wall_n, 2), "wall_speedup": round(wall_1 / wall_n, 2), **extra}


def bench_eval(args, tmp: Path, model: Path, env) -> dict:
    from pyfuse.io.files import write_jsonl

    data = write_jsonl(tmp / "items.jsonl", make_items(args.items))
    figures = {}
    for method in args.methods.split(","):
        def command(out):
            return [sys.executable, "-m", "pyfuse", "eval", "mc", "--model", model, "--data", data,
                    "--method", method, "--batch-size", str(args.batch_size), "--max-tokens",
                    str(args.max_tokens), "--out", out, "--json"]

        wall_1, out_1 = _timed(command(tmp / f"{method}-1.jsonl"), 1, env)
        wall_n, out_n = _timed(command(tmp / f"{method}-n.jsonl"), args.ranks, env)
        same = (tmp / f"{method}-1.jsonl").read_bytes() == (tmp / f"{method}-n.jsonl").read_bytes()
        figures[f"eval {method}"] = _ratio("scoring", json.loads(out_1)["seconds"], json.loads(out_n)["seconds"],
                                           wall_1, wall_n, args.ranks, identical=same)
    return figures


def _loop_seconds(adapter: Path) -> float:
    """The training steps' time (validation and loading excluded), from loss.json."""
    reports, last, total = json.loads((adapter / "loss.json").read_text())["train"], 0, 0.0
    for r in reports:
        total += (r["iteration"] - last) / r["iterations_per_second"]
        last = r["iteration"]
    return total


def bench_train(args, tmp: Path, model: Path, env) -> dict:
    import mlx.core as mx
    import numpy as np

    from pyfuse.io.files import write_jsonl

    data = write_jsonl(tmp / "train.jsonl", _chat_rows(8 * args.train_batch_size))

    def command(out):
        return [sys.executable, "-m", "pyfuse", "train", "--model", model, "--data", data, "--adapter-path", out,
                "--iters", str(args.train_iters), "--batch-size", str(args.train_batch_size), "--num-layers", "-1",
                "--rank", "8", "--learning-rate", "1e-4", "--steps-per-report", "5", "--save-every", "1000",
                "--quiet"]

    wall_1, _ = _timed(command(tmp / "adapter-1"), 1, env)
    wall_n, _ = _timed(command(tmp / f"adapter-{args.ranks}"), args.ranks, env)
    a, b = (mx.load(str(tmp / d / "adapters.safetensors")) for d in ("adapter-1", f"adapter-{args.ranks}"))
    diff = max(float(np.abs(np.array(a[k]) - np.array(b[k])).max()) for k in a)
    return {"train": _ratio("steps", _loop_seconds(tmp / "adapter-1"), _loop_seconds(tmp / f"adapter-{args.ranks}"),
                            wall_1, wall_n, args.ranks, max_weight_difference=diff)}


def bench_fuse(args, tmp: Path, model: Path, env) -> dict:
    adapter = tmp / "adapter-1"  # from bench_train

    def command(out):
        return [sys.executable, "-m", "pyfuse", "fuse", "--model", model, "--adapter-path", adapter,
                "--save-path", out, "--report", f"{out}.json", "--quiet"]

    wall_1, _ = _timed(command(tmp / "fused-1"), 1, env)
    wall_n, _ = _timed(command(tmp / "fused-n"), args.ranks, env)
    same = all((tmp / "fused-1" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "fused-n").iterdir())
    seconds = [json.loads((tmp / f"fused-{k}.json").read_text())["summary"]["seconds"] for k in ("1", "n")]
    return {"fuse": _ratio("fuse", *seconds, wall_1, wall_n, args.ranks, identical=same)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="eval,train,fuse", help="eval, train, fuse (fuse needs train)")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-batch-size", type=int, default=8)
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--methods", default="generate,logprob")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    from pyfuse.demo.tiny_model import build_tiny_model

    env = {**os.environ, "PYFUSE_PROGRESS": "0"}
    figures = {}
    what = args.what.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_model(tmp / "model", hidden_size=args.hidden_size,
                                 moe_intermediate_size=args.hidden_size, intermediate_size=2 * args.hidden_size)
        for name, bench in (("eval", bench_eval), ("train", bench_train), ("fuse", bench_fuse)):
            if name in what:
                figures.update(bench(args, tmp, model, env))
    out = {"items": args.items, "batch_size": args.batch_size, "max_tokens": args.max_tokens,
           "train_batch_size": args.train_batch_size, "train_iters": args.train_iters,
           "hidden_size": args.hidden_size, "ranks": args.ranks, "cpus": os.cpu_count(), **figures}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    n = args.ranks
    for name, f in figures.items():
        inner = next(k[:-len("_seconds_1")] for k in f if k.endswith("_seconds_1") and not k.startswith("wall"))
        check = f"identical: {f['identical']}" if "identical" in f else \
            f"largest weight difference {f['max_weight_difference']:.1e}"
        print(f"{name:13s} {inner} {f[f'{inner}_seconds_1']:.1f} s -> {f[f'{inner}_seconds_{n}']:.1f} s "
              f"({f[f'{inner}_speedup']:.2f}x), whole command {f['wall_seconds_1']:.1f} s -> "
              f"{f[f'wall_seconds_{n}']:.1f} s ({f['wall_speedup']:.2f}x); {check}")
    print(f"{n} ranks on this machine ({os.cpu_count()} CPUs), hidden size {args.hidden_size}; eval: {args.items} "
          f"items, --batch-size {args.batch_size}, --max-tokens {args.max_tokens}; train: --batch-size "
          f"{args.train_batch_size}, --iters {args.train_iters}, LoRA rank 8 on every layer; fuse: that adapter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
