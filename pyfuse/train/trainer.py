"""The glue to mlx-lm's tuner: seeding, inserting the LoRA/DoRA layers,
building and checking the datasets, the optimizer, recording the losses and
running ``mlx_lm.tuner.trainer.train``.

Seeds: Python's ``random``, NumPy's global generator (mlx-lm's batch
order) and MLX's (LoRA initialisation, dropout) are all seeded with
``seed``, again before each step that draws from them, so that the same
seed gives the same adapter bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import random
import types
from pathlib import Path

from ..errors import UserError
from ..io.names import natural_key
from .data import TrainingData

OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor")


def seed_everything(seed: int) -> None:
    import mlx.core as mx
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def add_adapter_layers(net, num_layers: int, lora_parameters: dict, fine_tune_type: str,
                       expected: set[str], seed: int) -> tuple[dict, list[str]]:
    """Freeze ``net`` and let mlx-lm insert its LoRA/DoRA layers; returns
    ``(trainable parameters by name, wrapped module paths)`` after checking
    that exactly the ``expected`` modules were wrapped."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    net.freeze()
    seed_everything(seed)
    try:
        linear_to_lora_layers(net, num_layers, dict(lora_parameters), use_dora=(fine_tune_type == "dora"))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"mlx-lm cannot add {fine_tune_type} layers: {err}") from None
    trainable = dict(tree_flatten(net.trainable_parameters()))
    wrapped = sorted({k.rsplit(".", 1)[0] for k in trainable}, key=natural_key)
    if set(wrapped) != expected:
        raise RuntimeError(f"mlx-lm wrapped {len(wrapped)} modules, expected {len(expected)}: "
                           f"{sorted(set(wrapped) ^ expected)[:4]}")
    return trainable, wrapped


def _check_tokenized(ds, where: list[str], max_seq_length: int) -> int:
    """Tokenize every row (errors name the row); returns how many are too long."""
    too_long = 0
    for i in range(len(ds)):
        try:
            tokens, offset = ds[i]
        except Exception as err:  # a chat template that rejects the row, ...
            raise UserError(f"{where[i]}: cannot tokenize the row ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
        if len(tokens) > max_seq_length:
            too_long += 1
        if offset >= min(len(tokens), max_seq_length):
            raise UserError(f"{where[i]}: nothing to learn: with mask_prompt the completion "
                            f"starts at token {offset} of {len(tokens)} (max_seq_length {max_seq_length})")
    return too_long


def datasets(td: TrainingData, tokenizer, mask_prompt: bool, max_seq_length: int,
             warnings: list[str]):
    """mlx-lm's cached train and (or None) valid datasets, every row
    tokenized once here; rows over ``max_seq_length`` add a warning."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    ds_config = types.SimpleNamespace(mask_prompt=mask_prompt)
    train_set = CacheDataset(create_dataset(td.train, tokenizer, ds_config))
    valid_set = CacheDataset(create_dataset(td.valid, tokenizer, ds_config)) if td.valid else None
    for ds, where in ((train_set, td.train_where), (valid_set, td.valid_where)):
        if ds is None:
            continue
        too_long = _check_tokenized(ds, where, max_seq_length)
        if too_long:
            warnings.append(f"{too_long} row(s) of {where[0].rsplit(':', 1)[0]} are longer than "
                            f"max_seq_length={max_seq_length} and are truncated")
    return train_set, valid_set


def make_optimizer(name: str, learning_rate: float):
    import mlx.optimizers as optim

    opt_cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD,
               "adafactor": optim.Adafactor}[name]
    return opt_cls(learning_rate=learning_rate)


class LossRecorder:
    """mlx-lm TrainingCallback that keeps every report."""

    def __init__(self):
        self.train: list[dict] = []
        self.val: list[dict] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.train.append({"iteration": int(info["iteration"]), "train_loss": float(info["train_loss"]),
                           "learning_rate": float(info["learning_rate"]),
                           "tokens_per_second": float(info["tokens_per_second"]),
                           "trained_tokens": int(info["trained_tokens"])})

    def on_val_loss_report(self, info: dict) -> None:
        self.val.append({"iteration": int(info["iteration"]), "val_loss": float(info["val_loss"])})


@contextlib.contextmanager
def _restored_call(layer_cls):
    """mlx-lm's grad_checkpoint patches ``type(layer).__call__`` for the whole
    process; put it back afterwards."""
    had = "__call__" in vars(layer_cls)
    original = vars(layer_cls).get("__call__")
    try:
        yield
    finally:
        if had:
            layer_cls.__call__ = original
        elif "__call__" in vars(layer_cls):
            delattr(layer_cls, "__call__")


def run_trainer(net, opt, train_set, valid_set, weights_file: Path, *, seed: int, verbose: bool,
                **args) -> LossRecorder:
    """``mlx_lm.tuner.trainer.train`` with ``TrainingArgs(**args)``, saving
    the adapter weights once, at the end, to ``weights_file``; mlx-lm's log
    goes to stdout only when ``verbose``."""
    from mlx_lm.tuner.trainer import TrainingArgs, train

    recorder = LossRecorder()
    targs = TrainingArgs(**args, steps_per_save=args["iters"] + 1, adapter_file=str(weights_file))
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    seed_everything(seed)
    with sink, _restored_call(type(net.layers[0])):
        train(model=net, optimizer=opt, train_dataset=train_set, val_dataset=valid_set, args=targs,
              training_callback=recorder)
    net.eval()
    return recorder
