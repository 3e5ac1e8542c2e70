"""Brief full-precision pre-training of the tiny models, before they are
quantized, so that they have learned something (structured weights, base
rates) and re-quantization has something to disturb.

* :func:`pretrain_tiny_model`: next-token loss on random windows of a text
  corpus (the tests' models, ``build_tiny_model(pretrain=...)``);
* :func:`pretrain_on_documents`: next-token loss on whole chat documents,
  with the answer letter of a multiple-choice document trained towards a
  distribution (the default model of :mod:`.default_model`).

Both are deterministic for a given seed: batches are drawn with NumPy and
AdamW has no randomness.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..data.mmlu import LETTERS
from ..errors import UserError
from .corpus import synthetic_corpus

__all__ = ["pretrain_on_documents", "pretrain_tiny_model"]


def _train_loop(model: nn.Module, loss_fn, opt, batches: Iterator[tuple],
                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """One optimizer step per batch of ``batches`` (the arguments of
    ``loss_fn`` after the model); returns the losses."""
    step = nn.value_and_grad(model, loss_fn)
    model.train()
    losses = []
    for it, batch in enumerate(batches):
        loss, grads = step(model, *batch)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
        if on_step is not None:
            on_step(it + 1, losses[-1])
    model.eval()
    return losses


# -- windows of a corpus --------------------------------------------------------------


def _token_stream(tokenizer, texts: Iterable[str]) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, add_special_tokens=False))
        ids.append(eos)
    return ids


def pretrain_tiny_model(model: nn.Module, tokenizer, texts: Sequence[str] | None = None, *,
                        iters: int = 100, lr: float = 3e-3, seed: int = 0, batch_size: int = 8,
                        seq_len: int = 64) -> list[float]:
    """Briefly train a full-precision model (next-token cross-entropy, AdamW)
    on ``texts`` (default :func:`synthetic_corpus`); returns the losses.

    Meant as ``build_tiny_model(..., pretrain=partial(pretrain_tiny_model,
    iters=..., lr=...))`` so that the quantized model has learned something
    (structured weights) before quantization. Deterministic for a given
    ``seed`` (windows drawn with numpy, AdamW has no randomness). Cost on
    this project's shared 2-core CPU: ~0.35 s/iter (llama, defaults), ~0.4
    (qwen3_moe), ~0.7 (qwen3_5_moe); 100 iters at lr 3e-3 take the synthetic
    corpus loss from 6.93 (uniform) to ~3.6 / 3.9 / 0.9."""
    import numpy as np
    import mlx.optimizers as optim

    ids = np.asarray(_token_stream(tokenizer, texts if texts is not None else synthetic_corpus()),
                     dtype=np.int32)
    if len(ids) <= seq_len + 1:
        raise UserError(f"pretraining corpus has {len(ids)} tokens, needs more than {seq_len + 1}")
    rng = np.random.default_rng(seed)
    opt = optim.AdamW(learning_rate=optim.cosine_decay(lr, max(iters, 1)), weight_decay=0.0)

    def loss_fn(m, x, y):
        logits = m(x).astype(mx.float32)
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    def windows():
        for _ in range(iters):
            starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
            batch = np.stack([ids[s:s + seq_len + 1] for s in starts])
            yield mx.array(batch[:, :-1]), mx.array(batch[:, 1:])

    return _train_loop(model, loss_fn, opt, windows())


# -- whole chat documents -------------------------------------------------------------

# A document as trained: (token ids, the position that predicts the answer
# letter or None, the letter distribution over LETTERS or None).
_Encoded = tuple[list[int], "int | None", "list[float] | None"]


def _answer_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """``(ids of "\\boxed{", the id of each letter after it)``; refuses a
    tokenizer that merges ``{B`` (the letter must be a token of its own)."""
    prefix = tokenizer.encode("\\boxed{", add_special_tokens=False)
    letter_ids = []
    for letter in LETTERS:
        ids = tokenizer.encode("\\boxed{" + letter, add_special_tokens=False)
        if ids[:-1] != prefix:
            raise UserError(f"the tokenizer merges '{{{letter}' into one token: the answer letter is not "
                            "a token of its own")
        letter_ids.append(ids[-1])
    return prefix, letter_ids


def _encode(tokenizer, doc, prefix: list[int]) -> _Encoded:
    msgs, answers = (doc["messages"], doc.get("answers")) if isinstance(doc, dict) else (doc, None)
    ids = list(tokenizer.encode(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False))
    if answers is None:
        return ids, None, None
    n = len(prefix)
    starts = [i for i in range(len(ids) - n) if ids[i:i + n] == prefix]
    if not starts:
        raise UserError(f"a multiple-choice document has no \\boxed{{ answer: {msgs[-1]}")
    pos = starts[-1] + n - 1  # this position predicts the letter
    return ids, pos, [float(answers.get(letter, 0.0)) for letter in LETTERS]


def _padded(batch: list[_Encoded]):
    """``(tokens, weight of each target, soft letter targets)`` of a batch,
    padded to its longest document (numpy)."""
    import numpy as np

    length = max(len(ids) for ids, _, _ in batch)
    x = np.zeros((len(batch), length), dtype=np.int32)
    w = np.zeros((len(batch), length - 1), dtype=np.float32)
    soft = np.zeros((len(batch), length - 1, len(LETTERS)), dtype=np.float32)
    for r, (ids, pos, dist) in enumerate(batch):
        x[r, :len(ids)] = ids
        w[r, :len(ids) - 1] = 1.0
        if pos is not None:
            w[r, pos] = 0.0
            soft[r, pos] = dist
    return x, w, soft


def _warmup_cosine(learning_rate: float, iters: int, warmup: int):
    import mlx.optimizers as optim

    warmup = max(1, min(warmup, iters - 1))
    return optim.join_schedules([optim.linear_schedule(learning_rate / 10, learning_rate, warmup),
                                 optim.cosine_decay(learning_rate, max(1, iters - warmup))], [warmup])


def pretrain_on_documents(model, tokenizer, groups: Mapping[str, list], *, mix: Mapping[str, float],
                          iters: int, batch_size: int, learning_rate: float, warmup: int,
                          answer_weight: float, seed: int, on_step: Callable[[int, float], None] | None = None
                          ) -> list[float]:
    """Train a full-precision model on chat documents; returns the losses.

    ``groups`` maps a kind to its documents: a conversation (a list of
    messages), or ``{"messages": [...], "answers": {letter: probability}}``
    for a multiple-choice conversation whose assistant turn is
    ``\\boxed{X}``. Each batch draws ``batch_size`` documents, the kind by
    ``mix`` and the document uniformly (numpy, ``seed``). Documents are
    rendered with the tokenizer's chat template, padded to the longest in
    the batch and trained whole: next-token cross-entropy over the real
    tokens, except the answer letter of a multiple-choice document, whose
    target is its ``answers`` distribution (the expected loss of a label
    drawn from it: the model learns the base rates without the sampling
    noise of a few hundred steps) with weight ``answer_weight``. The letter
    must be one token after ``\\boxed{`` (a tokenizer that merges ``{B``
    is refused). AdamW (no weight decay), linear warm-up over ``warmup``
    steps, then cosine decay to zero."""
    import mlx.optimizers as optim
    import numpy as np

    prefix, letter_ids = _answer_tokens(tokenizer)
    encoded = {kind: [_encode(tokenizer, doc, prefix) for doc in docs] for kind, docs in groups.items()}
    kinds = [k for k in mix if mix[k] > 0]
    probs = np.array([mix[k] for k in kinds], dtype=np.float64)
    probs /= probs.sum()
    rng = np.random.default_rng(seed)
    opt = optim.AdamW(learning_rate=_warmup_cosine(learning_rate, iters, warmup), weight_decay=0.0)
    letters = mx.array(letter_ids)

    def loss_fn(m, x, y, w, soft):
        logits = m(x).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        hard = -mx.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        soft_ce = -(soft * logp[..., letters]).sum(axis=-1)
        return ((hard * w).sum() + answer_weight * soft_ce.sum()) / (w.sum() + answer_weight * soft.sum())

    def batches():
        for _ in range(iters):
            batch = []
            for kind in rng.choice(len(kinds), size=batch_size, p=probs):
                docs = encoded[kinds[kind]]
                batch.append(docs[rng.integers(len(docs))])
            x, w, soft = _padded(batch)
            xa = mx.array(x)
            yield xa[:, :-1], xa[:, 1:], mx.array(w), mx.array(soft)

    return _train_loop(model, loss_fn, opt, batches(), on_step)
