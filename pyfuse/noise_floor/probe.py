r"""The output level of the noise floor: the baseline and a fused model run
teacher-forced on a prompt set, and (with ``mc``) asked multiple-choice items.

* ``kl_mean`` / ``kl_p99``: the mean and 99th percentile over token positions
  of KL(baseline || fused) of the next-token distributions;
* ``top1_flip``: the share of positions whose top-1 token differs
  (``top1_agreement``: the share whose top-1 token is the same);
* ``mc_flip``: the share of items whose answer differs, the answer being
  that of the one multiple-choice scorer (:func:`pyfuse.lm.scorer.score_item`,
  the letter ``pyfuse eval mc --method logprob`` gives with its defaults:
  no system prompt, answer prefix ``\boxed{``). For the same model and
  items the baseline's answers and log-probabilities are the ones
  ``pyfuse eval mc --method logprob`` writes.

Prompts are ``{"text"}`` rows (encoded as plain text) or ``{"messages"}``
rows (a conversation rendered whole by :func:`pyfuse.lm.chat.chat_prompt`),
cut to MAX_PROMPT_TOKENS tokens. The models run under the one compute-dtype
policy of :mod:`pyfuse.lm.load` (float32 on MLX's CPU backend); the KL and
top-1 figures are those of the one whole-model comparison,
:mod:`pyfuse.lm.agreement` (the baseline's logits kept, the fused
parameters swapped into the same graph).

With an adapter, the adapter's fuse at each setting is compared the same
way, on the same prompts, with one reference for every setting: the model
as given (``--model``) with the adapter applied unfused, loaded by mlx-lm's
loader (``adapter_kl_to_unfused`` / ``adapter_top1_agreement``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..lm.chat import chat_prompt
from ..lm.agreement import Agreement, ReferenceLogits, compare_to_reference
from ..lm.load import to_compute_dtype, use_compute_dtype
from ..lm.scorer import MCScore, score_item

__all__ = ["DEFAULT_PROMPTS", "OutputProbe", "ProbeInputs"]

# Teacher-forced prompts are cut to this many tokens.
MAX_PROMPT_TOKENS = 512

DEFAULT_PROMPTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Once upon a time, in a small village near the mountains, there lived an old baker.",
    "To compute the area of a circle, multiply pi by the square of the radius.",
    "Question: Which planet is known as the red planet?\nAnswer: Mars.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The mitochondria is the part of the cell that produces most of its energy.",
    "Dear Sir or Madam, I am writing to inform you that your order has been shipped.",
    "In 1945 the Second World War ended, and the United Nations was founded.",
    "My name is Alice. I work as a teacher and I love hiking and painting.",
    "Compute $12 \\times 7$. The answer is \\boxed{84}.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
)


# -- prompts --------------------------------------------------------------------------------


def read_prompts(prompts) -> tuple[list[dict], str]:
    """Prompt records ``{"text"}`` / ``{"messages"}`` and a description."""
    from ..io.files import iter_jsonl

    if prompts is None:
        return [{"text": t} for t in DEFAULT_PROMPTS], f"built-in ({len(DEFAULT_PROMPTS)} prompts)"
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        records = []
        for where, row in iter_jsonl(path):
            records.append(_check_prompt(row, f"{path}: {where}"))
        if not records:
            raise UserError(f"{path}: no prompts")
        return records, str(path)
    records = [_check_prompt({"text": p} if isinstance(p, str) else p, f"prompts[{i}]")
               for i, p in enumerate(prompts)]
    if not records:
        raise UserError("prompts: the list is empty")
    return records, f"{len(records)} given prompts"


def _check_prompt(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with 'text' or 'messages'")
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise UserError(f"{where}: 'text' must be a non-empty string")
        return {"text": row["text"]}
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        return {"messages": msgs}
    raise UserError(f"{where}: expected 'text' or 'messages'")


def _encode_prompts(tokenizer, records: list[dict]) -> list[list[int]]:
    seqs = []
    for i, rec in enumerate(records):
        if "text" in rec:
            ids = tokenizer.encode(rec["text"])
        else:
            ids = chat_prompt(tokenizer, messages=rec["messages"], add_generation_prompt=False)
        ids = list(ids)[:MAX_PROMPT_TOKENS]
        if not ids:
            raise UserError(f"prompt {i + 1} encodes to no tokens")
        seqs.append(ids)
    return seqs


def _load_tokenizer(path: Path):
    from ..lm.load import load_tokenizer

    try:
        return load_tokenizer(path)
    except UserError as err:
        raise UserError(f"{err}; the output level needs it: pass outputs=False (--no-outputs) to "
                        "measure the weights only") from None


@dataclass
class ProbeInputs:
    """What the output level asks every model: encoded prompts and MC items."""

    tokenizer: Any
    prompt_seqs: list[list[int]]
    mc_items: list  # pyfuse.data.mmlu.MCItem
    prompts: str  # a description of the prompt set

    @classmethod
    def read(cls, path: Path, prompts, mc, mc_limit: int | None) -> "ProbeInputs":
        records, desc = read_prompts(prompts)
        mc_items = []
        if mc is not None:
            from ..data.mmlu import load_mc

            mc_items = load_mc(mc, limit=mc_limit)
        tokenizer = _load_tokenizer(path)
        return cls(tokenizer, _encode_prompts(tokenizer, records), mc_items, desc)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.prompt_seqs)


# -- forward passes ----------------------------------------------------------------------


class OutputProbe:
    """The baseline's outputs of one setting, to compare fused models with.

    Puts ``model`` (the baseline graph, after its measurable tensors were
    read) under the compute-dtype policy, records its teacher-forced
    log-probabilities and its MC answers (:attr:`base_mc`, one
    :class:`pyfuse.lm.scorer.MCScore` per item)."""

    def __init__(self, inputs: ProbeInputs, model, qmods):
        self.inputs, self.model = inputs, model
        use_compute_dtype(model)
        self.base_params = [(f"{q.path}.{leaf}", getattr(q.module, leaf)) for q in qmods
                            for leaf in ("weight", "scales", "biases")]
        # the baseline's logits, compared with each fused model's (pyfuse.lm.agreement)
        self.reference = ReferenceLogits(model, inputs.prompt_seqs, label="noise floor: baseline outputs")
        self.base_mc = self._mc()

    def _mc(self) -> list[MCScore]:
        return [score_item(self.model, self.inputs.tokenizer, item) for item in self.inputs.mc_items]

    def compare(self, fused_params) -> tuple[dict, list[MCScore]]:
        """KL, top-1 and MC flips of the model with ``fused_params`` swapped
        in (then swapped back), and its MC answers."""
        _swap(self.model, [(n, to_compute_dtype(x)) for n, x in fused_params])
        try:
            agree = compare_to_reference(self.reference, self.model, label="noise floor: fused outputs")
            mc = self._mc()
        finally:
            _swap(self.model, self.base_params)
        return {"kl_mean": agree.kl_mean, "kl_p99": agree.kl_p99, "top1_flip": 1.0 - agree.top1_agreement,
                "top1_agreement": agree.top1_agreement, "mc_flip": self.mc_flip(mc)}, mc

    def agreement(self, reference: ReferenceLogits, fused_params) -> Agreement:
        """:class:`~pyfuse.lm.agreement.Agreement` of the model with
        ``fused_params`` swapped in (then swapped back) against
        ``reference`` (logits on the same prompts, e.g. the base model with
        the adapter applied unfused)."""
        _swap(self.model, [(n, to_compute_dtype(x)) for n, x in fused_params])
        try:
            return compare_to_reference(reference, self.model, label="noise floor: adapter fuse vs unfused")
        finally:
            _swap(self.model, self.base_params)

    def close(self) -> None:
        self.reference.close()

    def mc_flip(self, answers: list[MCScore]) -> float | None:
        """The share of items whose answer differs from the baseline's (None without items)."""
        if not self.base_mc:
            return None
        return float(np.mean([a.prediction != b.prediction for a, b in zip(answers, self.base_mc)]))


def _swap(model, items) -> None:
    from mlx.utils import tree_unflatten

    model.update(tree_unflatten(items))
