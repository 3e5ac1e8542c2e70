"""Batched greedy generation with a fixed batch composition.

Prompts are batched in a fixed way that does not depend on the model: batch
``k`` holds prompts ``k*B .. k*B+B-1`` (in the order given), and each batch
is one mlx-lm ``batch_generate`` call (greedy: no sampler, temperature 0)
with ``prefill_batch_size`` and ``completion_batch_size`` equal to its size,
so no prompt joins a batch late (continuous batching would otherwise mix
prompts depending on when others finish, i.e. on the model). Every model
asked the same prompts with the same ``batch_size`` decodes exactly the same
batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .. import progress
from ..errors import UserError

__all__ = ["Generation", "batches", "check_positive", "generate_batched"]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    truncated: bool  # max_tokens cut it
    batch: int


def check_positive(name: str, value, *, allow_none: bool = False) -> None:
    """``value`` must be a positive int (or None when ``allow_none``), else a UserError naming it."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def batches(n: int, batch_size: int) -> list[range]:
    """The fixed batch composition: consecutive runs of ``batch_size``
    indices (the last may be shorter)."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def generate_batched(model, tokenizer, prompts: Sequence[list[int]], *, batch_size: int,
                     max_tokens: int, description: str = "generate", sampler=None,
                     seed: int | None = None) -> list[Generation]:
    """Greedy generations for token-id prompts, ``batch_size`` consecutive
    prompts per ``batch_generate`` call (see the module doc). ``sampler``
    (an mlx-lm sampler, e.g. ``make_sampler(temp=0.7)``) samples instead;
    with ``seed``, MLX's generator is seeded with ``(seed, batch index)``
    before each batch, so the same prompts and batch size draw the same
    random numbers for every model (paired samples)."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate

    check_positive("batch_size", batch_size)
    check_positive("max_tokens", max_tokens)
    out: list[Generation] = []
    with progress.progress_bar() as bar:
        task = bar.add_task(description, total=len(prompts))
        for k, idx in enumerate(batches(len(prompts), batch_size)):
            chunk = [list(prompts[i]) for i in idx]
            if seed is not None:
                mx.random.seed((seed * 1_000_003 + k) % 2**32)
            resp = batch_generate(model, tokenizer, chunk, max_tokens=max_tokens,
                                  prefill_batch_size=len(chunk), completion_batch_size=len(chunk),
                                  return_token_ids=True, sampler=sampler)
            for text, ids in zip(resp.texts, resp.token_ids):
                out.append(Generation(text=text, token_ids=list(ids), truncated=len(ids) >= max_tokens,
                                      batch=k))
            bar.advance(task, len(chunk))
    return out
