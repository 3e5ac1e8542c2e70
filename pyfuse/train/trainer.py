"""The glue to mlx-lm's tuner: seeding, inserting the LoRA/DoRA layers,
building and checking the datasets, the optimizer (with mlx-lm's
learning-rate schedules) and mlx-lm's gradient checkpointing.

Seeds: Python's ``random``, NumPy's global generator (mlx-lm's batch
order) and MLX's (LoRA initialisation, dropout) are all seeded with
``seed``, again before each step that draws from them, so that the same
seed gives the same adapter bit for bit.
"""

from __future__ import annotations

import contextlib
import random
import types

from ..errors import UserError
from ..io.names import natural_key
from .data import TrainingData



def seed_everything(seed: int) -> None:
    import mlx.core as mx
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def add_adapter_layers(net, num_layers: int, lora_parameters: dict, fine_tune_type: str,
                       expected: set[str], seed: int) -> tuple[dict, list[str]]:
    """Freeze ``net`` and insert the LoRA/DoRA layers (mlx-lm's, and
    pyfuse's DoRA where mlx-lm has none: :mod:`pyfuse.adapters.layers`); returns
    ``(trainable parameters by name, wrapped module paths)`` after checking
    that exactly the ``expected`` modules were wrapped."""
    from mlx.utils import tree_flatten
    from ..adapters.layers import to_adapter_layers

    net.freeze()
    seed_everything(seed)
    try:
        to_adapter_layers(net, num_layers, dict(lora_parameters), use_dora=(fine_tune_type == "dora"))
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
    """mlx-lm's cached train, valid and test datasets (None when there are
    no rows), every row tokenized once here; rows over ``max_seq_length``
    add a warning."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    ds_config = types.SimpleNamespace(mask_prompt=mask_prompt)
    out = []
    for rows, where in ((td.train, td.train_where), (td.valid, td.valid_where), (td.test, td.test_where)):
        if not rows:
            out.append(None)
            continue
        ds = CacheDataset(create_dataset(rows, tokenizer, ds_config))
        too_long = _check_tokenized(ds, where, max_seq_length)
        if too_long:
            warnings.append(f"{too_long} row(s) of {where[0].rsplit(':', 1)[0]} are longer than "
                            f"max_seq_length={max_seq_length} and are truncated")
        out.append(ds)
    return tuple(out)


def make_optimizer(name: str, learning_rate: float, lr_schedule: dict | None = None,
                   optimizer_config: dict | None = None):
    """mlx-lm's optimizer choice: the learning rate, or mlx-lm's
    ``build_schedule(lr_schedule)``, and ``optimizer_config[name]``'s arguments."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import build_schedule

    opt_cls = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
               "adafactor": optim.Adafactor}[name]
    lr = build_schedule(lr_schedule) if lr_schedule else learning_rate
    try:
        return opt_cls(learning_rate=lr, **((optimizer_config or {}).get(name) or {}))
    except TypeError as err:
        raise UserError(f"optimizer_config.{name}: {err}") from None


def preference_sets(net, tokenizer, td: TrainingData, s: dict, run_dir, resume: bool):
    """The pair datasets of ``td`` (train, valid, test; None when empty) and
    the DPO/ORPO objective. DPO's reference log-probabilities are those of
    ``net`` as it is (the starting model), computed once and kept in
    ``run_dir`` (``reference_logps.safetensors``) for a resume."""
    import mlx.core as mx
    import numpy as np

    from .preference import PairDataset, compute_reference, pair_objective

    sets = [PairDataset(rows, tokenizer) if rows else None for rows in (td.train, td.valid, td.test)]
    if s["train_mode"] == "dpo":
        cache = run_dir / "reference_logps.safetensors"
        saved = mx.load(str(cache)) if resume and cache.exists() else {}
        for name, ds in zip(("train", "valid", "test"), sets):
            if ds is None:
                continue
            if name in saved:
                ds.ref = np.array(saved[name])
            else:
                compute_reference(net, ds, s["batch_size"], s["max_seq_length"])
        mx.save_safetensors(str(cache), {n: mx.array(ds.ref) for n, ds in zip(("train", "valid", "test"), sets)
                                         if ds is not None})
    return tuple(sets), pair_objective(s["train_mode"], s["beta"])


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


@contextlib.contextmanager
def grad_checkpointing(net, enabled: bool):
    """mlx-lm's ``grad_checkpoint`` on the model's layer class while the block runs."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    with _restored_call(type(net.layers[0])):
        if enabled:
            grad_checkpoint(net.layers[0])
        yield
