#!/usr/bin/env python
"""``pyfuse eval mc``: items per second of ``--method generate`` vs ``logprob``,
same model, same items, same run.

A tiny qwen3_moe (or llama) is built in code (pyfuse.demo.tiny_model), and
MMLU-Pro-style items are made from its synthetic corpus (4 to 10 options).
Both methods evaluate the same items one after the other (after a warm-up
of each); the ratio is logprob items/s over generate items/s. A random tiny
model never emits its end token, so generate always spends all of
--max-tokens: the ratio is the one for answers of that length (real
thinking-off MMLU-Pro answers are a few hundred tokens).

    python bench/bench_eval.py                       # 32 items, max 256 tokens, batch 8
    python bench/bench_eval.py --items 64 --max-tokens 512 --arch llama --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def make_items(n: int, seed: int = 0) -> list[dict]:
    from pyfuse.demo.tiny_model import _SUBJECTS

    rng = random.Random(seed)
    subjects = sorted(_SUBJECTS)
    rows = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        question, answer, wrong = rng.choice(_SUBJECTS[subject])
        k = rng.choice([4, 5, 10])
        options = [answer] + rng.sample(wrong, k - 1)
        rng.shuffle(options)
        gold = options.index(answer)
        rows.append({"question_id": i, "question": question, "options": options,
                     "answer": "ABCDEFGHIJ"[gold], "answer_index": gold, "category": subject})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--arch", default="qwen3_moe", choices=("qwen3_moe", "llama", "qwen3_5_moe"))
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    from pyfuse.evals.mc import evaluate_mc, load_model
    from pyfuse.demo.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model", arch=args.arch)
        data = tmp / "items.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in make_items(args.items)))
        lm = load_model(model_dir)
        pair = (lm.model, lm.tokenizer)
        figures = {}
        for method in ("generate", "logprob"):
            # warm-up (compilation, caches) on two items
            evaluate_mc(pair, data, method=method, batch_size=args.batch_size, limit=2, max_tokens=8)
            t = time.perf_counter()
            res = evaluate_mc(pair, data, method=method, batch_size=args.batch_size,
                              max_tokens=args.max_tokens)
            seconds = time.perf_counter() - t
            figures[method] = {"items": res.n, "seconds": round(seconds, 3),
                               "items_per_second": round(res.n / seconds, 3)}
        ratio = figures["logprob"]["items_per_second"] / figures["generate"]["items_per_second"]
        out = {"arch": args.arch, "max_tokens": args.max_tokens, "batch_size": args.batch_size, **figures,
               "logprob_over_generate": round(ratio, 2)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for method in ("generate", "logprob"):
            f = figures[method]
            print(f"{method:9s} {f['items']} items in {f['seconds']:.2f} s: {f['items_per_second']:.2f} items/s")
        print(f"logprob is {ratio:.1f}x faster than generate ({args.arch}, --max-tokens {args.max_tokens}, "
              f"--batch-size {args.batch_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
