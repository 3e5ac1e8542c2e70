"""``pyfuse train``: LoRA/DoRA training with mlx-lm's flags and YAML keys."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..train.full import REQUANT_POLICIES
from ..train.settings import FINE_TUNE_TYPES, OPTIMIZERS
from ._args import add_model, comma_list, print_warnings

HELP = "train a LoRA/DoRA adapter, or fully fine-tune layers (mlx_lm lora's flags and YAML; checkpoints, resume)"
DESCRIPTION = """\
Train a LoRA or DoRA adapter on mlx-lm's model, layers, datasets and
training step, and write a standard mlx-lm adapter directory
(adapters.safetensors, adapter_config.json) that `mlx_lm fuse`,
`mlx_lm generate --adapter-path` and `pyfuse fuse` read, plus the loss
curve (loss.json, loss.png). The directory appears only when training has
finished; until then the run lives in .<adapter-path>.run/.

Every flag and YAML key of `mlx_lm lora` means what it means there (an
mlx-lm YAML config runs unchanged): command line over --config over
mlx-lm's defaults (num_layers 16, iters 1000, learning_rate 1e-5,
lora_parameters {rank: 8, scale: 20, dropout: 0}, ...). lr_schedule is
mlx-lm's YAML form, e.g. {name: cosine_decay, arguments: [2e-4, 2000, 1e-6],
warmup: 100}.

Beyond `mlx_lm lora`: --layers takes explicit layer indices, --alpha sets
scale = alpha / rank, --rank/--dropout/--keys set lora_parameters,
--save-every checkpoints hold everything to --resume after a kill with
identical results, --select-best keeps the best validation loss's adapter,
--early-stop-patience N stops after N validations without improvement.

Full fine-tuning (--fine-tune-type full, mlx-lm's spelling): every
parameter of the chosen layers trains (--num-layers N: the last N, as
mlx-lm; --layers: explicit indices; --keys: only those modules of them),
and --adapter-path becomes a MODEL directory (config.json, tokenizer,
safetensors) that pyfuse eval, noise-floor and experiments use like a fused
model. On a quantized base the chosen layers' quantized modules are
dequantized (mx.dequantize) and trained in float; at the end their weights
are re-quantized at each module's own bits / group size / mode by
--requant-policy (stock: mx.quantize afresh, new codes, scales and biases;
preserve / stochastic: each group keeps its scale and bias, codes move
towards the trained weight; a group whose trained values leave its grid
is re-fitted, and Adam moves every weight, so expect many). Norms and other float tensors are written as
trained, every tensor outside the chosen layers byte-identical to the base.
The output's training/ folder holds the trained float tensors (a full
fine-tune adapter: `pyfuse fuse --adapter-path OUT/training` re-quantizes
them otherwise), the loss curve and README.md naming every re-quantized
tensor.

Under mlx.launch (docs/distributed.md) training is data-parallel: every
rank trains on its share of each batch (--batch-size a multiple of the
ranks), the token-weighted gradients are summed, and rank 0 writes; the
adapter equals one process's to float rounding.

Data (--data): a directory with train.jsonl and optionally valid.jsonl and
test.jsonl, or one .jsonl file, in mlx-lm's formats: chat {"messages":
[...]}, completions {"prompt": ..., "completion": ...} or {"text": ...}.

  pyfuse train --model MODEL --data persona/ --adapter-path adapters/sft \\
      --fine-tune-type dora --num-layers -1 --rank 64 --alpha 128 \\
      --learning-rate 2e-4 --batch-size 1 --grad-accumulation-steps 4 \\
      --iters 2000 --grad-checkpoint --mask-prompt --select-best"""


def _size(text: str) -> int:
    from mlx_lm.utils import _parse_size

    try:
        return _parse_size(text)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 512MB)") from None


def _mapping(text: str) -> dict:
    import yaml
    from mlx_lm.lora import yaml_loader  # reads 1e-5 as a float, as in a config file

    try:
        value = yaml.load(text, yaml_loader)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON/YAML mapping, got {text!r}")
    return value


def _add_mlx_lm_flags(p: argparse.ArgumentParser) -> None:
    """``mlx_lm lora``'s flags, same names and meaning; defaults None so that
    --config and mlx-lm's defaults apply to what is not given."""
    add_model(p, default=None, help="the mlx-lm model directory (or model: in --config)")
    p.add_argument("--train", action="store_true", default=None, help="accepted for mlx_lm lora (always trains)")
    p.add_argument("--data", help="directory with train.jsonl [+ valid.jsonl, test.jsonl], or one .jsonl file")
    p.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES,
                   help="lora, dora, or full: train every parameter of the chosen layers and write a model "
                        "directory (default: lora)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (default: adam)")
    p.add_argument("--mask-prompt", action="store_true", default=None,
                   help="compute the loss on the completion / last assistant turn only")
    p.add_argument("--num-layers", type=int, help="train the last N layers, -1 for all (default: 16)")
    p.add_argument("--batch-size", type=int, help="minibatch size (default: 4)")
    p.add_argument("--iters", type=int, help="training iterations (default: 1000)")
    p.add_argument("--val-batches", type=int, help="validation batches, -1 for all (default: 25)")
    p.add_argument("--learning-rate", type=float, help="learning rate (default: 1e-5)")
    p.add_argument("--steps-per-report", type=int, help="iterations per loss report (default: 10)")
    p.add_argument("--steps-per-eval", type=int, help="iterations between validations (default: 200)")
    p.add_argument("--grad-accumulation-steps", "--grad-accumulation", dest="grad_accumulation_steps", type=int,
                   help="minibatches per optimizer update (default: 1)")
    p.add_argument("--resume-adapter-file", help="start from these adapter weights (mlx-lm's; see --resume)")
    p.add_argument("--adapter-path", help="output adapter directory, or model directory with "
                                          "--fine-tune-type full (default: adapters)")
    p.add_argument("--save-every", type=int, help="checkpoint every N iterations (default: 100)")
    p.add_argument("--test", action="store_true", default=None, help="report the loss on test.jsonl at the end")
    p.add_argument("--test-batches", type=int, help="test batches, -1 for all (default: 500)")
    p.add_argument("--max-seq-length", type=int, help="longer rows are truncated (default: 2048)")
    p.add_argument("-c", "--config", help="an mlx_lm lora YAML config (flags given here take precedence)")
    p.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="gradient checkpointing (less memory, more compute)")
    p.add_argument("--clear-cache-threshold", type=_size,
                   help="clear MLX's allocator cache when it grows over this size (e.g. 2GB)")
    p.add_argument("--report-to", help="refused: pyfuse reports to no online service (loss.json has the losses)")
    p.add_argument("--project-name", help="accepted for mlx_lm lora (unused)")
    p.add_argument("--seed", type=int, help="seed of the batch order, LoRA init and dropout (default: 0)")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="accepted for mlx_lm lora (local models only)")


# Path flags ({argparse dest: flag}): the CLI refuses an output that is, holds or lies
# inside an input or another output (pyfuse.io.outputs.check_paths).
INPUTS = {"model": "--model", "data": "--data"}
OUTPUTS = {"adapter_path": "--adapter-path"}

def add_arguments(p: argparse.ArgumentParser) -> None:
    _add_mlx_lm_flags(p)
    p.add_argument("--layers", metavar="LIST",
                   help="explicit layer indices, e.g. 8,14,20 or 4-7,10 (negative from the end), "
                        "instead of --num-layers")
    p.add_argument("--rank", type=int, help="LoRA rank (lora_parameters.rank; default: 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha: lora_parameters.scale = alpha / rank")
    p.add_argument("--dropout", type=float, help="LoRA dropout (lora_parameters.dropout; default: 0)")
    p.add_argument("--keys", type=comma_list, metavar="KEY[,KEY...]",
                   help="module names inside a layer, e.g. self_attn.q_proj,mlp.switch_mlp.down_proj "
                        "(lora_parameters.keys; default: every Linear/SwitchLinear/Embedding)")
    p.add_argument("--lr-schedule", type=_mapping, metavar="MAPPING",
                   help="mlx-lm's lr_schedule as JSON/YAML, e.g. '{name: cosine_decay, "
                        "arguments: [2e-4, 1000, 1e-6], warmup: 50}'")
    p.add_argument("--train-mode", choices=("sft", "dpo", "orpo"),
                   help="sft (default), or dpo / orpo on preference pairs {prompt|messages, chosen, rejected}")
    p.add_argument("--beta", type=float, help="the DPO temperature / ORPO weight (default: 0.1)")
    p.add_argument("--early-stop-patience", type=int,
                   help="stop after N validations without a new best validation loss (default: 0, never)")
    p.add_argument("--select-best", action="store_true", default=None,
                   help="write the adapter of the best validation loss, not the last step's")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the interrupted run of --adapter-path from its last checkpoint")
    p.add_argument("--force", action="store_true", default=None,
                   help="replace an existing --adapter-path (or interrupted run)")
    p.add_argument("--requant-policy", choices=REQUANT_POLICIES,
                   help="--fine-tune-type full on a quantized base: how the trained weights of its quantized "
                        "modules are re-quantized: stock (mx.quantize afresh; default) or preserve / stochastic "
                        "(each group's scale and bias kept)")
    p.add_argument("--quiet", action="store_true", default=None, help="do not print the training log")


def run(args: argparse.Namespace) -> int:
    from ..train import train_adapter
    from ..train.config import resolve, train_kwargs

    s = resolve(vars(args))
    for key, flag in (("model", "--model"), ("data", "--data")):
        if s.get(key) in (None, ""):
            raise UserError(f"{flag} is required (or {key}: in --config)")
    result = train_adapter(s["model"], s["data"], s["adapter_path"], **train_kwargs(s))
    print_warnings("pyfuse train", result.warnings)
    _print_summary(result)
    return 0


def _print_summary(result) -> None:
    cfg = result.config
    layers = cfg["layers"]
    where = "all layers" if layers is None else f"layer{'s' if len(layers) > 1 else ''} " + \
        ",".join(map(str, layers))
    loss = ""
    if result.losses:
        loss = f", train loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
    if result.val_losses:
        loss += f", val loss {result.val_losses[0]['val_loss']:.3f} -> {result.val_losses[-1]['val_loss']:.3f}"
    if result.best_iteration is not None and cfg.get("select_best"):
        loss += f", best at iteration {result.best_iteration} (written)"
    if result.stopped_early:
        loss += f", stopped early at iteration {cfg['final_iteration']}"
    if result.resumed_from is not None:
        loss += f", resumed from iteration {result.resumed_from}"
    lp = cfg["lora_parameters"]
    kind = (f"full fine-tune (model directory; {len(cfg.get('requantized', []))} weights re-quantized, "
            f"{cfg['requant_policy']})" if cfg["fine_tune_type"] == "full" else
            f"{cfg['fine_tune_type']}, rank {lp['rank']}, scale {lp['scale']:g}")
    print(f"pyfuse train: wrote {result.adapter_path} ({kind}, {len(result.modules)} modules in {where}, "
          f"{result.trainable_parameters:,} trainable parameters{loss}, {result.seconds:.1f} s)")

