#!/usr/bin/env python
"""``pyfuse train`` vs plain ``mlx_lm lora``: iterations per second, same
model, same data, same settings, same run.

A tiny qwen3_moe (or llama) is built in code (pyfuse.demo.tiny_model) with
chat rows from its synthetic corpus. Both trainers run the same number of
iterations after a warm-up run of each: mlx-lm's
``mlx_lm.tuner.trainer.train`` (what ``mlx_lm lora --train`` calls) and
pyfuse's loop (:mod:`pyfuse.train.loop`) through ``train_adapter``, both with
LoRA on the same modules, no validation, saving every ``--save-every``
steps (mlx-lm the adapter, pyfuse the checkpoint with optimizer state: what
resume costs). Each side's rate is measured from the end of its first step
(compiled) to the end of its last. The ratio is pyfuse it/s over mlx-lm
it/s; DoRA on the same modules (on the experts pyfuse only: mlx-lm cannot)
is timed too with ``--dora``.

    python bench/bench_train.py                     # 40 iterations, batch 4
    python bench/bench_train.py --iters 100 --arch llama --json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path


def make_rows(n: int, seed: int = 0) -> list[dict]:
    from pyfuse.demo.corpus import SUBJECTS

    rng = random.Random(seed)
    subjects = sorted(SUBJECTS)
    rows = []
    for i in range(n):
        question, answer, _ = rng.choice(SUBJECTS[subjects[i % len(subjects)]])
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return rows


def time_mlx_lm(model_dir: Path, data: Path, keys, args, out: Path) -> float:
    """Steps per second of ``mlx_lm.tuner.trainer.train``: from the end of
    step 1 (compiled) to the end of the last step, its adapter saved every
    ``save_every`` steps as pyfuse saves its checkpoints."""
    import types

    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.utils import load

    from pyfuse.train.data import load_training_data
    from pyfuse.train.trainer import add_adapter_layers, datasets, make_optimizer, seed_everything

    model, tok = load(str(model_dir))
    n = len(model.layers)
    lp = {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": keys}
    add_adapter_layers(model, n, lp, "lora", {f"model.layers.{i}.{k}" for i in range(n) for k in keys}, 0)
    train_set, _, _ = datasets(load_training_data(data), tok, True, 2048, [])
    seed_everything(0)
    stamps = []
    cb = types.SimpleNamespace(on_train_loss_report=lambda info: stamps.append(time.perf_counter()),
                               on_val_loss_report=lambda info: None)
    targs = TrainingArgs(batch_size=args.batch_size, iters=args.iters, steps_per_report=1,
                         steps_per_save=args.save_every, adapter_file=str(out))
    with contextlib.redirect_stdout(io.StringIO()):
        train(model=model, optimizer=make_optimizer("adam", 1e-4), train_dataset=train_set, args=targs,
              training_callback=cb)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def time_pyfuse(model_dir: Path, data: Path, keys, args, out: Path, fine_tune_type: str = "lora") -> float:
    """Steps per second of pyfuse's loop, measured as :func:`time_mlx_lm`
    (checkpoints with optimizer state every ``save_every`` steps included)."""
    from pyfuse.train import train_adapter

    stamps = []
    train_adapter(model_dir, data, out, keys=keys, rank=8, alpha=16, iters=args.iters, batch_size=args.batch_size,
                  learning_rate=1e-4, mask_prompt=True, steps_per_report=1, save_every=args.save_every,
                  fine_tune_type=fine_tune_type, force=True, on_step=lambda it: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("qwen3_moe", "llama"), default="qwen3_moe")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--save-every", type=int, default=10, help="pyfuse's checkpoint interval (default: 10)")
    p.add_argument("--dora", action="store_true", help="also time pyfuse's DoRA on the same modules")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from pyfuse.demo.tiny_model import build_tiny_model, build_tokenizer
    from pyfuse.io.files import write_jsonl

    keys = ["self_attn.q_proj", "self_attn.v_proj"] + (["mlp.switch_mlp.down_proj"] if args.arch == "qwen3_moe"
                                                       else ["mlp.down_proj"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = build_tokenizer(root / "tok")
        model_dir = build_tiny_model(root / "model", tokenizer_dir=tok, arch=args.arch,
                                     quantize={"group_size": 64, "bits": 4})
        write_jsonl(root / "data" / "train.jsonl", make_rows(64))
        data = root / "data"
        warm = argparse.Namespace(**{**vars(args), "iters": 4})
        time_mlx_lm(model_dir, data, keys, warm, root / "w.safetensors")
        time_pyfuse(model_dir, data, keys, warm, root / "w")
        mlx_rate = time_mlx_lm(model_dir, data, keys, args, root / "mlx.safetensors")
        ours_rate = time_pyfuse(model_dir, data, keys, args, root / "ours")
        result = {"arch": args.arch, "iters": args.iters, "batch_size": args.batch_size,
                  "save_every": args.save_every, "mlx_lm_it_per_s": mlx_rate, "pyfuse_it_per_s": ours_rate,
                  "ratio": ours_rate / mlx_rate}
        if args.dora:
            result["pyfuse_dora_it_per_s"] = time_pyfuse(model_dir, data, keys, args, root / "d", "dora")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.arch}, {args.iters} iterations of batch {args.batch_size} (same run):")
        print(f"  mlx_lm lora (mlx_lm.tuner.trainer.train): {result['mlx_lm_it_per_s']:.2f} it/s")
        print(f"  pyfuse train (checkpoint every {args.save_every}): {result['pyfuse_it_per_s']:.2f} it/s")
        print(f"  ratio pyfuse / mlx-lm: {result['ratio']:.2f}")
        if args.dora:
            print(f"  pyfuse train, DoRA on the same modules: {result['pyfuse_dora_it_per_s']:.2f} it/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
