"""Per-layer hidden-state centroids and MoE routing profiles of prompt sets.

The model's transformer blocks (``model.model.layers``, the list mlx-lm's
models run in order) are wrapped in place by taps that record each block's
input and hand it on unchanged; the MoE blocks' ``mlp`` likewise, to see
the router's input. Nothing of the model is copied and the taps are
removed afterwards, whatever happens.

Prompts are run in batches, right-padded: attention is causal, so a
prompt's real tokens never see the padding after them, and only real
positions are pooled. Per prompt one vector per layer is kept (the last
token's hidden state, ``pool="last"``: where the next token is decided, or
the mean over its tokens, ``pool="mean"``) and summed into float64
accumulators: memory is one batch's activations plus ``layers x hidden``
numbers per prompt set, whatever the number of prompts.

``centroids[l]`` is the mean input of block ``l`` (``l = 0``: the
embeddings) and ``centroids[L]`` the last block's output (before the final
norm). ``routing[l][e]`` is the share of (real token, top-k slot) choices
of block ``l``'s router that go to expert ``e`` (top-k of the softmax of
the gate, as :class:`mlx_lm.models.qwen3_moe.Qwen3MoeSparseMoeBlock` picks).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import progress
from ..errors import UserError

POOLS = ("last", "mean")


class _Tap(nn.Module):
    """Calls the wrapped module and reports its first argument (no copy)."""

    def __init__(self, inner, record):
        super().__init__()
        self.inner = inner
        self._record = record

    def __call__(self, x, *args, **kwargs):
        self._record(x)
        return self.inner(x, *args, **kwargs)


def blocks(model) -> list:
    """The list of transformer blocks mlx-lm's model runs (mutable, in place)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise UserError("this model has no list of transformer blocks (model.model.layers) to probe")
    return layers


def _is_moe(mlp) -> bool:
    return all(hasattr(mlp, a) for a in ("gate", "top_k", "switch_mlp"))


@dataclass
class PromptSet:
    name: str
    prompts: list[list[int]]  # token ids (chat-rendered)


@dataclass
class SetStats:
    """The accumulated statistics of one prompt set on one model."""

    n: int = 0
    sums: np.ndarray | None = None  # [L + 1, hidden]
    routing: np.ndarray | None = None  # [L, experts] counts (MoE blocks; NaN rows elsewhere)

    @property
    def centroids(self) -> np.ndarray:
        return self.sums / self.n

    @property
    def routing_share(self) -> np.ndarray | None:
        if self.routing is None:
            return None
        totals = self.routing.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):
            return self.routing / totals


@contextmanager
def _tapped(model, on_block, on_router):
    """Taps on every block (``on_block(i, input)``), on the final norm
    (``on_block(L, last block's output)``) and on the MoE blocks' ``mlp``
    (``on_router(i, its input)``); removed on exit."""
    layers = blocks(model)
    inner = getattr(model, "model", model)
    originals = list(layers)
    norm = getattr(inner, "norm", None)
    moe = {}
    try:
        for i, layer in enumerate(originals):
            layers[i] = _Tap(layer, lambda x, i=i: on_block(i, x))
            mlp = getattr(layer, "mlp", None)
            if mlp is not None and _is_moe(mlp):
                moe[i] = mlp
                layer.mlp = _Tap(mlp, lambda x, i=i: on_router(i, x))
        if norm is None:
            raise UserError("this model has no final norm (model.model.norm) to read the last block's output from")
        inner.norm = _Tap(norm, lambda x: on_block(len(originals), x))
        yield moe
    finally:
        layers[:] = originals
        for i, mlp in moe.items():
            originals[i].mlp = mlp
        if norm is not None:
            inner.norm = norm


def _pool(h: mx.array, lengths: np.ndarray, pool: str) -> np.ndarray:
    """``[B, hidden]`` float64: each prompt's last real position or mean over its real positions."""
    h = np.asarray(h.astype(mx.float32), dtype=np.float64)
    if pool == "last":
        return h[np.arange(h.shape[0]), lengths - 1]
    mask = (np.arange(h.shape[1])[None, :] < lengths[:, None])[..., None]
    return (h * mask).sum(axis=1) / lengths[:, None]


def _route_counts(mlp, x: mx.array, lengths: np.ndarray) -> np.ndarray:
    gates = mx.softmax(mlp.gate(x).astype(mx.float32), axis=-1)
    k = mlp.top_k
    inds = np.asarray(mx.argpartition(gates, kth=-k, axis=-1)[..., -k:])
    real = np.arange(x.shape[1])[None, :] < lengths[:, None]
    return np.bincount(inds[real].ravel(), minlength=gates.shape[-1]).astype(np.float64)


def probe_sets(model, sets: Sequence[PromptSet], *, pool: str = "last", batch_size: int = 8,
               description: str = "probe") -> dict[str, SetStats]:
    """Run every prompt set through ``model`` with the taps; ``{set name: SetStats}``."""
    if pool not in POOLS:
        raise UserError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    stats = {s.name: SetStats() for s in sets}
    n_layers = len(blocks(model))
    current: dict = {}

    def on_block(i, x):
        current["pooled"][i] = _pool(x, current["lengths"], pool)

    def on_router(i, x):
        current["routes"][i] = _route_counts(current["moe"][i], x, current["lengths"])

    total = sum(len(s.prompts) for s in sets)
    with _tapped(model, on_block, on_router) as moe, progress.progress_bar() as bar:
        task = bar.add_task(description, total=total)
        current["moe"] = moe
        for s in sets:
            st = stats[s.name]
            for start in range(0, len(s.prompts), batch_size):
                chunk = s.prompts[start:start + batch_size]
                lengths = np.array([len(p) for p in chunk])
                tokens = np.zeros((len(chunk), lengths.max()), dtype=np.int32)
                for b, p in enumerate(chunk):
                    tokens[b, :len(p)] = p
                current.update(lengths=lengths, pooled={}, routes={})
                mx.eval(model(mx.array(tokens)))
                pooled = np.stack([current["pooled"][i] for i in range(n_layers + 1)], axis=1)
                st.sums = pooled.sum(axis=0) if st.sums is None else st.sums + pooled.sum(axis=0)
                if moe:
                    n_exp = next(iter(current["routes"].values())).shape[0]
                    routes = np.full((n_layers, n_exp), np.nan)
                    for i, c in current["routes"].items():
                        routes[i] = c
                    st.routing = routes if st.routing is None else st.routing + routes
                st.n += len(chunk)
                bar.advance(task, len(chunk))
    return stats
