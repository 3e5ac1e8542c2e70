"""``pyfuse train``: LoRA/DoRA training with mlx-lm's tuner, on explicit layers."""

from __future__ import annotations

import argparse

from ..train.lora import FINE_TUNE_TYPES
from ..train.trainer import OPTIMIZERS
from ._args import add_force, add_model, add_quiet, add_seed, comma_list, print_warnings

HELP = "train a LoRA/DoRA adapter with mlx-lm's trainer, on explicit layer indices"
DESCRIPTION = """\
Train a LoRA or DoRA adapter with mlx-lm's own trainer (mlx_lm.tuner) and
write a standard mlx-lm adapter directory (adapters.safetensors,
adapter_config.json) that `mlx_lm fuse`, `mlx_lm generate --adapter-path`
and `pyfuse fuse` read, plus the loss curve (loss.json, loss.png). The
directory appears only when training has finished.

Beyond `mlx_lm lora`: --layers takes explicit layer indices (mlx-lm only
trains "the last N layers"), and --alpha sets the LoRA scale as
scale = alpha / rank (mlx-lm's --lora-parameters scale).

Data (--data): a directory with train.jsonl and optionally valid.jsonl, or
one .jsonl file, in mlx-lm's formats: chat {"messages": [...]},
completions {"prompt": ..., "completion": ...} or {"text": ...}.

  pyfuse train --model MODEL --data setg/ --adapter-path adapters/factual \\
      --layers 8,14,20 --keys mlp.switch_mlp.down_proj --rank 2 --alpha 2 \\
      --iters 200 --learning-rate 1e-4 --mask-prompt --seed 0"""


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"model": "--model", "data": "--data"}
OUTPUTS = {"adapter_path": "--adapter-path"}

def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--data", required=True,
                   help="directory with train.jsonl [+ valid.jsonl], or one .jsonl file")
    p.add_argument("--adapter-path", default="adapters",
                   help="output adapter directory (default: adapters)")
    p.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES, default="lora",
                   help="lora or dora (default: lora; DoRA cannot train MoE experts or 3/5/6-bit layers)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8)")
    p.add_argument("--alpha", type=float, default=16.0,
                   help="LoRA alpha; the LoRA scale is alpha / rank (default: 16, i.e. scale 2 at rank 8)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default: 0)")
    p.add_argument("--keys", type=comma_list, default=None, metavar="KEY[,KEY...]",
                   help="module names inside a layer to adapt, e.g. self_attn.q_proj,mlp.switch_mlp.down_proj "
                        "(default: every Linear/SwitchLinear/Embedding of the selected layers)")
    p.add_argument("--layers", default=None, metavar="LIST",
                   help="layer indices, e.g. 8,14,20 or 4-7,10 (negative count from the end; default: all)")
    p.add_argument("--iters", type=int, default=100, help="training iterations (default: 100)")
    p.add_argument("--learning-rate", type=float, default=1e-5, help="learning rate (default: 1e-5)")
    p.add_argument("--batch-size", type=int, default=4, help="minibatch size (default: 4)")
    p.add_argument("--grad-accumulation", type=int, default=1,
                   help="minibatches per optimizer update (default: 1)")
    p.add_argument("--max-seq-length", type=int, default=2048,
                   help="longer rows are truncated (default: 2048)")
    p.add_argument("--mask-prompt", action="store_true",
                   help="compute the loss on the completion / last assistant turn only")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="gradient checkpointing (less memory, more compute)")
    add_seed(p, "seed for the batch order and LoRA init")
    p.add_argument("--val-batches", type=int, default=25,
                   help="validation batches, -1 for all of valid.jsonl (default: 25)")
    p.add_argument("--steps-per-eval", type=int, default=200,
                   help="iterations between validations (default: 200)")
    p.add_argument("--steps-per-report", type=int, default=10,
                   help="iterations per loss report / loss-curve point (default: 10)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="optimizer (default: adam, as mlx_lm lora)")
    add_force(p, "--adapter-path")
    add_quiet(p, "do not print mlx-lm's training log")


def run(args: argparse.Namespace) -> int:
    from ..train import train_adapter

    result = train_adapter(
        args.model, args.data, args.adapter_path, fine_tune_type=args.fine_tune_type, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, keys=args.keys, layers=args.layers, iters=args.iters,
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        grad_accumulation=args.grad_accumulation, max_seq_length=args.max_seq_length,
        mask_prompt=args.mask_prompt, grad_checkpoint=args.grad_checkpoint, seed=args.seed,
        val_batches=args.val_batches, steps_per_eval=args.steps_per_eval,
        steps_per_report=args.steps_per_report, optimizer=args.optimizer, force=args.force,
        verbose=not args.quiet)
    print_warnings("pyfuse train", result.warnings)
    cfg = result.config
    layers = cfg["layers"]
    where = "all layers" if layers is None else f"layer{'s' if len(layers) > 1 else ''} " + \
        ",".join(map(str, layers))
    loss = ""
    if result.losses:
        loss = f", train loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
    if result.val_losses:
        loss += f", val loss {result.val_losses[0]['val_loss']:.3f} -> {result.val_losses[-1]['val_loss']:.3f}"
    print(f"pyfuse train: wrote {result.adapter_path} ({cfg['fine_tune_type']}, rank {cfg['lora_parameters']['rank']}, "
          f"scale {cfg['lora_parameters']['scale']:g}, {len(result.modules)} modules in {where}, "
          f"{result.trainable_parameters:,} trainable parameters{loss}, {result.seconds:.1f} s)")
    return 0
