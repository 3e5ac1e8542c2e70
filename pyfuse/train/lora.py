"""LoRA / DoRA training on mlx-lm's model, layers, datasets and step.

:func:`train_adapter` is ``mlx_lm lora --train`` (same settings, same
names: :mod:`.config`) with these additions:

* **explicit layer indices** (``layers=[8, 14, 20]``), where mlx-lm only
  offers "the last N layers" (:mod:`.targets`);
* ``alpha``: ``scale = alpha / rank`` (rank 8, alpha 16 -> scale 2.0);
* a learning-rate schedule (``lr_schedule``, mlx-lm's YAML form), checkpoints
  that resume bit for bit after a kill (``resume``), best-validation
  selection (``select_best``) and early stopping (``early_stop_patience``)
  (:mod:`.loop`, :mod:`.checkpoint`);
* an atomic output directory: the run writes into ``.<name>.run/`` next to
  ``adapter_path`` and renames it at the end, with the loss curve
  (``loss.json``, ``loss.png``).

The adapter directory is what ``mlx_lm lora`` writes and what ``mlx_lm
fuse``, ``mlx_lm.load(..., adapter_path=...)`` and ``pyfuse fuse`` read:
``adapters.safetensors`` (``<module path>.lora_a`` / ``.lora_b``, and ``.m``
for DoRA), ``adapter_config.json`` (``fine_tune_type``, ``num_layers``,
``lora_parameters`` ``{rank, scale, dropout, keys}`` and every training
setting, plus ``alpha`` and ``layers``), the ``NNNNNNN_adapters.safetensors``
of every ``save_every`` step and ``best_adapters.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..distributed import together
from ..distributed.training import data_parallel, follower_paths
from ..errors import UserError
from ..io.outputs import check_destination, publish
from .checkpoint import BEST_WEIGHTS, RunStore, run_dir_for
from .data import TrainingData, load_training_data
from .full import DEFAULT_REQUANT_POLICY, check_requant_policy, unfreeze_layers, write_model
from .loop import LoopArgs, evaluate, run_loop, sft_objective
from .outputs import ADAPTER_CONFIG, adapter_config, finish_dir, read_run_config, write_json
from .settings import FINE_TUNE_TYPES, check_settings
from .targets import check_dora, resolve_targets
from .trainer import (add_adapter_layers, datasets, grad_checkpointing, make_optimizer, preference_sets,
                      seed_everything)

__all__ = ["FINE_TUNE_TYPES", "TrainResult", "TrainingData", "load_training_data", "train_adapter"]


@dataclass
class TrainResult:
    """What :func:`train_adapter` wrote and measured. ``losses``: one entry
    per report (every ``steps_per_report`` iterations: ``iteration``,
    ``train_loss`` (mean over the window), ``learning_rate``,
    ``tokens_per_second``, ``trained_tokens``, and the objective's
    metrics); ``val_losses``: ``iteration`` (0 = before training),
    ``val_loss``, ``best``."""

    adapter_path: Path
    config: dict
    modules: list[str]
    losses: list[dict]
    val_losses: list[dict]
    trainable_parameters: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    best_iteration: int | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    test_loss: float | None = None

    @property
    def first_loss(self) -> float | None:
        return self.losses[0]["train_loss"] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1]["train_loss"] if self.losses else None


def _checked_data(data, mask_prompt: bool, batch_size: int, test: bool) -> TrainingData:
    td = load_training_data(data)
    if mask_prompt and td.format == "text":
        raise UserError(f"{td.source}: mask_prompt needs chat or completions rows, the data is text rows")
    for name, rows in (("training", td.train), ("validation", td.valid), ("test", td.test)):
        if rows and len(rows) < batch_size:
            raise UserError(f"{td.source}: {len(rows)} {name} rows, fewer than batch_size={batch_size}")
    if len(td.train) < batch_size:
        raise UserError(f"{td.source}: {len(td.train)} training rows, fewer than batch_size={batch_size}")
    if test and not td.test:
        raise UserError(f"{td.source}: test needs a test.jsonl in the data directory")
    return td


def _prepare_run_dir(final: Path, *, force: bool, resume: bool) -> Path:
    """The run directory to write into (see :mod:`.checkpoint`)."""
    run_dir = run_dir_for(final)
    if resume and not run_dir.is_dir() and final.exists():
        raise UserError(f"resume: {final} is a finished run, nothing to resume")
    check_destination(final, force, "--adapter-path")  # before any work: what --force may replace
    if resume:
        if not run_dir.is_dir():
            raise UserError(f"resume: no interrupted run of {final} ({run_dir} does not exist)")
        return run_dir
    if run_dir.exists():
        if not force:
            raise UserError(f"an interrupted run of {final} is in {run_dir}: pass resume=True / --resume to "
                            "continue it, or force=True / --force to start over")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def _print_report(kind: str, rec: dict) -> None:
    if kind == "val":
        extra = "".join(f", {k[4:].replace('_', ' ')} {v:.3f}" for k, v in rec.items()
                        if k.startswith("val_") and k != "val_loss")
        print(f"Iter {rec['iteration']}: Val loss {rec['val_loss']:.3f}{extra}{' (best)' if rec['best'] else ''}",
              flush=True)
        return
    known = ("iteration", "train_loss", "learning_rate", "iterations_per_second", "tokens_per_second",
             "trained_tokens")
    extra = "".join(f", {k.replace('_', ' ')} {v:.3f}" for k, v in rec.items() if k not in known)
    print(f"Iter {rec['iteration']}: Train loss {rec['train_loss']:.3f}{extra}, Learning Rate "
          f"{rec['learning_rate']:.3e}, It/sec {rec['iterations_per_second']:.3f}, Tokens/sec "
          f"{rec['tokens_per_second']:.3f}, Trained Tokens {rec['trained_tokens']}", flush=True)


def _loop_args(s: dict) -> LoopArgs:
    return LoopArgs(**{k: s[k] for k in LoopArgs.__dataclass_fields__})


def train_adapter(model, data, adapter_path: str | os.PathLike, *, fine_tune_type: str = "lora",
                  rank: int = 8, alpha: float = 16.0, scale: float | None = None, dropout: float = 0.0,
                  keys: Sequence[str] | None = None, layers=None, iters: int = 100,
                  learning_rate: float = 1e-5, lr_schedule: dict | None = None, batch_size: int = 4,
                  grad_accumulation_steps: int = 1, grad_accumulation: int | None = None,
                  max_seq_length: int = 2048, mask_prompt: bool = False, grad_checkpoint: bool = False,
                  seed: int = 0, val_batches: int = 25, steps_per_eval: int = 200, steps_per_report: int = 10,
                  save_every: int = 100, optimizer: str = "adam", optimizer_config: dict | None = None,
                  clear_cache_threshold: int = 0, early_stop_patience: int = 0, select_best: bool = False,
                  resume: bool = False, resume_adapter_file: str | None = None, test: bool = False,
                  test_batches: int = 500, train_mode: str = "sft", beta: float = 0.1, force: bool = False,
                  requant_policy: str = DEFAULT_REQUANT_POLICY, verbose: bool = False,
                  on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train a LoRA/DoRA adapter and write an mlx-lm adapter directory at
    ``adapter_path`` (atomically; resumable after a kill).

    Args:
        model: an mlx-lm model directory, or a loaded ``(model, tokenizer)``
            pair (which is then modified in place: LoRA layers are inserted).
        data: a directory with ``train.jsonl`` [+ ``valid.jsonl``,
            ``test.jsonl``], a ``.jsonl`` file, or a list of rows.
        fine_tune_type: ``lora``, ``dora``, or ``full``: every parameter of
            the chosen layers trains and ``adapter_path`` becomes a model
            directory of the base's quantization (:mod:`.full`: quantized
            modules are trained dequantized and re-quantized at the end).
        rank, alpha, scale, dropout: the LoRA rank, ``scale = alpha / rank``
            (or ``scale`` itself, as mlx-lm's ``lora_parameters``), dropout.
        keys: module names inside a layer (``self_attn.q_proj``,
            ``mlp.switch_mlp.down_proj``...); default: every Linear,
            SwitchLinear and Embedding in the selected layers (mlx-lm's default).
        layers: layer indices (list or ``"8,14,20"``/``"4-7"``; negative from
            the end; ``"last:N"`` = mlx-lm's ``num_layers N``); default: all.
        lr_schedule: mlx-lm's form, e.g. ``{"name": "cosine_decay",
            "arguments": [2e-4, 1000, 1e-6], "warmup": 50, "warmup_init": 0}``.
        grad_accumulation_steps (alias ``grad_accumulation``), iters,
        learning_rate, batch_size, max_seq_length, grad_checkpoint,
        val_batches, steps_per_eval, steps_per_report, save_every, optimizer,
        optimizer_config, clear_cache_threshold, mask_prompt,
        resume_adapter_file (initial weights), test, test_batches: as
        ``mlx_lm lora``.
        seed: seeds the batch order (NumPy), LoRA init and dropout (MLX).
        train_mode: ``sft`` (next-token loss), ``dpo`` or ``orpo`` on
            preference pairs (:mod:`.preference`); beta: their temperature.
        early_stop_patience: stop after this many validations without a new
            best validation loss (0: never).
        select_best: the adapter written is the best validation loss's.
        resume: continue the interrupted run of ``adapter_path`` from its
            last checkpoint (the same settings required).
        force: replace an existing ``adapter_path`` / interrupted run.
        requant_policy: ``full`` on a quantized base: how the trained
            weights are re-quantized (``stock``: afresh; ``preserve`` /
            ``stochastic``: on each group's grid).
        verbose: print the training log to stdout.
        on_step: called with each finished step's number.
    """
    started = time.perf_counter()
    if grad_accumulation is not None:
        grad_accumulation_steps = grad_accumulation
    settings = {"iters": iters, "batch_size": batch_size, "learning_rate": learning_rate,
                "lr_schedule": lr_schedule, "optimizer": optimizer, "optimizer_config": optimizer_config or {},
                "grad_accumulation_steps": grad_accumulation_steps, "max_seq_length": max_seq_length,
                "mask_prompt": mask_prompt, "grad_checkpoint": grad_checkpoint, "seed": seed,
                "val_batches": val_batches, "steps_per_eval": steps_per_eval,
                "steps_per_report": steps_per_report, "save_every": save_every,
                "clear_cache_threshold": clear_cache_threshold, "early_stop_patience": early_stop_patience,
                "select_best": select_best, "resume_adapter_file": resume_adapter_file, "test": test,
                "test_batches": test_batches, "train_mode": train_mode, "beta": beta}
    scale = float(alpha) / rank if scale is None and isinstance(rank, int) and rank > 0 else scale
    check_settings(fine_tune_type, rank, scale, dropout, settings)
    if fine_tune_type == "full":
        check_requant_policy(requant_policy)
        if not isinstance(model, (str, os.PathLike)):
            raise UserError("fine_tune_type full needs a model directory (its output is written over it)")
        settings["requant_policy"] = requant_policy
    dp = data_parallel(batch_size, train_mode)  # under mlx.launch: each rank a share of every batch
    with follower_paths(dp, Path(adapter_path), run_dir_for(Path(adapter_path)), resume) as final:
        run_dir = None
        try:
            with together("checking the training data and the adapter path"):
                td = _checked_data(data, mask_prompt, batch_size, test)
                _check_mode(td, train_mode)
                run_dir = _prepare_run_dir(final, force=force, resume=resume)
            return _run(model, td, final, run_dir, fine_tune_type, rank, scale, dropout, keys, layers, settings,
                        resume, verbose, on_step, started, force, dp)
        except UserError:
            if not resume and run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def _check_mode(td: TrainingData, train_mode: str) -> None:
    if (train_mode == "sft") != (td.format != "pairs"):
        raise UserError(f"{td.source}: train_mode {train_mode} needs "
                        + ("chat, completions or text rows, the data is preference pairs (use dpo or orpo)"
                           if train_mode == "sft" else
                           f"preference pairs {{prompt|messages, chosen, rejected}}, the data is {td.format} rows"))


def _run(model, td, final, run_dir, fine_tune_type, rank, scale, dropout, keys, layers, s, resume, verbose,
         on_step, started, force, dp=None) -> TrainResult:
    from mlx.utils import tree_flatten

    from ..lm.load import load_model

    seed_everything(s["seed"])
    lm = load_model(model)
    net, tokenizer = lm.model, lm.tokenizer
    if td.format in ("chat", "completions") and not getattr(tokenizer, "has_chat_template", False):
        raise UserError(f"{lm.name}: the tokenizer has no chat template, needed for {td.format} rows "
                        "(use text rows)")
    targets = resolve_targets(net, layers, keys)
    if fine_tune_type == "dora":
        check_dora(targets.modules)
    warnings: list[str] = []
    if s["train_mode"] == "sft":
        (train_set, valid_set, test_set), objective = datasets(td, tokenizer, s["mask_prompt"],
                                                               s["max_seq_length"], warnings), sft_objective()
    else:  # before the adapter layers: the reference is the starting model
        (train_set, valid_set, test_set), objective = preference_sets(net, tokenizer, td, s, run_dir, resume)
    if fine_tune_type == "full":
        lora_parameters = None
        trainable, wrapped = unfreeze_layers(net, targets, keys is not None, s["seed"])
    else:
        lora_parameters = {"rank": rank, "scale": float(scale), "dropout": float(dropout),
                           "keys": targets.lora_keys}
        trainable, wrapped = add_adapter_layers(net, targets.num_layers, lora_parameters, fine_tune_type,
                                                set(targets.modules), s["seed"])
    if s["resume_adapter_file"]:
        net.load_weights(str(s["resume_adapter_file"]), strict=False)
    n_params = sum(v.size for v in trainable.values())
    opt = make_optimizer(s["optimizer"], s["learning_rate"], s["lr_schedule"], s["optimizer_config"])
    config = adapter_config(lm.name, td, fine_tune_type, targets, lora_parameters, s, n_params, final)
    store = RunStore(run_dir)
    progress = None
    if resume:
        started_with = json.loads(json.dumps({k: v for k, v in config.items() if k != "pyfuse_version"}))
        if read_run_config(run_dir) != started_with:
            raise UserError(f"resume: {run_dir} was started with other settings (or data); "
                            "pass the same ones, or --force to start over")
        progress = store.restore(net, opt)
    else:
        write_json(run_dir / ADAPTER_CONFIG, config, 4)
    resumed_from = progress.iteration if progress else None
    report = _print_report if verbose else None
    with grad_checkpointing(net, s["grad_checkpoint"]):
        prog = run_loop(net, opt, train_set, valid_set, objective, _loop_args(s), seed=s["seed"], store=store,
                        progress=progress, on_report=report, on_step=on_step, parallel=dp)
    if s["select_best"] and prog.best_iteration is not None:
        net.load_weights(str(run_dir / BEST_WEIGHTS), strict=False)
    if dp is not None:
        dp.check_same(dict(tree_flatten(net.trainable_parameters())))
    net.eval()
    test_loss = None
    if test_set is not None:
        test_loss = evaluate(net, test_set, objective, s["batch_size"], s["test_batches"],
                             s["max_seq_length"], dp)["val_loss"]
        if verbose:
            print(f"Test loss {test_loss:.3f}, Test ppl {math.exp(test_loss):.3f}.", flush=True)
    config.update(best_iteration=prog.best_iteration, best_val_loss=prog.best_val,
                  stopped_early=prog.stopped_early, final_iteration=prog.iteration, test_loss=test_loss)
    what = "full" if lora_parameters is None else f"{fine_tune_type} r={rank} scale={scale:g}"
    finish_dir(run_dir, net, trainable, config, prog, f"{what} lr={s['learning_rate']:g} ({final.name})", warnings)
    if fine_tune_type == "full":
        write_model(lm.name, run_dir, final, config, policy=s["requant_policy"], seed=s["seed"], force=force)
    else:
        publish(run_dir, final, force)
    return TrainResult(adapter_path=final, config=config, modules=wrapped, losses=prog.train,
                       val_losses=prog.val, trainable_parameters=n_params, seconds=time.perf_counter() - started,
                       warnings=warnings, best_iteration=prog.best_iteration, stopped_early=prog.stopped_early,
                       resumed_from=resumed_from, test_loss=test_loss)
