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

With ``--dtype bfloat16`` the model is stored in bfloat16 and ``logprob`` is
also timed on the model as mlx-lm loads it (bfloat16 arithmetic), against
pyfuse's compute-dtype policy (pyfuse.lm.load: float32 on MLX's CPU
backend); ``--hidden-size 512`` makes the model big enough for the
arithmetic to dominate:

    python bench/bench_eval.py --dtype bfloat16 --hidden-size 512 --items 8
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
    from pyfuse.demo.corpus import SUBJECTS

    rng = random.Random(seed)
    subjects = sorted(SUBJECTS)
    rows = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        question, answer, wrong = rng.choice(SUBJECTS[subject])
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
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the stored dtype (bfloat16: also time logprob without the compute-dtype policy)")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    from pyfuse.demo.tiny_model import build_tiny_model
    from pyfuse.evals.mc import evaluate_mc
    from pyfuse.io.files import write_jsonl
    from pyfuse.lm.load import load_for_inference, load_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_model(tmp / "model", arch=args.arch, dtype=args.dtype, hidden_size=args.hidden_size,
                                     moe_intermediate_size=args.hidden_size, intermediate_size=2 * args.hidden_size)
        data = write_jsonl(tmp / "items.jsonl", make_items(args.items))
        lm = load_for_inference(model_dir)
        pair = (lm.model, lm.tokenizer)
        figures = {}

        def timed(pair, method, max_tokens):
            # warm-up (compilation, caches) on two items
            evaluate_mc(pair, data, method=method, batch_size=args.batch_size, limit=2, max_tokens=8)
            t = time.perf_counter()
            res = evaluate_mc(pair, data, method=method, batch_size=args.batch_size, max_tokens=max_tokens)
            seconds = time.perf_counter() - t
            return {"items": res.n, "seconds": round(seconds, 3), "items_per_second": round(res.n / seconds, 3)}

        for method in ("generate", "logprob"):
            figures[method] = timed(pair, method, args.max_tokens)
        ratio = figures["logprob"]["items_per_second"] / figures["generate"]["items_per_second"]
        out = {"arch": args.arch, "dtype": args.dtype, "hidden_size": args.hidden_size,
               "max_tokens": args.max_tokens, "batch_size": args.batch_size, **figures,
               "logprob_over_generate": round(ratio, 2)}
        if args.dtype != "float32":
            raw = load_model(model_dir)  # as mlx-lm loads it: no compute-dtype policy
            stored = timed((raw.model, raw.tokenizer), "logprob", args.max_tokens)
            figures["logprob_stored_dtype"] = out["logprob_stored_dtype"] = stored
            out["policy_over_stored_dtype"] = round(
                figures["logprob"]["items_per_second"] / figures["logprob_stored_dtype"]["items_per_second"], 2)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for method, f in figures.items():
            print(f"{method:20s} {f['items']} items in {f['seconds']:.2f} s: {f['items_per_second']:.2f} items/s")
        print(f"logprob is {ratio:.1f}x faster than generate ({args.arch}, {args.dtype}, --max-tokens "
              f"{args.max_tokens}, --batch-size {args.batch_size})")
        if "policy_over_stored_dtype" in out:
            print(f"logprob under the compute-dtype policy is {out['policy_over_stored_dtype']:.1f}x as fast as "
                  f"in the stored {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
