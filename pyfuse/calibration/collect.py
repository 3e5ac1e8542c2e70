"""``X^T X`` of chosen modules' inputs, from one pass of the base model over
calibration data.

Each chosen module (an mlx-lm ``(Quantized)Linear`` or
``(Quantized)SwitchLinear``, by its tensor path such as
``model.layers.3.mlp.switch_mlp.down_proj``) is wrapped for the pass by a
recorder that adds ``x^T x`` of every input row it sees, in float32: for a
SwitchLinear, per expert, from the tokens the router sent to that expert
(the same rows ``gather_qmm`` multiplies by that expert).

The pass streams layer by layer (:func:`_layer_by_layer`): the model is
loaded lazily, every calibration sequence is embedded, then each decoder
layer up to the last one holding a chosen module runs over all sequences
before the next, and is dropped once done. Memory is bounded by: the
embedding plus ONE decoder layer's weights (later layers and the head are
never read), the hidden states of all calibration tokens at one layer
(``tokens x hidden`` floats in the compute dtype: 200k tokens x 2048
float32 = 1.6 GB) and the sums (``in x in`` float32 per expert of each
chosen module). Each layer is called with the arguments the model's own
forward gives it (captured by running the forward once per sequence with
every layer an identity), so mlx-lm's model classes are reused as they are.
A model whose layout is not ``model.model.layers`` (or an already loaded
model, which is not ours to dismantle) runs whole, one sequence at a time
(:func:`_whole_model`): the model plus one sequence's activations plus the
sums.

Every ``held_out``-th sequence (by position) feeds a second sum instead, for
output-space figures on activations the calibration did not see.

Experts that receive fewer than ``min_tokens`` calibration tokens (default:
the module's number of inputs, and at least :data:`MIN_EXPERT_TOKENS`) get
``H = 0``, which :func:`pyfuse.kernel.calibrated.propagation_matrix` turns
into plain nearest rounding on the kept grid (the documented fallback): a
Hessian of fewer tokens than inputs is rank-deficient and steers the rounding
error into directions no token measured (on the tiny test MoE, ~50 tokens per
64-input expert made the held-out output error 1.9x that of plain rounding).
Which experts fell back is reported per module.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..errors import UserError
from ..progress import track
from .texts import calibration_sequences, is_held_out

# Experts with fewer calibration tokens than this are rounded plainly (H = 0).
MIN_EXPERT_TOKENS = 32
# Every HELD_OUT_EVERY-th sequence is held out (0: none).
HELD_OUT_EVERY = 4
MAX_SEQ_LEN = 2048


@dataclass
class ModuleHessian:
    """The sums of one module. ``fit``: ``X^T X`` over the calibration
    tokens, float32 ``[E, in, in]`` (SwitchLinear) or ``[in, in]``, zero for
    the experts in ``fallback``; ``held_out``: the same over the held-out
    tokens (None without held-out sequences); ``tokens`` / ``held_out_tokens``:
    token counts per expert (one entry for a Linear)."""

    path: str
    fit: mx.array
    held_out: mx.array | None
    tokens: list[int]
    held_out_tokens: list[int]
    fallback: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        return {"tokens": int(sum(self.tokens)), "held_out_tokens": int(sum(self.held_out_tokens)),
                "experts": len(self.tokens), "experts_fallback": len(self.fallback),
                "fallback": list(self.fallback), "min_expert_tokens": int(min(self.tokens))}


class _Sums:
    """Running ``X^T X`` per expert (lists of [in, in] arrays, so that one
    expert's update never copies the others)."""

    def __init__(self, experts: int, in_dims: int):
        self.h = [mx.zeros((in_dims, in_dims), dtype=mx.float32) for _ in range(experts)]
        self.tokens = np.zeros(experts, dtype=np.int64)

    def add(self, x: mx.array, expert: int) -> None:
        self.h[expert] = self.h[expert] + x.T @ x
        self.tokens[expert] += x.shape[0]


class _Recorder(nn.Module):
    """Stands in for a module during the pass: records its inputs, then calls it."""

    def __init__(self, inner: nn.Module, experts: int | None):
        super().__init__()
        self.inner = inner
        self.is_switch = experts is not None
        in_dims = _in_dims(inner)
        self.sums = {"fit": _Sums(experts or 1, in_dims), "held_out": _Sums(experts or 1, in_dims)}
        self.target = "fit"

    def __call__(self, x, *args, **kwargs):
        sums = self.sums[self.target]
        if not self.is_switch:
            sums.add(x.reshape(-1, x.shape[-1]).astype(mx.float32), 0)
        else:
            indices = args[0] if args else kwargs["indices"]
            _add_routed(sums, x, indices)
        return self.inner(x, *args, **kwargs)

    def arrays(self) -> list[mx.array]:
        return [h for s in self.sums.values() for h in s.h]


def _add_routed(sums: _Sums, x: mx.array, indices: mx.array) -> None:
    """Per expert, the rows gather_(q)mm multiplies by it: ``x`` is
    ``[..., 1, in]`` and broadcasts against ``indices``."""
    d = x.shape[-1]
    rows = mx.broadcast_to(x[..., 0, :], (*indices.shape, d)).reshape(-1, d).astype(mx.float32)
    idx = np.asarray(indices.reshape(-1))
    order = np.argsort(idx, kind="stable")
    experts, starts, counts = np.unique(idx[order], return_index=True, return_counts=True)
    rows = rows[mx.array(order)]
    for e, start, count in zip(experts.tolist(), starts.tolist(), counts.tolist()):
        sums.add(rows[start:start + count], e)


def _in_dims(module: nn.Module) -> int:
    if hasattr(module, "input_dims"):
        return int(module.input_dims)
    if "scales" in module:  # QuantizedLinear
        return int(module.scales.shape[-1] * module.group_size)
    return int(module.weight.shape[-1])


def _parent_and_name(model: nn.Module, path: str):
    parts = path.split(".")
    node = model
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else getattr(node, part, None)
        if node is None:
            raise UserError(f"calibration: the model has no module {path}")
    if not isinstance(getattr(node, parts[-1], None), nn.Module):
        raise UserError(f"calibration: the model has no module {path}")
    return node, parts[-1]


@contextlib.contextmanager
def recording(model: nn.Module, paths: Iterable[str]):
    """Wraps each module in ``paths`` with a :class:`_Recorder` (restored on exit)."""
    swapped = {}
    try:
        for path in paths:
            parent, name = _parent_and_name(model, path)
            inner = getattr(parent, name)
            experts = int(inner.num_experts) if hasattr(inner, "num_experts") else None
            rec = _Recorder(inner, experts)
            setattr(parent, name, rec)
            swapped[path] = (parent, name, rec)
        yield {p: rec for p, (_, _, rec) in swapped.items()}
    finally:
        for parent, name, rec in swapped.values():
            setattr(parent, name, rec.inner)


def collect_hessians(
    model: str | os.PathLike,
    data,
    modules: Iterable[str],
    *,
    min_tokens: int | None = None,
    held_out_every: int = HELD_OUT_EVERY,
    max_seq_len: int = MAX_SEQ_LEN,
    layer_by_layer: bool = True,
) -> dict[str, ModuleHessian]:
    """``X^T X`` of each module in ``modules`` (tensor paths) over ``data``
    (an mlx-lm ``.jsonl`` file or data directory: ``text``, ``messages`` or
    ``prompt``/``completion`` rows) run through the base model ``model``.
    ``layer_by_layer=False`` runs the whole model per sequence instead (same
    sums; the oracle of the layer-wise pass in the tests)."""
    from ..lm.load import load_for_inference

    paths = list(dict.fromkeys(modules))
    if min_tokens is not None and (not isinstance(min_tokens, int) or min_tokens < 0):
        raise UserError(f"--calibration-min-tokens must be a whole number >= 0, got {min_tokens!r}")
    owned = isinstance(model, (str, os.PathLike))
    loaded = load_for_inference(model, lazy=owned and layer_by_layer)
    seqs = calibration_sequences(loaded.tokenizer, data, max_seq_len=max_seq_len)
    targets = [_target(i, len(seqs), held_out_every) for i in range(len(seqs))]
    last = _last_layer(paths)
    with recording(loaded.model, paths) as recorders:
        done = (owned and layer_by_layer and last is not None
                and _layer_by_layer(loaded.model, seqs, targets, recorders, last))
        if not done:
            _whole_model(loaded.model, seqs, targets, recorders)
    return {p: _finish(p, rec, min_tokens) for p, rec in recorders.items()}


def _target(i: int, n: int, held_out_every: int) -> str:
    return "held_out" if is_held_out(i, n, held_out_every) else "fit"


def _set_target(recorders: dict, target: str) -> None:
    for rec in recorders.values():
        rec.target = target


def _whole_model(model, seqs, targets, recorders) -> None:
    """The whole model per sequence (the model plus one sequence's activations)."""
    for seq, target in zip(track(seqs, "calibration (base model)"), targets):
        _set_target(recorders, target)
        mx.eval(model(mx.array([seq])))
        mx.eval([a for rec in recorders.values() for a in rec.arrays()])


def _last_layer(paths: list[str]) -> int | None:
    """The last decoder layer holding a chosen module, when every path is
    ``model.layers.N....`` (else None: the layer-wise pass does not apply)."""
    found = [_LAYER_PATH.match(p) for p in paths]
    if not paths or not all(found):
        return None
    return max(int(m.group(1)) for m in found)


_LAYER_PATH = re.compile(r"^model\.layers\.(\d+)\.")


class _Stop(Exception):
    """Raised by the last capture stub: nothing after it is needed."""


class _Capture:
    """Stands for decoder layer ``index`` while the model's own forward runs:
    records the arguments it is called with (besides the hidden state) and
    passes the hidden state through unchanged."""

    def __init__(self, index: int, last: int, sink: list):
        self.index, self.last, self.sink = index, last, sink

    def __call__(self, h, *args, **kwargs):
        if self.index == 0:
            self.sink.append(h)
        self.sink.append((args, kwargs))
        if self.index == self.last:
            raise _Stop
        return h


def _captured(model, layers: list, seq: list[int], last: int) -> list | None:
    """``[h0, (args, kwargs) of layer 0, ..., of layer last]`` for one
    sequence, from the model's forward with identity layers (None when the
    forward does not reach layer ``last`` that way)."""
    sink: list = []
    model.model.layers = [_Capture(i, last, sink) for i in range(len(layers))]
    try:
        model(mx.array([seq]))
    except _Stop:
        pass
    except (AttributeError, TypeError, IndexError):  # a forward that looks into its layers
        return None
    finally:
        model.model.layers = layers
    if len(sink) != last + 2:
        return None
    mx.eval([x for _, x in tree_flatten(sink) if isinstance(x, mx.array)])
    return sink


def _layer_by_layer(model, seqs, targets, recorders, last: int) -> bool:
    """Layers ``0..last`` one at a time over every sequence (False, having
    run nothing, when the model's layout does not allow it)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, list) or len(layers) <= last or not seqs:
        return False
    calls = []
    for seq in track(seqs, "calibration (embedding)"):
        got = _captured(model, layers, seq, last)
        if got is None:
            return False
        calls.append(got)
    states = [c[0] for c in calls]
    for i in track(range(last + 1), "calibration (layer by layer)"):
        for s, (call, target) in enumerate(zip(calls, targets)):
            _set_target(recorders, target)
            args, kwargs = call[i + 1]
            states[s] = layers[i](states[s], *args, **kwargs)
            mx.eval(states[s], [a for rec in recorders.values() for a in rec.arrays()])
        # this layer is done: drop its weights (the model is ours and discarded)
        layers[i].update(tree_map(lambda _: _EMPTY, layers[i].parameters()))
    return True


_EMPTY = mx.zeros((0,))


def _finish(path: str, rec: _Recorder, min_tokens: int | None) -> ModuleHessian:
    fit, held = rec.sums["fit"], rec.sums["held_out"]
    if min_tokens is None:
        min_tokens = max(MIN_EXPERT_TOKENS, fit.h[0].shape[0])
    fallback = [e for e, n in enumerate(fit.tokens.tolist()) if n < min_tokens]
    h = [mx.zeros_like(x) if e in fallback else x for e, x in enumerate(fit.h)]
    has_held = int(held.tokens.sum()) > 0
    stack = (lambda xs: mx.stack(xs)) if rec.is_switch else (lambda xs: xs[0])
    return ModuleHessian(path=path, fit=stack(h), held_out=stack(held.h) if has_held else None,
                         tokens=fit.tokens.tolist(), held_out_tokens=held.tokens.tolist(), fallback=fallback)
