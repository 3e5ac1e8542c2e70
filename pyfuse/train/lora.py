"""LoRA / DoRA training through mlx-lm's own tuner, with explicit layers.

:func:`train_adapter` is ``mlx_lm lora --train`` with three additions:

* **explicit layer indices** (``layers=[8, 14, 20]``), where mlx-lm only
  offers "the last N layers";
* ``alpha``: mlx-lm's LoRA layers take a ``scale``; here ``scale = alpha /
  rank`` (the usual LoRA convention; rank 8, alpha 16 -> scale 2.0);
* an atomic output directory (written in a hidden temporary directory next
  to ``adapter_path`` and renamed at the end: an interrupted run leaves
  nothing behind) with the loss curve (``loss.json``, ``loss.png``).

Everything else is mlx-lm's: the datasets (``mlx_lm.tuner.datasets``: chat
``{"messages": [...]}``, completions ``{"prompt", "completion"}`` and
``{"text"}`` rows, the format decided by the first row, ``mask_prompt``),
the LoRA/DoRA layers (``linear_to_lora_layers``), the batching and the
training loop (``mlx_lm.tuner.trainer.train`` with ``TrainingArgs``; a
``TrainingCallback`` records the losses), the Adam optimizer and its
defaults. Every row is validated first (errors name the file and line).

The adapter directory is what ``mlx_lm lora`` writes and what ``mlx_lm
fuse``, ``mlx_lm.load(..., adapter_path=...)`` and ``pyfuse fuse`` read:

* ``adapters.safetensors``: ``<module path>.lora_a`` / ``.lora_b`` (and
  ``.m`` for DoRA) of the trained modules only;
* ``adapter_config.json``: ``fine_tune_type``, ``num_layers``,
  ``lora_parameters`` ``{rank, scale, dropout, keys}`` and the training
  settings (``model``, ``data``, ``iters``, ``batch_size``,
  ``learning_rate``, ``seed``, ...), plus ``alpha`` and ``layers``.

How the layers are written so that mlx-lm applies exactly them:

* ``layers=None`` (all layers): the standard form, ``num_layers`` = the
  model's layer count and ``keys`` the module names inside a layer
  (``self_attn.q_proj``, ``mlp.switch_mlp.down_proj``...).
* explicit layers: ``keys`` are the **full module paths** of the selected
  modules (``model.layers.8.mlp.switch_mlp.down_proj``...) and ``layers``
  lists the indices. mlx-lm's ``linear_to_lora_layers`` (used by
  ``load_adapters``, hence by ``mlx_lm fuse``) matches ``keys`` against
  the names inside each of the last ``num_layers`` layers *and* against the
  model's full module paths; full paths match only the second way, so
  exactly the trained modules get LoRA layers (checked in the tests with
  mlx-lm 0.32.2) and ``mlx_lm fuse`` re-quantizes nothing else.
  ``num_layers`` is set to cover the lowest selected layer (``n_layers -
  min(layers)``) for tools that read it as "the last N layers".

Seeds: Python's ``random``, NumPy's global generator (mlx-lm's batch
order) and MLX's (LoRA initialisation, dropout) are all seeded with ``seed``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..io.names import natural_key
from ..io.files import TMP_MARK, open_text, publish_dir

FINE_TUNE_TYPES = ("lora", "dora")
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor")
DATA_FORMATS = ("chat", "completions", "text")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
LOSS_FILE = "loss.json"
LOSS_PLOT = "loss.png"

__all__ = ["TrainResult", "TrainingData", "load_training_data", "parse_layers", "train_adapter"]


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Validated rows in one of mlx-lm's formats (``chat``, ``completions``,
    ``text``). ``where`` gives each row's origin (``file: line N``)."""

    train: list[dict]
    valid: list[dict]
    format: str
    source: str
    train_where: list[str] = field(default_factory=list)
    valid_where: list[str] = field(default_factory=list)


_ROLES = ("system", "user", "assistant", "tool")


def _row_format(row: dict) -> str | None:
    # mlx-lm's create_dataset order: completions, chat, text
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return None


def _check_row(row: Any, fmt: str | None, where: str) -> str:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    got = _row_format(row)
    if got is None:
        raise UserError(f"{where}: not an mlx-lm training row: expected 'messages' (chat), "
                        f"'prompt' and 'completion' (completions) or 'text', got keys "
                        f"{sorted(row)[:6]}")
    if fmt is not None and got != fmt:
        raise UserError(f"{where}: a {got} row in {fmt} data (mlx-lm takes the format from the "
                        "first row; use one format per file)")
    if got == "chat":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: field 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m:
                raise UserError(f"{where}: field 'messages[{j}]' must be an object with 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise UserError(f"{where}: field 'messages[{j}].role': unknown role {m['role']!r} "
                                f"(one of {', '.join(_ROLES)})")
            content = m.get("content")
            if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
                raise UserError(f"{where}: field 'messages[{j}].content' must be a string")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: field 'messages' has no assistant turn to learn from")
    elif got == "completions":
        for k in ("prompt", "completion"):
            if not isinstance(row[k], str):
                raise UserError(f"{where}: field '{k}' must be a string")
        if not row["completion"]:
            raise UserError(f"{where}: field 'completion' is empty")
    else:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise UserError(f"{where}: field 'text' must be a non-empty string")
    return got


def _read_jsonl_rows(path: Path) -> tuple[list[Any], list[str]]:
    rows, where = [], []
    fh = open_text(path)
    with fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: line {lineno}: not valid JSON ({err.msg})") from None
                where.append(f"{path}: line {lineno}")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text (expected JSON Lines)") from None
    return rows, where


def load_training_data(data) -> TrainingData:
    """mlx-lm training data from a directory (``train.jsonl``, optional
    ``valid.jsonl``, as ``mlx_lm lora --data``), one ``.jsonl`` file (train
    only) or a list of row dicts. Every row is checked; the format is the
    first row's and every other row (train and valid) must share it."""
    if isinstance(data, (list, tuple)):
        source = "<rows>"
        train, tw = list(data), [f"row {i}" for i in range(len(data))]
        valid, vw = [], []
    elif isinstance(data, (str, os.PathLike)):
        path = Path(data)
        source = str(path)
        if path.is_dir():
            tpath = path / "train.jsonl"
            if not tpath.exists():
                raise UserError(f"{path}: no train.jsonl (a data directory holds train.jsonl and "
                                "optionally valid.jsonl)")
            train, tw = _read_jsonl_rows(tpath)
            vpath = path / "valid.jsonl"
            valid, vw = _read_jsonl_rows(vpath) if vpath.exists() else ([], [])
            if vpath.exists() and not valid:
                raise UserError(f"{vpath}: no rows (remove the file to train without validation)")
        elif path.exists():
            train, tw = _read_jsonl_rows(path)
            valid, vw = [], []
        else:
            raise UserError(f"data {path} does not exist")
    else:
        raise UserError(f"data must be a directory, a .jsonl file or a list of rows, got {type(data).__name__}")
    if not train:
        raise UserError(f"{source}: no training rows")
    fmt = _check_row(train[0], None, tw[0])
    for row, w in zip(train[1:], tw[1:]):
        _check_row(row, fmt, w)
    for row, w in zip(valid, vw):
        _check_row(row, fmt, w)
    return TrainingData(train=train, valid=valid, format=fmt, source=source, train_where=tw, valid_where=vw)


# ---------------------------------------------------------------------------
# Layers and keys
# ---------------------------------------------------------------------------


def parse_layers(layers, n_layers: int) -> list[int] | None:
    """``None``/``"all"`` -> None (every layer); ``[8, 14, 20]``, ``"8,14,20"``,
    ``"4-7,10"`` -> sorted unique indices (negative ones count from the end)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        spec = layers.strip()
        if spec.lower() == "all":
            return None
        out: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                raise UserError(f"layers {layers!r}: empty item")
            try:
                if "-" in part[1:]:
                    a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise UserError(f"layers {layers!r}: range {part} is empty")
                    out.extend(range(lo, hi + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise UserError(f"layers {layers!r}: {part!r} is not an index or a range like 4-7") from None
        layers = out
    try:
        items = list(layers)
    except TypeError:
        raise UserError(f"layers must be a list of indices, got {layers!r}") from None
    if not items:
        raise UserError("layers is empty")
    result = set()
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise UserError(f"layers: {i!r} is not an integer")
        if not -n_layers <= i < n_layers:
            raise UserError(f"layer {i} is out of range: the model has {n_layers} layers (0-{n_layers - 1})")
        result.add(i % n_layers)
    return sorted(result)


def _lora_types():
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear, nn.Embedding,
            nn.QuantizedEmbedding)


def _is_lora_target(module) -> bool:
    return hasattr(module, "to_lora") or isinstance(module, _lora_types())


def _layer_targets(layer) -> dict[str, Any]:
    """LoRA-able modules inside one transformer block, by relative name."""
    return {name: m for name, m in layer.named_modules() if name and _is_lora_target(m)}


def _resolve_modules(model, layers: list[int] | None, keys: Sequence[str] | None):
    """(selected layer indices, relative keys, {full path: module})."""
    n = len(model.layers)
    indices = list(range(n)) if layers is None else layers
    path_of = {id(m): p for p, m in model.named_modules()}
    per_layer = {i: _layer_targets(model.layers[i]) for i in indices}
    available = sorted({k for t in per_layer.values() for k in t})
    if keys is None:
        rel_keys = available
    else:
        if isinstance(keys, str):
            keys = [k.strip() for k in keys.split(",") if k.strip()]
        rel_keys = list(dict.fromkeys(keys))
        if not rel_keys:
            raise UserError("keys is empty")
        unknown = [k for k in rel_keys if k not in available]
        if unknown:
            where = "the selected layers" if layers is not None else "the model's layers"
            raise UserError(f"key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                            f"match{'' if len(unknown) > 1 else 'es'} no Linear/SwitchLinear/Embedding "
                            f"module in {where}; available: {', '.join(available)}")
    modules = {}
    for i in indices:
        prefix = path_of.get(id(model.layers[i]))
        if prefix is None:
            raise UserError("cannot locate the model's layers among its modules")
        for k in rel_keys:
            if k in per_layer[i]:
                modules[f"{prefix}.{k}"] = per_layer[i][k]
    if not modules:
        raise UserError("no module to train: the keys match nothing in the selected layers")
    return indices, rel_keys, modules


def _check_dora(modules: dict[str, Any]) -> None:
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    for path, m in modules.items():
        if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)):
            raise UserError(f"DoRA is not available for MoE expert layers (SwitchLinear) in mlx-lm: "
                            f"{path}; use fine_tune_type lora, or keys without the switch_mlp experts")
        if isinstance(m, nn.QuantizedLinear) and (32 % m.bits):
            raise UserError(f"DoRA cannot train the {m.bits}-bit layer {path}: mlx-lm's DoRALinear "
                            f"mis-sizes {m.bits}-bit layers (input_dims *= 32 // bits), so neither "
                            "training nor mlx_lm fuse would work; use lora, or a 2/4/8-bit model")
        if isinstance(m, nn.QuantizedEmbedding):
            raise UserError(f"DoRA on the quantized embedding {path} is not supported by mlx-lm")


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


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


def _check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name, value, *, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise UserError(f"{name} must be a {'positive ' if positive else ''}number, got {value!r}")


def _seed_everything(seed: int) -> None:
    import mlx.core as mx
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


class _Recorder:
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


def _tmp_dir_for(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


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
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise UserError(f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, got {fine_tune_type!r}")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    _check_int("rank", rank)
    _check_number("alpha", alpha)
    _check_number("learning_rate", learning_rate)
    _check_number("dropout", dropout, positive=False)
    if not 0 <= dropout < 1:
        raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
    for name, value in (("iters", iters), ("batch_size", batch_size),
                        ("grad_accumulation", grad_accumulation), ("steps_per_eval", steps_per_eval),
                        ("steps_per_report", steps_per_report)):
        _check_int(name, value)
    _check_int("max_seq_length", max_seq_length, 2)
    if val_batches != -1:
        _check_int("val_batches (or -1 for the whole validation set)", val_batches)
    _check_int("seed", seed, 0)
    final = Path(adapter_path)
    if (final.exists() or final.is_symlink()) and not force:
        raise UserError(f"{final} exists (pass force=True / --force to replace it)")
    td = load_training_data(data)
    if mask_prompt and td.format == "text":
        raise UserError(f"{td.source}: mask_prompt needs chat or completions rows, the data is text rows")
    if len(td.train) < batch_size:
        raise UserError(f"{td.source}: {len(td.train)} training rows, fewer than batch_size={batch_size}")
    if td.valid and len(td.valid) < batch_size:
        raise UserError(f"{td.source}: {len(td.valid)} validation rows, fewer than batch_size={batch_size}")

    from ..evals.mc import load_model

    _seed_everything(seed)
    lm = load_model(model)
    net, tokenizer = lm.model, lm.tokenizer
    if td.format in ("chat", "completions") and not getattr(tokenizer, "has_chat_template", False):
        raise UserError(f"{lm.name}: the tokenizer has no chat template, needed for {td.format} rows "
                        "(use text rows)")
    n_layers = len(net.layers)
    selected = parse_layers(layers, n_layers)
    indices, rel_keys, modules = _resolve_modules(net, selected, keys)
    if fine_tune_type == "dora":
        _check_dora(modules)
    scale = float(alpha) / rank
    if selected is None:
        num_layers, cfg_keys = n_layers, rel_keys
    else:
        num_layers, cfg_keys = n_layers - min(selected), sorted(modules, key=natural_key)
    lora_parameters = {"rank": rank, "scale": scale, "dropout": float(dropout), "keys": cfg_keys}

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    net.freeze()
    _seed_everything(seed)
    try:
        linear_to_lora_layers(net, num_layers, dict(lora_parameters), use_dora=(fine_tune_type == "dora"))
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"mlx-lm cannot add {fine_tune_type} layers: {err}") from None
    trainable = dict(tree_flatten(net.trainable_parameters()))
    wrapped = sorted({k.rsplit(".", 1)[0] for k in trainable}, key=natural_key)
    if set(wrapped) != set(modules):
        raise RuntimeError(f"mlx-lm wrapped {len(wrapped)} modules, expected {len(modules)}: "
                           f"{sorted(set(wrapped) ^ set(modules))[:4]}")
    n_params = sum(v.size for v in trainable.values())

    ds_config = types.SimpleNamespace(mask_prompt=mask_prompt)
    warnings: list[str] = []
    train_set = CacheDataset(create_dataset(td.train, tokenizer, ds_config))
    valid_set = CacheDataset(create_dataset(td.valid, tokenizer, ds_config)) if td.valid else None
    for ds, where in ((train_set, td.train_where), (valid_set, td.valid_where)):
        if ds is None:
            continue
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
        if too_long:
            warnings.append(f"{too_long} row(s) of {where[0].rsplit(':', 1)[0]} are longer than "
                            f"max_seq_length={max_seq_length} and are truncated")

    opt_cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD,
               "adafactor": optim.Adafactor}[optimizer]
    opt = opt_cls(learning_rate=learning_rate)
    recorder = _Recorder()

    config = {
        "model": lm.name,
        "data": td.source,
        "data_format": td.format,
        "fine_tune_type": fine_tune_type,
        "num_layers": num_layers,
        "layers": selected,
        "lora_parameters": lora_parameters,
        "alpha": float(alpha),
        "iters": iters,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": optimizer,
        "grad_accumulation_steps": grad_accumulation,
        "max_seq_length": max_seq_length,
        "mask_prompt": mask_prompt,
        "grad_checkpoint": grad_checkpoint,
        "seed": seed,
        "val_batches": val_batches,
        "steps_per_eval": steps_per_eval,
        "steps_per_report": steps_per_report,
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

    tmp = _tmp_dir_for(final)
    try:
        args = TrainingArgs(batch_size=batch_size, iters=iters, val_batches=val_batches,
                            steps_per_report=steps_per_report, steps_per_eval=steps_per_eval,
                            steps_per_save=iters + 1, max_seq_length=max_seq_length,
                            adapter_file=str(tmp / ADAPTER_WEIGHTS), grad_checkpoint=grad_checkpoint,
                            grad_accumulation_steps=grad_accumulation)
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        _seed_everything(seed)
        with sink, _restored_call(type(net.layers[0])):
            train(model=net, optimizer=opt, train_dataset=train_set, val_dataset=valid_set, args=args,
                  training_callback=recorder)
        net.eval()
        saved = mx.load(str(tmp / ADAPTER_WEIGHTS))
        if set(saved) != set(trainable):
            raise RuntimeError("mlx-lm saved different adapter tensors than were trained")
        losses = [r["train_loss"] for r in recorder.train] + [r["val_loss"] for r in recorder.val]
        if any(not math.isfinite(x) for x in losses):
            warnings.append("the loss became NaN/inf: lower learning_rate")
        with open(tmp / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=4)
            f.write("\n")
        with open(tmp / LOSS_FILE, "w", encoding="utf-8") as f:
            json.dump({"steps_per_report": steps_per_report, "train": recorder.train,
                       "val": recorder.val}, f, indent=2)
            f.write("\n")
        _plot_losses(tmp / LOSS_PLOT, recorder.train, recorder.val,
                     f"{fine_tune_type} r={rank} alpha={alpha:g} lr={learning_rate:g} ({final.name})")
        publish_dir(tmp, final, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TrainResult(adapter_path=final, config=config, modules=wrapped, losses=recorder.train,
                       val_losses=recorder.val, trainable_parameters=n_params,
                       seconds=time.perf_counter() - started, warnings=warnings)
