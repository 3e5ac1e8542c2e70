"""Whole-model fidelity: how far a model's next-token distributions are from
a reference model's on the same token sequences (teacher-forced).

:func:`next_token_agreement` is the one function: per token position of
every sequence, ``KL(reference || model)`` of the two next-token
distributions, and whether their most likely tokens agree. A fuse is
compared with the base model with the adapter applied unfused (loaded by
mlx-lm's own loader, ``adapter_path``); the noise floor compares a
zero-delta twin with its baseline.

Memory: one model at a time. The reference runs first and its logits are
kept (float32, ``tokens x vocab``; beyond :data:`SPILL_BYTES` in a temporary
file that is removed at the end), the reference is dropped, then the model
runs in the same batches and is compared batch by batch. Forward batches
hold at most :data:`LOGIT_BUDGET` logits (sequences grouped by length,
right-padded: a causal model's outputs at a position do not depend on the
padding after it).

Precision: the two models' distributions are often within float32 noise of
each other (KL ~1e-8), so the KL is computed in float64 from the logits,
as ``KL = E_p[d] + log E_p[exp(-d)]`` with ``d`` the difference of the
logits: no log-softmax of either model is subtracted from the other, and
``log1p`` / ``expm1`` keep the second-order term that is the answer.
Negative values (rounding) are taken as 0.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..errors import UserError
from ..progress import track

__all__ = ["Agreement", "ReferenceLogits", "compare_to_reference", "next_token_agreement",
           "per_token_kl_top1", "reference_logits", "token_batches"]

# Logit elements per forward batch (batch x length x vocab): 64 MB of float32.
LOGIT_BUDGET = 1 << 24
# Reference logits larger than this are kept in a temporary file, not in memory.
SPILL_BYTES = 1 << 30
# Rows x vocab of one step of the float64 KL (each temporary: 32 MB).
KL_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Agreement:
    """Per-token ``KL(reference || model)`` (mean, 99th percentile, largest)
    and the share of positions whose top-1 tokens agree, over ``tokens``
    positions of ``sequences`` sequences."""

    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    tokens: int
    sequences: int

    def as_dict(self) -> dict:
        return asdict(self)


# -- the per-token figures ----------------------------------------------------------------


def per_token_kl_top1(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``KL(softmax(ref) || softmax(logits))`` per row (float64, >= 0) and
    whether the rows' argmax agree; ``[..., vocab]`` arrays of logits."""
    a = np.asarray(ref_logits, dtype=np.float64)
    b = np.asarray(logits, dtype=np.float64)
    a_top = a.max(axis=-1, keepdims=True)
    p = np.exp(a - a_top)
    p /= p.sum(axis=-1, keepdims=True)
    d = a - b
    d -= (p * d).sum(axis=-1, keepdims=True)  # centred: E_p[d] = 0, so KL = log E_p[exp(-d)]
    kl = np.log1p(np.sum(p * np.expm1(-d), axis=-1))
    return np.maximum(kl, 0.0), a.argmax(axis=-1) == b.argmax(axis=-1)


def _chunked_kl_top1(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`per_token_kl_top1` a few rows at a time (its float64
    temporaries stay within :data:`KL_CHUNK_ELEMENTS` each)."""
    rows = max(1, KL_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    parts = [per_token_kl_top1(ref_logits[i:i + rows], logits[i:i + rows]) for i in range(0, len(logits), rows)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _summary(kls: list[np.ndarray], agree: list[np.ndarray]) -> Agreement:
    kl, ok = np.concatenate(kls), np.concatenate(agree)
    return Agreement(kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                     top1_agreement=float(ok.mean()), tokens=int(kl.size), sequences=len(kls))


# -- forward passes -----------------------------------------------------------------------


def token_batches(seqs: Sequence[Sequence[int]], vocab: int, budget: int = LOGIT_BUDGET) -> list[list[int]]:
    """Indices of ``seqs`` grouped by length so that each batch's logits
    (batch x longest x vocab) stay within ``budget`` elements (a longer
    sequence runs alone)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out, cur, cur_max = [], [], 0
    for i in order:
        n = len(seqs[i])
        if cur and (len(cur) + 1) * max(cur_max, n) * vocab > budget:
            out.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        out.append(cur)
    return out


def _forward(model, ids: np.ndarray) -> np.ndarray:
    """Float32 logits of a batch of token ids; a model that does not run
    (e.g. an adapter whose shapes do not fit it) is a UserError."""
    try:
        logits = model(mx.array(ids)).astype(mx.float32)
        mx.eval(logits)
    except (ValueError, RuntimeError, IndexError) as err:  # MLX's shape and argument errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"agreement: the model does not run ({type(err).__name__}: {first})") from None
    return np.asarray(logits)


def _batch_logits(model, seqs, batch: list[int]) -> list[np.ndarray]:
    """Float32 next-token logits ``[len, vocab]`` of each sequence in ``batch``."""
    lengths = [len(seqs[i]) for i in batch]
    ids = np.zeros((len(batch), max(lengths)), dtype=np.int32)
    for j, i in enumerate(batch):
        ids[j, :lengths[j]] = seqs[i]
    arr = _forward(model, ids)
    return [arr[j, :n] for j, n in enumerate(lengths)]


def _vocab(model, seqs) -> int:
    return int(_forward(model, np.array([seqs[0][:1]], dtype=np.int32)).shape[-1])


def _check_sequences(seqs) -> list[list[int]]:
    seqs = [list(map(int, s)) for s in seqs]
    if not seqs:
        raise UserError("agreement: no sequences to compare the models on")
    if any(len(s) == 0 for s in seqs):
        raise UserError("agreement: a sequence has no tokens")
    return seqs


class ReferenceLogits:
    """The reference model's next-token logits on ``seqs`` (float32, one
    ``[len, vocab]`` array per sequence), in memory or, beyond
    ``spill_bytes``, in a temporary file (removed by :meth:`close`)."""

    def __init__(self, model, seqs: Sequence[Sequence[int]], *, spill_bytes: int = SPILL_BYTES,
                 budget: int = LOGIT_BUDGET, label: str = "agreement: reference"):
        self.seqs = _check_sequences(seqs)
        self.vocab = _vocab(model, self.seqs)
        self.batches = token_batches(self.seqs, self.vocab, budget)
        offsets = np.cumsum([0] + [len(s) for s in self.seqs])
        self._offsets = offsets
        self._dir = None
        shape = (int(offsets[-1]), self.vocab)
        if shape[0] * shape[1] * 4 > spill_bytes:
            self._dir = tempfile.mkdtemp(prefix="pyfuse-agreement-")
            # removed by close(), or when this object goes or the interpreter exits
            self._remove = weakref.finalize(self, shutil.rmtree, self._dir, True)
            self._store = np.lib.format.open_memmap(os.path.join(self._dir, "logits.npy"), mode="w+",
                                                    dtype=np.float32, shape=shape)
        else:
            self._store = np.empty(shape, dtype=np.float32)
        try:
            for batch in track(self.batches, label):
                for i, lg in zip(batch, _batch_logits(model, self.seqs, batch)):
                    self._store[offsets[i]:offsets[i + 1]] = lg
        except BaseException:
            self.close()  # no temporary file left behind
            raise

    def __getitem__(self, i: int) -> np.ndarray:
        return self._store[self._offsets[i]:self._offsets[i + 1]]

    def close(self) -> None:
        self._store = None
        if self._dir is not None:
            self._remove()
            self._dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _load(model, adapter_path):
    """A loaded model (run as given) or a path loaded for inference (with an unfused adapter)."""
    from .load import LoadedModel, load_for_inference

    if isinstance(model, (str, os.PathLike)):
        return load_for_inference(Path(model), adapter_path).model
    if adapter_path is not None:
        raise UserError("agreement: an adapter needs a model path, not an already loaded model")
    return model.model if isinstance(model, LoadedModel) else model


def reference_logits(reference, sequences: Sequence[Sequence[int]], *,
                     adapter: str | os.PathLike | None = None, spill_bytes: int = SPILL_BYTES,
                     budget: int = LOGIT_BUDGET) -> ReferenceLogits:
    """:class:`ReferenceLogits` of ``reference`` (a model directory, loaded
    for inference with the unfused ``adapter`` if given, and dropped again;
    or a loaded model, run as given) on ``sequences``. Close it when done."""
    model = _load(reference, adapter)
    ref = ReferenceLogits(model, sequences, spill_bytes=spill_bytes, budget=budget)
    del model  # the reference's weights go before the next model's are loaded
    gc.collect()
    mx.clear_cache()
    return ref


def compare_to_reference(reference: ReferenceLogits, model, *, adapter: str | os.PathLike | None = None,
                         label: str = "agreement: model", per_token: bool = False):
    """:class:`Agreement` of ``model`` (a model directory, loaded for
    inference with ``adapter`` if given; or a loaded model, run as given)
    against ``reference``; with ``per_token`` also the per-token KL and
    agreement arrays (in sequence order, concatenated)."""
    model = _load(model, adapter)
    kls: list = [None] * len(reference.seqs)
    agree: list = [None] * len(reference.seqs)
    for batch in track(reference.batches, label):
        for i, lg in zip(batch, _batch_logits(model, reference.seqs, batch)):
            if lg.shape[-1] != reference.vocab:
                raise UserError(f"agreement: the models' vocabularies differ ({reference.vocab} and "
                                f"{lg.shape[-1]} logits)")
            kls[i], agree[i] = _chunked_kl_top1(reference[i], lg)
    summary = _summary(kls, agree)
    return (summary, np.concatenate(kls), np.concatenate(agree)) if per_token else summary


def next_token_agreement(reference, model, sequences: Sequence[Sequence[int]], *,
                         reference_adapter: str | os.PathLike | None = None,
                         model_adapter: str | os.PathLike | None = None,
                         spill_bytes: int = SPILL_BYTES, budget: int = LOGIT_BUDGET) -> Agreement:
    """Per-token ``KL(reference || model)`` and top-1 agreement of the
    next-token distributions on ``sequences`` (lists of token ids).

    ``reference`` / ``model``: an mlx-lm model directory (loaded with
    :func:`pyfuse.lm.load.load_for_inference`, optionally with an unfused
    adapter: ``reference_adapter`` / ``model_adapter``) or an already loaded
    model (an ``nn.Module`` or :class:`~pyfuse.lm.load.LoadedModel`, run as
    given). Paths are loaded one at a time: the reference's logits are
    computed and it is dropped before ``model`` is loaded. To compare several
    models with one reference, use :func:`reference_logits` once and
    :func:`compare_to_reference` per model.

    A fused model against its unfused adapter::

        next_token_agreement(base_dir, fused_dir, seqs, reference_adapter=adapter_dir)
    """
    with reference_logits(reference, sequences, adapter=reference_adapter, spill_bytes=spill_bytes,
                          budget=budget) as ref:
        return compare_to_reference(ref, model, adapter=model_adapter)
