r"""Multiple-choice evaluation (MMLU-Pro rows) of an mlx-lm model.

:func:`evaluate_mc` asks every item with :func:`pyfuse.data.mmlu.format_question`
as the user turn of the model's chat template (:mod:`pyfuse.lm.chat`, an
optional system prompt first), and scores it one of two ways:

``generate`` (the reference)
    Greedy decoding (temperature 0) of up to ``max_tokens`` tokens in fixed
    batches (:mod:`pyfuse.lm.generate`: batch ``k`` holds items
    ``k*B .. k*B+B-1`` of the evaluated list, in file order after
    ``categories`` and ``limit``; every model compared on the same file with
    the same ``batch_size`` decodes exactly the same batches); the letter is
    extracted from the text with :func:`pyfuse.evals.extract_answer`. The
    batch index is written in each row.
``logprob`` (fast)
    :func:`pyfuse.lm.scorer.score_item`, the one multiple-choice scorer: the
    option letter with the highest ``log P(answer_prefix + X | prompt)``
    (default prefix ``\boxed{``), the letter the model prefers if it answers
    at once. One prefill per item and no decoding (roughly ``max_tokens``
    times fewer model steps). The noise floor's MC flips use the same
    scorer. Items are scored one at a time; the ``batch`` field still
    records the ``batch_size`` grouping.

Each result row (``out``, JSON Lines; accepted by
:func:`pyfuse.data.mmlu.read_results`) has: ``id``, ``category``, ``gold``,
``prediction`` (a letter or null), ``rule`` (the extraction rule, or
``"logprob"``), ``correct``, ``output`` (the decoded generation, null for
``logprob``), ``method``, ``batch``, ``num_options``, ``n_tokens`` and
``truncated`` (``generate``: tokens generated and whether ``max_tokens``
cut the output; null for ``logprob``) and ``logprobs`` (``logprob``:
``{letter: score}``; null for ``generate``).

Under ``mlx.launch`` (:mod:`pyfuse.distributed`) every rank loads the model
and scores whole batches of that same composition (batch ``k`` on rank
``k mod size``); the rows are gathered in item order and only rank 0 writes
``out``: the rows of one process, byte for byte.

The model is a path (loaded with :func:`pyfuse.lm.load.load_for_inference`:
mlx-lm's loader, optionally with an unfused ``adapter_path``, and the one
compute-dtype policy) or an already loaded ``(model, tokenizer)`` pair.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .. import progress
from ..errors import UserError
from ..data.mmlu import MCItem, format_question, load_mc
from ..distributed import map_shard, together, writes
from ..io.files import jsonl_text
from ..io.outputs import check_file_destination, publish_text
from ..lm.chat import chat_prompt
from ..lm.generate import check_positive, generate_batched
from ..lm.load import load_for_inference
from ..lm.scorer import DEFAULT_ANSWER_PREFIX, score_item
from .extract import extract_answer

METHODS = ("generate", "logprob")
DEFAULT_MAX_TOKENS = 1024
DEFAULT_BATCH_SIZE = 8

__all__ = ["DEFAULT_ANSWER_PREFIX", "METHODS", "MCEvalResult", "evaluate_mc"]


@dataclass
class MCEvalResult:
    """What :func:`evaluate_mc` measured. ``rows`` are the per-item result
    rows (see the module doc), in evaluation order."""

    accuracy: float
    n: int
    correct: int
    rows: list[dict]
    method: str
    batch_size: int
    max_tokens: int | None
    model: str
    data: str | None
    seconds: float
    per_category: dict[str, dict] = field(default_factory=dict)
    out: Path | None = None

    @property
    def items_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> dict:
        return {"model": self.model, "data": self.data, "method": self.method, "n": self.n,
                "correct": self.correct, "accuracy": self.accuracy, "batch_size": self.batch_size,
                "max_tokens": self.max_tokens, "seconds": self.seconds,
                "per_category": self.per_category}


def _select(items: list[MCItem], categories, limit, source: str) -> list[MCItem]:
    if categories is not None:
        if isinstance(categories, str):
            categories = [categories]
        wanted = [c for c in categories]
        if not wanted:
            raise UserError("categories is empty")
        present = sorted({it.category for it in items})
        unknown = [c for c in wanted if c not in present]
        if unknown:
            raise UserError(f"{source}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                            f"{', '.join(repr(c) for c in unknown)}; the data has: {', '.join(present)}")
        keep = set(wanted)
        items = [it for it in items if it.category in keep]
    if limit is not None:
        items = items[:limit]
    return items


def evaluate_mc(model, data, *, method: str = "generate", batch_size: int = DEFAULT_BATCH_SIZE,
                limit: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                out: str | os.PathLike | None = None, categories: Sequence[str] | None = None,
                system_prompt: str | None = None, answer_prefix: str = DEFAULT_ANSWER_PREFIX,
                adapter_path: str | os.PathLike | None = None, force: bool = False) -> MCEvalResult:
    r"""Evaluate a model on multiple-choice items.

    Args:
        model: an mlx-lm model directory, or a loaded ``(model, tokenizer)``.
        data: a JSONL or Parquet file of MMLU-Pro rows (:func:`pyfuse.data.mmlu.load_mc`)
            or a list of :class:`pyfuse.data.mmlu.MCItem`.
        method: ``generate`` (greedy decoding + answer extraction) or
            ``logprob`` (score each option letter after ``answer_prefix``).
        batch_size: items per ``batch_generate`` call (fixed composition).
        limit: evaluate only the first ``limit`` items (after ``categories``).
        max_tokens: the generation budget per item (``generate``).
        out: write the per-item rows here (JSONL, atomically; refused when it exists
            unless ``force``).
        categories: evaluate only these categories (unknown names are an error).
        system_prompt: a system turn before each question.
        answer_prefix: what the ``logprob`` method puts after the generation
            prompt before the letter.
        adapter_path: an unfused mlx-lm adapter to load with the model path.
        force: replace an existing ``out``.
    """
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_positive("batch_size", batch_size)
    check_positive("limit", limit, allow_none=True)
    if method == "generate":
        check_positive("max_tokens", max_tokens)
    if method == "logprob" and not answer_prefix:
        raise UserError("answer_prefix must not be empty for method 'logprob'")
    if out is not None:
        check_file_destination(out, force, "--out")  # before any work
    with together("loading the model and the items"):  # under mlx.launch: one rank failing fails all
        items, source = _items(data, categories, limit)
        lm = load_for_inference(model, adapter_path)
    started = time.perf_counter()
    rows = map_shard(len(items), batch_size, lambda shard: _score(
        lm, items, shard, method=method, max_tokens=max_tokens, system_prompt=system_prompt,
        answer_prefix=answer_prefix), "scoring items")
    seconds = time.perf_counter() - started

    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    out_path = None
    if out is not None and writes():  # under mlx.launch only rank 0 writes
        out_path = publish_text(out, jsonl_text(rows), force, "--out")
    return MCEvalResult(accuracy=correct / n, n=n, correct=correct, rows=rows, method=method,
                        batch_size=batch_size, max_tokens=max_tokens if method == "generate" else None,
                        model=lm.name, data=source, seconds=seconds,
                        per_category=_per_category(rows), out=out_path)


def _score(lm, items: list[MCItem], shard, *, method, max_tokens, system_prompt, answer_prefix) -> list[dict]:
    """The rows of ``shard.items`` (all of them in one process; this rank's
    whole batches under mlx.launch, :mod:`pyfuse.distributed.shard`), with
    their batch numbers as one process gives them."""
    mine = [items[i] for i in shard.items]
    rows: list[dict] = []
    if method == "generate":
        prompts = [chat_prompt(lm.tokenizer, format_question(it), system_prompt=system_prompt) for it in mine]
        gens = generate_batched(lm.model, lm.tokenizer, prompts, batch_size=shard.batch_size,
                                max_tokens=max_tokens, description="eval mc (generate)")
        for it, g in zip(mine, gens):
            pred, rule = extract_answer(g.text, it.num_options)
            rows.append(_row(it, pred, rule, method, shard.global_batch(g.batch), output=g.text,
                             n_tokens=len(g.token_ids), truncated=g.truncated))
    else:
        for i, it in progress.track(list(zip(shard.items, mine)), "eval mc (logprob)"):
            score = score_item(lm.model, lm.tokenizer, it, system_prompt=system_prompt,
                               answer_prefix=answer_prefix)
            rows.append(_row(it, score.prediction, "logprob", method, i // shard.batch_size, output=None,
                             logprobs=score.logprobs))
    return rows


def _items(data, categories, limit) -> tuple[list[MCItem], str | None]:
    """The items to evaluate (after ``categories``, then ``limit``) and the file they came from."""
    if isinstance(data, (str, os.PathLike)):
        source = str(data)
        # without a category filter only the first `limit` rows are read
        items = load_mc(data, limit=limit if categories is None else None)
    else:
        source = None
        items = list(data)
        if not items:
            raise UserError("no items to evaluate")
        if not all(isinstance(it, MCItem) for it in items):
            raise UserError("data must be a path or a list of pyfuse.data.mmlu.MCItem")
    items = _select(items, categories, limit, source or "data")
    if not items:
        raise UserError("no items to evaluate")
    return items, source


def _per_category(rows: list[dict]) -> dict[str, dict]:
    per_cat: dict[str, dict] = {}
    for r in rows:
        c = per_cat.setdefault(r["category"], {"n": 0, "correct": 0})
        c["n"] += 1
        c["correct"] += int(r["correct"])
    for c in per_cat.values():
        c["accuracy"] = c["correct"] / c["n"]
    return dict(sorted(per_cat.items()))


def _row(item: MCItem, prediction, rule, method, batch, *, output=None, n_tokens=None, truncated=None,
         logprobs=None) -> dict:
    return {
        "id": item.question_id,
        "category": item.category,
        "gold": item.answer,
        "prediction": prediction,
        "rule": rule,
        "correct": prediction is not None and prediction == item.answer,
        "output": output,
        "method": method,
        "batch": batch,
        "num_options": item.num_options,
        "n_tokens": n_tokens,
        "truncated": truncated,
        "logprobs": logprobs,
    }
