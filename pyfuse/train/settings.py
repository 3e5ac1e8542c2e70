"""Checking the settings of a training run before anything is loaded."""

from __future__ import annotations

import math

from ..errors import UserError
from ..options import MAX_LORA_RANK

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")

__all__ = ["FINE_TUNE_TYPES", "OPTIMIZERS", "check_int", "check_number", "check_settings"]


def check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name, value, *, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise UserError(f"{name} must be a {'positive ' if positive else ''}number, got {value!r}")


def check_lr_schedule(schedule) -> None:
    """mlx-lm's form: ``{name: <mlx.optimizers.schedulers function>,
    arguments: [initial_lr, ...], warmup: N, warmup_init: lr}``."""
    import mlx.optimizers as optim

    if schedule is None:
        return
    if not isinstance(schedule, dict) or "name" not in schedule or "arguments" not in schedule:
        raise UserError(f"lr_schedule must be a mapping with name and arguments (as mlx-lm's config: "
                        f"{{name: cosine_decay, arguments: [1e-5, 1000, 1e-7], warmup: 100}}), got {schedule!r}")
    unknown = set(schedule) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        raise UserError(f"lr_schedule: unknown key(s) {', '.join(sorted(unknown))} "
                        "(name, arguments, warmup, warmup_init)")
    names = sorted(n for n in dir(optim.schedulers) if n.endswith("_decay") or n.endswith("_schedule"))
    if schedule["name"] not in names:
        raise UserError(f"lr_schedule: unknown schedule {schedule['name']!r} (one of {', '.join(names)})")
    args = schedule["arguments"]
    if not isinstance(args, list) or not args:
        raise UserError("lr_schedule: arguments must be a non-empty list, the initial learning rate first")
    check_number("lr_schedule: the initial learning rate", args[0])
    check_int("lr_schedule: warmup", schedule.get("warmup", 0), 0)
    check_number("lr_schedule: warmup_init", schedule.get("warmup_init", 0.0), positive=False)
    try:
        from mlx_lm.tuner.utils import build_schedule

        build_schedule(schedule)(0)
    except (TypeError, ValueError) as err:
        raise UserError(f"lr_schedule: {schedule['name']}{tuple(args)}: {err}") from None


def check_settings(fine_tune_type: str, rank: int, scale: float, dropout: float, s: dict) -> None:
    """The arguments of :func:`.lora.train_adapter`; ``s``: the run settings."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise UserError(f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, got {fine_tune_type!r}")
    if s["optimizer"] not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {s['optimizer']!r}")
    if not isinstance(s["optimizer_config"], dict):
        raise UserError("optimizer_config must be a mapping of optimizer name to its arguments")
    check_int("rank", rank)
    if rank > MAX_LORA_RANK:  # the same bound the experiment spec puts on rank
        raise UserError(f"rank must be at most {MAX_LORA_RANK}, got {rank}")
    check_number("scale (alpha / rank)", scale)
    check_number("learning_rate", s["learning_rate"])
    check_number("dropout", dropout, positive=False)
    if not 0 <= dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
    for key in ("iters", "batch_size", "grad_accumulation_steps", "steps_per_eval", "steps_per_report",
                "save_every"):
        check_int(key, s[key])
    check_int("max_seq_length", s["max_seq_length"], 2)
    check_int("early_stop_patience", s["early_stop_patience"], 0)
    check_int("clear_cache_threshold", s["clear_cache_threshold"], 0)
    for key in ("val_batches", "test_batches"):
        if s[key] != -1:
            check_int(f"{key} (or -1 for the whole set)", s[key])
    check_int("seed", s["seed"], 0)
    check_lr_schedule(s["lr_schedule"])
    if s["train_mode"] not in ("sft", "dpo", "orpo"):
        raise UserError(f"train_mode must be sft, dpo or orpo, got {s['train_mode']!r}")
    check_number("beta", s["beta"])
