"""LoRA / DoRA training through mlx-lm's own tuner, with explicit layers.

:func:`train_adapter` is ``mlx_lm lora --train`` with three additions:

* **explicit layer indices** (``layers=[8, 14, 20]``), where mlx-lm only
  offers "the last N layers" (:mod:`.targets`);
* ``alpha``: mlx-lm's LoRA layers take a ``scale``; here ``scale = alpha /
  rank`` (the usual LoRA convention; rank 8, alpha 16 -> scale 2.0);
* an atomic output directory (written in a hidden temporary directory next
  to ``adapter_path`` and renamed at the end: an interrupted run leaves
  nothing behind) with the loss curve (``loss.json``, ``loss.png``).

The steps: check the settings; read and check the data (:mod:`.data`);
load the model; choose the modules (:mod:`.targets`); let mlx-lm insert its
LoRA/DoRA layers, build its datasets and run its trainer
(:mod:`.trainer`); write the adapter directory (here). Everything else is
mlx-lm's: the datasets (``mlx_lm.tuner.datasets``, ``mask_prompt``), the
LoRA/DoRA layers (``linear_to_lora_layers``), the batching and the training
loop (``mlx_lm.tuner.trainer.train`` with ``TrainingArgs``), the Adam
optimizer and its defaults.

The adapter directory is what ``mlx_lm lora`` writes and what ``mlx_lm
fuse``, ``mlx_lm.load(..., adapter_path=...)`` and ``pyfuse fuse`` read:

* ``adapters.safetensors``: ``<module path>.lora_a`` / ``.lora_b`` (and
  ``.m`` for DoRA) of the trained modules only;
* ``adapter_config.json``: ``fine_tune_type``, ``num_layers``,
  ``lora_parameters`` ``{rank, scale, dropout, keys}`` and the training
  settings (``model``, ``data``, ``iters``, ``batch_size``,
  ``learning_rate``, ``seed``, ...), plus ``alpha`` and ``layers``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..io.outputs import staged_dir
from .data import TrainingData, load_training_data
from .targets import Targets, check_dora, parse_layers, resolve_targets
from .trainer import OPTIMIZERS, add_adapter_layers, datasets, make_optimizer, run_trainer, seed_everything

FINE_TUNE_TYPES = ("lora", "dora")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
LOSS_FILE = "loss.json"
LOSS_PLOT = "loss.png"

__all__ = ["TrainResult", "TrainingData", "load_training_data", "parse_layers", "train_adapter"]


@dataclass
class TrainResult:
    """What :func:`train_adapter` wrote and measured. ``losses``: one entry
    per report (every ``steps_per_report`` iterations: ``iteration``,
    ``train_loss`` (mean over the window), ``learning_rate``,
    ``tokens_per_second``, ``trained_tokens``); ``val_losses``: ``iteration``
    (0 = before training), ``val_loss``."""

    adapter_path: Path
    config: dict
    modules: list[str]
    losses: list[dict]
    val_losses: list[dict]
    trainable_parameters: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def first_loss(self) -> float | None:
        return self.losses[0]["train_loss"] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1]["train_loss"] if self.losses else None


# -- settings -------------------------------------------------------------------------


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name, value, *, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise UserError(f"{name} must be a {'positive ' if positive else ''}number, got {value!r}")


def _check_settings(fine_tune_type: str, rank: int, alpha: float, dropout: float, s: dict) -> None:
    """The arguments of :func:`train_adapter`; ``s``: the run settings."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise UserError(f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, got {fine_tune_type!r}")
    if s["optimizer"] not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {s['optimizer']!r}")
    _check_int("rank", rank)
    _check_number("alpha", alpha)
    _check_number("learning_rate", s["learning_rate"])
    _check_number("dropout", dropout, positive=False)
    if not 0 <= dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
    for name, key in (("iters", "iters"), ("batch_size", "batch_size"),
                      ("grad_accumulation", "grad_accumulation_steps"), ("steps_per_eval", "steps_per_eval"),
                      ("steps_per_report", "steps_per_report")):
        _check_int(name, s[key])
    _check_int("max_seq_length", s["max_seq_length"], 2)
    if s["val_batches"] != -1:
        _check_int("val_batches (or -1 for the whole validation set)", s["val_batches"])
    _check_int("seed", s["seed"], 0)


def _checked_data(data, mask_prompt: bool, batch_size: int) -> TrainingData:
    td = load_training_data(data)
    if mask_prompt and td.format == "text":
        raise UserError(f"{td.source}: mask_prompt needs chat or completions rows, the data is text rows")
    if len(td.train) < batch_size:
        raise UserError(f"{td.source}: {len(td.train)} training rows, fewer than batch_size={batch_size}")
    if td.valid and len(td.valid) < batch_size:
        raise UserError(f"{td.source}: {len(td.valid)} validation rows, fewer than batch_size={batch_size}")
    return td


# -- outputs --------------------------------------------------------------------------


def _adapter_config(model_name: str, td: TrainingData, fine_tune_type: str, targets: Targets,
                    lora_parameters: dict, alpha: float, settings: dict, n_params: int, final: Path) -> dict:
    config = {
        "model": model_name,
        "data": td.source,
        "data_format": td.format,
        "fine_tune_type": fine_tune_type,
        "num_layers": targets.num_layers,
        "layers": targets.layers,
        "lora_parameters": lora_parameters,
        "alpha": float(alpha),
        **settings,
        "train_rows": len(td.train),
        "valid_rows": len(td.valid),
        "trainable_parameters": n_params,
        "adapter_path": str(final),
        "trainer": "mlx_lm.tuner.trainer.train",
    }
    try:
        import mlx_lm

        config["mlx_lm_version"] = mlx_lm.__version__
    except AttributeError:
        pass
    from .. import __version__

    config["pyfuse_version"] = __version__
    return config


def _plot_losses(path: Path, losses: list[dict], val_losses: list[dict], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except Exception:  # plotting is optional
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if losses:
        ax.plot([r["iteration"] for r in losses], [r["train_loss"] for r in losses], label="train", marker=".")
    if val_losses:
        ax.plot([r["iteration"] for r in val_losses], [r["val_loss"] for r in val_losses], label="valid",
                marker="o")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _write_json(path: Path, obj, indent: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def _finish_dir(out: Path, trainable: dict, config: dict, recorder, title: str, warnings: list[str]) -> None:
    """Check what mlx-lm saved in ``out`` and add the config and the loss curve."""
    import mlx.core as mx

    saved = mx.load(str(out / ADAPTER_WEIGHTS))
    if set(saved) != set(trainable):
        raise RuntimeError("mlx-lm saved different adapter tensors than were trained")
    losses = [r["train_loss"] for r in recorder.train] + [r["val_loss"] for r in recorder.val]
    if any(not math.isfinite(x) for x in losses):
        warnings.append("the loss became NaN/inf: lower learning_rate")
    _write_json(out / ADAPTER_CONFIG, config, 4)
    _write_json(out / LOSS_FILE, {"steps_per_report": config["steps_per_report"], "train": recorder.train,
                                  "val": recorder.val}, 2)
    _plot_losses(out / LOSS_PLOT, recorder.train, recorder.val, title)


# -- the run --------------------------------------------------------------------------


def train_adapter(model, data, adapter_path: str | os.PathLike, *, fine_tune_type: str = "lora",
                  rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  keys: Sequence[str] | None = None, layers=None, iters: int = 100,
                  learning_rate: float = 1e-5, batch_size: int = 4, grad_accumulation: int = 1,
                  max_seq_length: int = 2048, mask_prompt: bool = False, grad_checkpoint: bool = False,
                  seed: int = 0, val_batches: int = 25, steps_per_eval: int = 200,
                  steps_per_report: int = 10, optimizer: str = "adam", force: bool = False,
                  verbose: bool = False) -> TrainResult:
    """Train a LoRA/DoRA adapter with mlx-lm's trainer and write an mlx-lm
    adapter directory at ``adapter_path`` (atomically).

    Args:
        model: an mlx-lm model directory, or a loaded ``(model, tokenizer)``
            pair (which is then modified in place: LoRA layers are inserted).
        data: a directory with ``train.jsonl`` [+ ``valid.jsonl``], a
            ``.jsonl`` file, or a list of rows (chat / completions / text).
        adapter_path: the output directory (must not exist unless ``force``).
        fine_tune_type: ``lora`` or ``dora``.
        rank, alpha: LoRA rank and alpha; mlx-lm's ``scale = alpha / rank``.
        dropout: LoRA dropout.
        keys: module names inside a layer (``self_attn.q_proj``,
            ``mlp.switch_mlp.down_proj``...); default: every Linear,
            SwitchLinear and Embedding in the selected layers (mlx-lm's default).
        layers: layer indices (list or ``"8,14,20"``/``"4-7"``; negative from
            the end); default: all layers.
        iters, learning_rate, batch_size, max_seq_length, grad_checkpoint,
        val_batches, steps_per_eval, steps_per_report: as ``mlx_lm lora``.
        grad_accumulation: ``mlx_lm lora --grad-accumulation-steps``.
        mask_prompt: train on the completion / last assistant turn only.
        seed: seeds Python, NumPy (batch order) and MLX (LoRA init).
        optimizer: ``adam`` (mlx-lm's default), ``adamw``, ``sgd``, ``adafactor``.
        force: replace an existing ``adapter_path``.
        verbose: print mlx-lm's training log to stdout.
    """
    started = time.perf_counter()
    # in adapter_config.json's order
    settings = {"iters": iters, "batch_size": batch_size, "learning_rate": learning_rate, "optimizer": optimizer,
                "grad_accumulation_steps": grad_accumulation, "max_seq_length": max_seq_length,
                "mask_prompt": mask_prompt, "grad_checkpoint": grad_checkpoint, "seed": seed,
                "val_batches": val_batches, "steps_per_eval": steps_per_eval, "steps_per_report": steps_per_report}
    _check_settings(fine_tune_type, rank, alpha, dropout, settings)
    final = Path(adapter_path)
    if (final.exists() or final.is_symlink()) and not force:
        raise UserError(f"{final} exists (pass force=True / --force to replace it)")
    td = _checked_data(data, mask_prompt, batch_size)

    from ..lm.load import load_model

    seed_everything(seed)
    lm = load_model(model)
    net, tokenizer = lm.model, lm.tokenizer
    if td.format in ("chat", "completions") and not getattr(tokenizer, "has_chat_template", False):
        raise UserError(f"{lm.name}: the tokenizer has no chat template, needed for {td.format} rows "
                        "(use text rows)")
    targets = resolve_targets(net, layers, keys)
    if fine_tune_type == "dora":
        check_dora(targets.modules)
    lora_parameters = {"rank": rank, "scale": float(alpha) / rank, "dropout": float(dropout),
                       "keys": targets.lora_keys}
    trainable, wrapped = add_adapter_layers(net, targets.num_layers, lora_parameters, fine_tune_type,
                                            set(targets.modules), seed)
    n_params = sum(v.size for v in trainable.values())
    warnings: list[str] = []
    train_set, valid_set = datasets(td, tokenizer, mask_prompt, max_seq_length, warnings)
    opt = make_optimizer(optimizer, learning_rate)
    config = _adapter_config(lm.name, td, fine_tune_type, targets, lora_parameters, alpha, settings, n_params,
                             final)
    trainer_args = {k: settings[k] for k in ("batch_size", "iters", "val_batches", "steps_per_report",
                                             "steps_per_eval", "max_seq_length", "grad_checkpoint",
                                             "grad_accumulation_steps")}
    with staged_dir(final, force) as tmp:
        recorder = run_trainer(net, opt, train_set, valid_set, tmp / ADAPTER_WEIGHTS, seed=seed, verbose=verbose,
                               **trainer_args)
        _finish_dir(tmp, trainable, config, recorder,
                    f"{fine_tune_type} r={rank} alpha={alpha:g} lr={learning_rate:g} ({final.name})", warnings)
    return TrainResult(adapter_path=final, config=config, modules=wrapped, losses=recorder.train,
                       val_losses=recorder.val, trainable_parameters=n_params,
                       seconds=time.perf_counter() - started, warnings=warnings)
