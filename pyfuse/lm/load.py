"""Loading an mlx-lm model, and the one compute-dtype policy for inference.

The policy (:func:`use_compute_dtype`): on MLX's CPU backend, bfloat16 and
float16 parameters are widened to float32 before the model runs, because
MLX's CPU kernels are several times slower in the narrow types. Measured
here (x86_64, 2 cores, MLX 0.32 CPU; 4-bit g64, bfloat16, 4 layers, hidden
512): a 256-token forward pass took 68.5 s as stored and 8.3 s widened
(qwen3_moe; llama 82.5 s and 9.3 s), greedy generation of 4 x 32 tokens 82 s
and 10 s; ``python bench/bench_eval.py --dtype bfloat16 --hidden-size 256
--items 4 --max-tokens 4`` scores MMLU-style items 6.4x as fast widened.
Widening is exact for the stored values (every bfloat16 / float16
number is a float32 number); only the arithmetic is wider. On the GPU the
model runs in its own dtype. Every inference path (``pyfuse eval mc``,
``pyfuse eval identity``, the noise floor's output level) applies the same
policy, so that one model gives the same log-probabilities in each of them.
Training (:mod:`pyfuse.train`) loads with :func:`load_model` as mlx-lm does,
without it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError

NARROW_DTYPES = (mx.bfloat16, mx.float16)

__all__ = ["LoadedModel", "compute_dtype_note", "load_for_inference", "load_graph", "load_model",
           "load_tokenizer", "to_compute_dtype", "use_compute_dtype", "widens"]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str  # the path it came from, or "<in-memory model>"


def widens() -> bool:
    """Whether the compute-dtype policy widens narrow parameters here (the CPU backend)."""
    return mx.default_device() == mx.cpu


def to_compute_dtype(x: mx.array) -> mx.array:
    """One parameter in the dtype the policy computes with."""
    return x.astype(mx.float32) if x.dtype in NARROW_DTYPES and widens() else x


def use_compute_dtype(model) -> None:
    """Apply the policy to a loaded model's parameters (in place)."""
    if widens():
        from mlx.utils import tree_map

        model.update(tree_map(to_compute_dtype, model.parameters()))


def compute_dtype_note() -> str:
    """What the policy does on this device, for reports."""
    return "float32 (parameters widened: MLX's CPU backend)" if widens() else "the model's"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_model(model, adapter_path: str | os.PathLike | None = None, *, lazy: bool = False) -> LoadedModel:
    """A model path (an mlx-lm model directory) or a ``(model, tokenizer)``
    pair -> :class:`LoadedModel`, loaded as mlx-lm loads it (with an
    unfused ``adapter_path`` if given; ``lazy``: weights read from disk only
    when first used). A directory that does not load raises
    :class:`UserError` naming it and the reason."""
    if isinstance(model, LoadedModel):
        if adapter_path is not None:
            raise UserError("adapter_path needs a model path, not an already loaded model")
        return model
    if isinstance(model, tuple):
        if len(model) != 2:
            raise UserError("model must be a path or a (model, tokenizer) pair")
        if adapter_path is not None:
            raise UserError("adapter_path needs a model path, not an already loaded model")
        return LoadedModel(model[0], model[1], "<in-memory model>")
    if not isinstance(model, (str, os.PathLike)):
        raise UserError(f"model must be a path or a (model, tokenizer) pair, got {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    if not path.is_dir():
        raise UserError(f"model path {path} is not a directory (expected an mlx-lm model directory)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json (not an mlx-lm model directory)")
    if adapter_path is not None:
        apath = Path(adapter_path)
        if not (apath / "adapter_config.json").is_file():
            raise UserError(f"adapter path {apath}: no adapter_config.json (not an mlx-lm adapter directory)")
        from ..io.adapter_dir import read_adapter

        read_adapter(apath)  # finite tensors and config numbers: mlx-lm would use a NaN as it is
    from mlx_lm.utils import load

    from ..adapters.layers import load_adapters

    try:
        with contextlib.redirect_stdout(sys.stderr):
            m, tok = load(str(path), lazy=lazy)
            if adapter_path is not None:  # mlx-lm's load_adapters, with pyfuse's DoRA layers (MoE experts)
                load_adapters(m, adapter_path)
                m.eval()
    except Exception as err:  # mlx-lm raises anything from FileNotFoundError to KeyError
        what = "the model" if adapter_path is None else f"the model with adapter {adapter_path}"
        raise UserError(f"{path}: cannot load {what} ({type(err).__name__}: {_first_line(err)})") from None
    return LoadedModel(m, tok, str(path))


def load_for_inference(model, adapter_path: str | os.PathLike | None = None, *, lazy: bool = False) -> LoadedModel:
    """:func:`load_model` for running the model: a path is loaded and the
    compute-dtype policy applied; an already loaded model runs as given
    (call :func:`use_compute_dtype` on it to apply the policy)."""
    loaded = load_model(model, adapter_path, lazy=lazy)
    if isinstance(model, (str, os.PathLike)):
        use_compute_dtype(loaded.model)
    return loaded


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of an mlx-lm model directory, as :func:`load_model`
    loads it (for callers that build the model graph themselves)."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    path = Path(path)
    try:
        eos = load_config(path).get("eos_token_id")
        return mlx_load_tokenizer(path, eos_token_ids=eos)
    except Exception as err:  # transformers raises many types for a missing/corrupt tokenizer
        raise UserError(f"{path}: cannot load the tokenizer ({type(err).__name__}: {_first_line(err)})") from None


def load_graph(path: str | os.PathLike):
    """``(model, config)``: the model graph of an mlx-lm model directory,
    lazily, without tokenizer or compute-dtype policy (for callers that
    re-quantize it, such as the noise floor's baselines)."""
    from mlx_lm.utils import load_model as mlx_load_model

    try:
        return mlx_load_model(Path(path), lazy=True)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UserError(f"{path}: mlx-lm cannot load this model ({err})") from None
