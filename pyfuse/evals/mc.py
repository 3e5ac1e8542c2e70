r"""Multiple-choice evaluation (MMLU-Pro rows) of an mlx-lm model.

:func:`evaluate_mc` asks every item with :func:`pyfuse.data.mmlu.format_question`
as the user turn of the model's chat template, rendered with
``enable_thinking=False`` passed explicitly (an optional system prompt
first), and scores it one of two ways:

``generate`` (the reference)
    Greedy decoding (temperature 0: ``batch_generate`` with no sampler) of
    up to ``max_tokens`` tokens with mlx-lm's ``batch_generate``; the letter
    is extracted from the text with :func:`pyfuse.evals.extract_answer`.
    Items are batched in a fixed way that does not depend on the model:
    batch ``k`` holds items ``k*B .. k*B+B-1`` of the evaluated list (file
    order, after ``categories`` and ``limit``), and each batch is one
    ``batch_generate`` call with ``prefill_batch_size`` and
    ``completion_batch_size`` equal to its size, so no item joins a batch
    late (continuous batching would otherwise mix items depending on when
    other items finish, i.e. on the model). Every model compared on the same
    file with the same ``batch_size`` decodes exactly the same batches. The
    batch index is written in each row.
``logprob`` (fast)
    One forward pass per item over the prompt followed by the assistant's
    ``answer_prefix`` (default ``\boxed{``): for each valid option letter
    ``X`` the score is ``log P(answer_prefix + X | prompt)``, the summed
    log-probability of the tokens that spell ``answer_prefix + X`` after the
    prompt (tokenised together, so a tokenizer that merges ``{C`` into one
    token is scored on that token, and one that splits ``{`` ``G`` on both).
    The prediction is the best-scoring letter (ties: the earliest). It is the
    letter the model prefers *if it answers immediately* in the boxed form,
    restricted to valid letters: when the greedy output of ``generate``
    begins with ``\boxed{X`` and each letter is one token after the shared
    prefix, both methods give ``X``; they differ when the model reasons
    first, answers in another form, or would not answer at all (``generate``
    scores that wrong, ``logprob`` always picks a letter). It costs one
    prefill and no decoding (roughly ``max_tokens`` times fewer model
    steps). Items are scored one at a time (a prompt's prefill is already
    parallel over its tokens), so scores never depend on batch-mates or
    padding; the ``batch`` field still records the ``batch_size`` grouping.

Each result row (``out``, JSON Lines; accepted by
:func:`pyfuse.data.mmlu.read_results`) has: ``id``, ``category``, ``gold``,
``prediction`` (a letter or null), ``rule`` (the extraction rule, or
``"logprob"``), ``correct``, ``output`` (the decoded generation, null for
``logprob``), ``method``, ``batch``, ``num_options``, ``n_tokens`` and
``truncated`` (``generate``: tokens generated and whether ``max_tokens``
cut the output; null for ``logprob``) and ``logprobs`` (``logprob``:
``{letter: score}``; null for ``generate``).

The model is a path (loaded with ``mlx_lm.load``, optionally with an
unfused ``adapter_path``) or an already loaded ``(model, tokenizer)`` pair.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import progress
from ..errors import UserError
from ..data.mmlu import LETTERS, MCItem, format_question, load_mc
from ..io.files import write_jsonl
from .extract import extract_answer

METHODS = ("generate", "logprob")
DEFAULT_MAX_TOKENS = 1024
DEFAULT_BATCH_SIZE = 8
DEFAULT_ANSWER_PREFIX = "\\boxed{"

__all__ = ["METHODS", "MCEvalResult", "LoadedModel", "chat_prompt", "chat_text", "evaluate_mc", "generate_batched",
           "load_model", "score_letters"]


# ---------------------------------------------------------------------------
# Model loading and prompting (shared with pyfuse.evals.identity)
# ---------------------------------------------------------------------------


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str  # the path it came from, or "<in-memory model>"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load_model(model, adapter_path: str | os.PathLike | None = None) -> LoadedModel:
    """A model path (an mlx-lm model directory) or a ``(model, tokenizer)``
    pair -> :class:`LoadedModel`. A directory that does not load raises
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
    from mlx_lm.utils import load

    try:
        with contextlib.redirect_stdout(sys.stderr):
            m, tok = load(str(path), adapter_path=str(adapter_path) if adapter_path is not None else None)
    except Exception as err:  # mlx-lm raises anything from FileNotFoundError to KeyError
        what = "the model" if adapter_path is None else f"the model with adapter {adapter_path}"
        raise UserError(f"{path}: cannot load {what} ({type(err).__name__}: {_first_line(err)})") from None
    return LoadedModel(m, tok, str(path))


def chat_text(tokenizer, user_text: str | None = None, *, system_prompt: str | None = None,
              messages: Sequence[dict] | None = None) -> tuple[str, bool]:
    """``(text, add_special_tokens)``: ``user_text`` as one user turn (or
    ``messages``, a conversation ending with a user turn) of the chat
    template with the generation prompt, ``enable_thinking=False`` passed
    explicitly, rendered to text. Encode it with the flag, as ``mlx_lm
    generate`` does: without special tokens (the template has them). A
    tokenizer without a chat template gets the plain text (the turns'
    contents separated by blank lines, then a newline), encoded with its
    special tokens."""
    if (user_text is None) == (messages is None):
        raise ValueError("give exactly one of user_text and messages")
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns += list(messages) if messages is not None else [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "has_chat_template", False):
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                             enable_thinking=False, tokenize=False)
        return text, False
    return "\n\n".join(t["content"] for t in turns) + "\n", True


def chat_prompt(tokenizer, user_text: str | None = None, *, system_prompt: str | None = None,
                messages: Sequence[dict] | None = None, assistant_prefix: str = "") -> list[int]:
    """Token ids of :func:`chat_text` with ``assistant_prefix`` (the start of
    the assistant's answer) appended before tokenising."""
    text, special = chat_text(tokenizer, user_text, system_prompt=system_prompt, messages=messages)
    return list(tokenizer.encode(text + assistant_prefix, add_special_tokens=special))


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    truncated: bool
    batch: int


def _check_positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def batches(n: int, batch_size: int) -> list[range]:
    """The fixed batch composition: consecutive runs of ``batch_size``
    indices (the last may be shorter)."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def generate_batched(model, tokenizer, prompts: Sequence[list[int]], *, batch_size: int,
                     max_tokens: int, description: str = "generate") -> list[Generation]:
    """Greedy generations for token-id prompts, ``batch_size`` consecutive
    prompts per ``batch_generate`` call (see the module doc)."""
    from mlx_lm.generate import batch_generate

    _check_positive("batch_size", batch_size)
    _check_positive("max_tokens", max_tokens)
    out: list[Generation] = []
    with progress.progress_bar() as bar:
        task = bar.add_task(description, total=len(prompts))
        for k, idx in enumerate(batches(len(prompts), batch_size)):
            chunk = [list(prompts[i]) for i in idx]
            resp = batch_generate(model, tokenizer, chunk, max_tokens=max_tokens,
                                  prefill_batch_size=len(chunk), completion_batch_size=len(chunk),
                                  return_token_ids=True)
            for text, ids in zip(resp.texts, resp.token_ids):
                out.append(Generation(text=text, token_ids=list(ids), truncated=len(ids) >= max_tokens,
                                      batch=k))
            bar.advance(task, len(chunk))
    return out


# ---------------------------------------------------------------------------
# Log-probability scoring
# ---------------------------------------------------------------------------


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs[1:]):
            return i
    return n


def _is_prefix(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) <= len(b) and list(b[:len(a)]) == list(a)


def score_letters(model, prompt_text_ids, letters: str) -> dict[str, float]:
    """``{X: log P(tokens spelling X after the prompt)}`` for each letter.

    ``prompt_text_ids(X)`` returns the token ids of the whole prompt with the
    answer prefix and ``X`` appended (tokenised together). The candidates
    share a prefix; the tokens after it are scored. Usually every candidate's
    tokens up to its last one lie on one shared path (e.g. ``{A`` is one
    token, ``{`` ``G`` two: the path is ``{``), so one sequence - shared
    prefix + path - gives every score from one forward pass; candidates off
    that path get a pass of their own."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cands = {x: list(prompt_text_ids(x)) for x in letters}
    seqs = list(cands.values())
    if len(set(map(tuple, seqs))) != len(seqs):
        raise UserError("the option letters tokenise identically after the prompt; cannot score them")
    lcp = _common_prefix_len(seqs)
    if lcp == 0:
        raise UserError("the candidate answers share no prompt tokens; cannot score them")
    suffixes = {x: s[lcp:] for x, s in cands.items()}
    if not all(suffixes.values()):
        raise UserError("one option letter's tokens are a prefix of another's; cannot score them")
    # The longest path (all but the last token) that the others are prefixes of.
    paths = sorted((s[:-1] for s in suffixes.values()), key=len, reverse=True)
    chain = paths[0]
    rows: list[list[int]] = [cands[letters[0]][:lcp] + chain]
    row_of: dict[str, int] = {}
    for x, s in suffixes.items():
        if _is_prefix(s[:-1], chain):
            row_of[x] = 0
        else:
            rows.append(cands[x][:lcp] + s[:-1])
            row_of[x] = len(rows) - 1

    def logprobs_tail(row: list[int], k: int) -> mx.array:
        """log-softmax of the logits at the last ``k`` positions of ``row``
        (the prefix goes through the KV cache only, so the vocabulary
        projection runs on ``k`` positions)."""
        cache = make_prompt_cache(model)
        head, tail = row[:-k], row[-k:]
        if head:
            model(mx.array([head]), cache=cache)
            mx.eval([c.state for c in cache])
        logits = model(mx.array([tail]), cache=cache)[0].astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    # positions lcp-1 .. len(row)-1 of a row predict its candidate tokens:
    # position j of the tail predicts suffix token j
    tails = [logprobs_tail(row, len(row) - lcp + 1) for row in rows]
    sums = {x: mx.sum(tails[row_of[x]][mx.arange(len(s)), mx.array(s)]) for x, s in suffixes.items()}
    mx.eval(list(sums.values()))
    return {x: float(v.item()) for x, v in sums.items()}


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------


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
                adapter_path: str | os.PathLike | None = None) -> MCEvalResult:
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
        out: write the per-item rows here (JSONL, atomically).
        categories: evaluate only these categories (unknown names are an error).
        system_prompt: a system turn before each question.
        answer_prefix: what the ``logprob`` method puts after the generation
            prompt before the letter.
        adapter_path: an unfused mlx-lm adapter to load with the model path.
    """
    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_positive("batch_size", batch_size)
    _check_positive("limit", limit, allow_none=True)
    if method == "generate":
        _check_positive("max_tokens", max_tokens)
    if method == "logprob" and not answer_prefix:
        raise UserError("answer_prefix must not be empty for method 'logprob'")
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

    lm = load_model(model, adapter_path)
    started = time.perf_counter()
    rows: list[dict] = []
    if method == "generate":
        prompts = [chat_prompt(lm.tokenizer, format_question(it), system_prompt=system_prompt)
                   for it in items]
        gens = generate_batched(lm.model, lm.tokenizer, prompts, batch_size=batch_size,
                                max_tokens=max_tokens, description="eval mc (generate)")
        for it, g in zip(items, gens):
            pred, rule = extract_answer(g.text, it.num_options)
            rows.append(_row(it, pred, rule, method, g.batch, output=g.text,
                             n_tokens=len(g.token_ids), truncated=g.truncated))
    else:
        for i, it in enumerate(progress.track(items, "eval mc (logprob)")):
            text, special = chat_text(lm.tokenizer, format_question(it), system_prompt=system_prompt)

            def ids_for(letter, _text=text, _special=special):
                return lm.tokenizer.encode(_text + answer_prefix + letter, add_special_tokens=_special)

            scores = score_letters(lm.model, ids_for, LETTERS[:it.num_options])
            best = max(scores, key=lambda x: (scores[x], -LETTERS.index(x)))
            rows.append(_row(it, best, "logprob", method, i // batch_size, output=None,
                             logprobs={k: round(v, 6) for k, v in scores.items()}))
    seconds = time.perf_counter() - started

    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    per_cat: dict[str, dict] = {}
    for r in rows:
        c = per_cat.setdefault(r["category"], {"n": 0, "correct": 0})
        c["n"] += 1
        c["correct"] += int(r["correct"])
    for c in per_cat.values():
        c["accuracy"] = c["correct"] / c["n"]
    out_path = None
    if out is not None:
        out_path = write_jsonl(out, rows)
    return MCEvalResult(accuracy=correct / n, n=n, correct=correct, rows=rows, method=method,
                        batch_size=batch_size, max_tokens=max_tokens if method == "generate" else None,
                        model=lm.name, data=source, seconds=seconds,
                        per_category=dict(sorted(per_cat.items())), out=out_path)


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
