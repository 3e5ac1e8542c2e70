"""Preference training: DPO and ORPO on mlx-lm's model and pyfuse's loop.

Data: rows ``{"prompt": str | "messages": [...], "chosen": str,
"rejected": str}``. Each side is the prompt's chat plus one assistant turn,
tokenized by mlx-lm's ``ChatDataset`` with the prompt masked (as ``mask_prompt``
in SFT): a side's log-probability is the sum of ``log p(token | tokens
before)`` over its reply tokens.

* DPO (Rafailov et al. 2023): ``-log sigmoid(beta * ((logp_c - ref_c) -
  (logp_r - ref_r)))``, the reference log-probabilities those of the frozen
  starting model, computed once before training (and kept in the run
  directory for a resume): no second model in memory.
* ORPO (Hong et al. 2024): ``NLL(chosen) - beta * log sigmoid(log odds_c -
  log odds_r)``, ``odds = p / (1 - p)`` of the mean per-token probability;
  no reference.

Logged per report: ``reward_margin`` (DPO: ``beta * ((logp_c - ref_c) -
(logp_r - ref_r))``, ORPO: the log-odds ratio), ``reward_accuracy`` (the
share of pairs whose margin is positive), ``chosen_reward`` and
``rejected_reward`` (DPO: ``beta * (logp - ref)``; ORPO: the mean per-token
log-probability).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .loop import Objective

TRAIN_MODES = ("sft", "dpo", "orpo")
METRICS = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")

__all__ = ["METRICS", "PairDataset", "TRAIN_MODES", "compute_reference", "pair_objective", "sequence_logps"]


def _messages(row: dict) -> list[dict]:
    return list(row["messages"]) if "messages" in row else [{"role": "user", "content": row["prompt"]}]


class PairDataset:
    """Tokenized pairs: ``(chosen tokens, chosen offset, rejected tokens,
    rejected offset)`` per row, and ``ref`` ``[N, 2]`` (the reference
    log-probabilities, once computed)."""

    def __init__(self, rows: list[dict], tokenizer):
        from mlx_lm.tuner.datasets import ChatDataset

        def side(row, key):
            return {"messages": _messages(row) + [{"role": "assistant", "content": row[key]}]}

        chat = ChatDataset([], tokenizer, mask_prompt=True)
        self.items = []
        for row in rows:
            (ct, co), (rt, ro) = chat.process(side(row, "chosen")), chat.process(side(row, "rejected"))
            self.items.append((list(ct), co, list(rt), ro))
        self.ref = np.zeros((len(rows), 2), np.float32)

    def __len__(self):
        return len(self.items)

    def lengths(self) -> list[int]:
        return [max(len(c), len(r)) for c, _, r, _ in self.items]


def collate_pairs(dataset: PairDataset, ids, max_seq_length: int):
    """``(tokens [2B, T], spans [2B, 2], ref [2B])``: the chosen sides, then
    the rejected ones, padded as mlx-lm pads (1 + a multiple of 32)."""
    import mlx.core as mx

    seqs = [dataset.items[j][0] for j in ids] + [dataset.items[j][2] for j in ids]
    offsets = [dataset.items[j][1] for j in ids] + [dataset.items[j][3] for j in ids]
    width = min(1 + 32 * ((max(len(s) for s in seqs) + 31) // 32), max_seq_length)
    arr = np.zeros((len(seqs), width), np.int32)
    spans = []
    for i, (s, off) in enumerate(zip(seqs, offsets)):
        n = min(len(s), max_seq_length)
        arr[i, :n] = s[:n]
        spans.append((off, n))
    ref = np.concatenate([dataset.ref[list(ids), 0], dataset.ref[list(ids), 1]])
    return mx.array(arr), mx.array(spans), mx.array(ref)


def sequence_logps(model, tokens, spans):
    """Per row: the sum of ``log p(tokens[j] | tokens[:j])`` over ``offset
    <= j < length`` and the number of those tokens."""
    import mlx.core as mx

    logits = model(tokens[:, :-1]).astype(mx.float32)
    targets = tokens[:, 1:]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tok = mx.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    j = mx.arange(1, tokens.shape[1])  # the index of each target token
    mask = (j >= spans[:, 0:1]) & (j < spans[:, 1:2])
    return (tok * mask).sum(axis=-1), mask.sum(axis=-1).astype(mx.float32)


def _log_sigmoid(x):
    import mlx.core as mx

    return -mx.logaddexp(mx.zeros_like(x), -x)


def dpo_loss(model, tokens, spans, ref, *, beta: float):
    import mlx.core as mx

    logps, _ = sequence_logps(model, tokens, spans)
    n = tokens.shape[0] // 2
    chosen, rejected = beta * (logps[:n] - ref[:n]), beta * (logps[n:] - ref[n:])
    margin = chosen - rejected
    loss = -_log_sigmoid(margin).mean()
    return loss, mx.array(float(n)), margin.mean(), (margin > 0).astype(mx.float32).mean(), chosen.mean(), \
        rejected.mean()


def orpo_loss(model, tokens, spans, ref, *, beta: float):
    import mlx.core as mx

    logps, counts = sequence_logps(model, tokens, spans)
    n = tokens.shape[0] // 2
    mean_lp = logps / mx.maximum(counts, 1)
    log_odds = mean_lp - mx.log1p(-mx.exp(mx.minimum(mean_lp, -1e-6)))
    ratio = log_odds[:n] - log_odds[n:]
    nll = -(logps[:n].sum() / mx.maximum(counts[:n].sum(), 1))
    loss = nll - beta * _log_sigmoid(ratio).mean()
    return loss, mx.array(float(n)), ratio.mean(), (ratio > 0).astype(mx.float32).mean(), mean_lp[:n].mean(), \
        mean_lp[n:].mean()


def pair_objective(mode: str, beta: float) -> Objective:
    loss = {"dpo": dpo_loss, "orpo": orpo_loss}[mode]
    return Objective(loss=partial(loss, beta=beta), lengths=lambda ds: ds.lengths(), collate=collate_pairs,
                     metric_names=METRICS)


def compute_reference(model, dataset: PairDataset, batch_size: int, max_seq_length: int) -> None:
    """Fill ``dataset.ref`` with the log-probabilities of ``model`` (the
    frozen starting model) for every pair, in eval mode."""
    import mlx.core as mx

    model.eval()
    out = np.zeros_like(dataset.ref)
    for start in range(0, len(dataset), batch_size):
        ids = list(range(start, min(start + batch_size, len(dataset))))
        tokens, spans, _ = collate_pairs(dataset, ids, max_seq_length)
        logps, _ = sequence_logps(model, tokens, spans)
        mx.eval(logps)
        lp = np.array(logps)
        out[ids, 0], out[ids, 1] = lp[:len(ids)], lp[len(ids):]
    dataset.ref = out
