r"""Set-G: the items that both the base and the persona model get wrong,
split into mlx-lm training data and held-out test items.

Inputs are two per-item eval result files (``pyfuse eval mc`` output) over
the same items and the MMLU-Pro file those evals ran on (for the question
text). Set-G is every item with ``correct`` false in both.

The split is given as fractions, ``{"train": 0.7, "test": 0.3}`` by default
(the study's 70/30: 2,312 -> 1,620 / 692), stratified by category and
deterministic:

* Items of a category are ordered by id, then permuted by a generator
  seeded with ``(seed, crc32(category))``: a category's split depends only
  on the seed and its own items, not on the input order or on the other
  categories.
* A category of ``n`` items puts ``round(train * n)`` (halves round up) in
  train and the rest in test, so a 1-item category goes to train and a
  2-item one gives one item to each.
* With ``valid_frac`` > 0 a validation set (mlx-lm's validation loss) is
  carved from each category's train share: ``round(valid_frac * n_train)``
  items (halves up); the test share is untouched.
* Each split file is then shuffled with a generator seeded by
  ``(seed, split)`` so that categories are interleaved for trainers that
  read in order.
* An empty train or test split is an error (and an empty valid split when
  one was asked for).

:func:`split_sizes` is the rule alone: the experiment engine predicts the
test n from it before any model runs.

Written to ``out``: ``train.jsonl``, ``test.jsonl`` (and ``valid.jsonl``
when there is a validation set) in mlx-lm's chat format
(``{"messages": [user: format_question(item), assistant: "\boxed{X}" + a
one-line justification from cot_content]}``), ``items.json`` (the item ids
of each split, in file order) and ``counts.json`` (per category and split,
with the split fractions).
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import ValidationError

from ..errors import UserError
from ..io.files import write_json, write_jsonl
from ..io.outputs import check_destination, staged_dir
from .mmlu import MCItem, MCResult, format_question, id_key, load_mc, match_results, read_results

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = {"train": 0.7, "test": 0.3}
JUSTIFICATION_MAX_CHARS = 300

# MMLU-Pro chain-of-thought boilerplate around the reasoning itself.
_COT_PREFIX = re.compile(r"^\s*(?:A:\s*)?(?:Let'?s think step by step\.?\s*)?", re.IGNORECASE)
_COT_SUFFIX = re.compile(r"\s*(?:(?:so|thus|therefore|hence),?\s*)?the (?:correct )?answer is\s*"
                         r"\(?[A-J]\)?\.?\s*$", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class SetGResult:
    """What :func:`mine_setg` found and wrote."""

    n_items: int  # items in both eval files
    n_setg: int  # items wrong in both
    split: dict[str, float]  # {"train": f, "test": 1 - f}
    valid_frac: float  # the share of train carved out as validation data
    seed: int
    splits: dict[str, list] = field(default_factory=dict)  # split -> item ids, file order
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> split -> n
    out: Path | None = None

    def totals(self) -> dict[str, int]:
        return {s: len(self.splits.get(s, [])) for s in SPLITS}


def justification(cot_content: str, max_chars: int = JUSTIFICATION_MAX_CHARS) -> str:
    """One line from an MMLU-Pro ``cot_content``: the boilerplate ("A: Let's
    think step by step." and the closing "The answer is (X).") removed,
    whitespace collapsed, and, if longer than ``max_chars``, only the last
    sentences that fit (the conclusion is at the end of the reasoning)."""
    text = _COT_SUFFIX.sub("", _COT_PREFIX.sub("", cot_content or ""))
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    kept: list[str] = []
    size = 0
    for sentence in reversed(_SENTENCE_END.split(text)):
        if kept and size + 1 + len(sentence) > max_chars:
            break
        kept.insert(0, sentence)
        size += len(sentence) + (1 if size else 0)
    line = " ".join(kept)
    if len(line) > max_chars:  # one overlong sentence: cut at a word boundary
        line = line[:max_chars - 1].rsplit(" ", 1)[0] + "…"
    return line


def chat_example(item: MCItem) -> dict:
    """The mlx-lm chat-format training example for one item."""
    answer = f"\\boxed{{{item.answer}}}"
    why = justification(item.cot_content)
    if why:
        answer += "\n" + why
    return {"messages": [{"role": "user", "content": format_question(item)},
                         {"role": "assistant", "content": answer}]}


def _as_list(obj: Any, model: type, read, name: str, noun: str) -> list:
    """``obj``: a file (read with ``read``) or a sequence of ``model``s or
    their dicts (validated here; errors say ``name: noun i``)."""
    if isinstance(obj, (str, os.PathLike)):
        return read(obj)
    out = []
    for i, x in enumerate(obj):
        try:
            out.append(x if isinstance(x, model) else model.model_validate(x))
        except ValidationError as err:
            raise UserError(f"{name}: {noun} {i}: {err.errors()[0]['msg']}") from None
    if not out:
        raise UserError(f"{name}: no {noun}s")
    return out


def _as_results(obj: Any, name: str) -> list[MCResult]:
    return _as_list(obj, MCResult, read_results, name, "result")


def _as_items(obj: Any) -> list[MCItem]:
    return _as_list(obj, MCItem, load_mc, "data", "item")


def check_split(split, valid_frac: float = 0.0) -> tuple[dict[str, float], float]:
    """``split`` as ``{"train": f, "test": 1 - f}`` (fractions in (0, 1)
    summing to 1) and ``valid_frac`` in [0, 1), or a UserError."""
    if split is None:
        split = DEFAULT_SPLIT
    if not isinstance(split, dict) or set(split) != {"train", "test"}:
        raise UserError(f"split must give the fractions train and test, e.g. {{train: 0.7, test: 0.3}}; got {split!r}")
    out = {}
    for k in ("train", "test"):
        v = split[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise UserError(f"split: {k} must be a fraction in (0, 1), got {v!r}")
        out[k] = float(v)
    if abs(out["train"] + out["test"] - 1) > 1e-9:
        raise UserError(f"split: train + test must be 1, got {out['train']:g} + {out['test']:g}")
    if isinstance(valid_frac, bool) or not isinstance(valid_frac, (int, float)) or not 0 <= valid_frac < 1:
        raise UserError(f"valid_frac (the share of train carved out for validation) must be in [0, 1), "
                        f"got {valid_frac!r}")
    return out, float(valid_frac)


def split_sizes(n_by_cat: dict[str, int], split: dict | None = None,
                valid_frac: float = 0.0) -> dict[str, dict[str, int]]:
    """``{category: {"train", "valid", "test"}}``: the split rule of the
    module doc applied to the category sizes ``n_by_cat``."""
    split, valid_frac = check_split(split, valid_frac)
    sizes = {}
    for cat in sorted(n_by_cat):
        n = n_by_cat[cat]
        n_train = min(n, int(np.floor(split["train"] * n + 0.5)))
        n_valid = int(np.floor(valid_frac * n_train + 0.5))
        sizes[cat] = {"train": n_train - n_valid, "valid": n_valid, "test": n - n_train}
    return sizes


def _rng(seed: int, label: str) -> np.random.Generator:
    # crc32, not hash(): str hashes are salted per process.
    return np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])


def _check_same_items(pairs: list[tuple[MCResult, MCResult]], items: dict[str, MCItem]) -> None:
    """The eval files must describe the items of the data."""
    missing = [id_key(b.id) for b, _ in pairs if id_key(b.id) not in items]
    if missing:
        raise UserError(f"data does not contain {len(missing)} evaluated item(s) (e.g. "
                        f"{', '.join(missing[:3])}): is --data the file the evals ran on?")
    for b, p in pairs:
        item = items[id_key(b.id)]
        for name, r in (("base", b), ("persona", p)):
            if r.gold is not None and r.gold != item.answer:
                raise UserError(f"{name}: item {r.id}: gold {r.gold!r} but the data's answer is "
                                f"{item.answer!r}: is --data the file the evals ran on?")
            if r.category is not None and r.category != item.category:
                raise UserError(f"{name}: item {r.id}: category {r.category!r} but the data says "
                                f"{item.category!r}: is --data the file the evals ran on?")


def _stratified_split(by_cat: dict[str, list[MCItem]], sizes: dict[str, dict[str, int]],
                      seed: int) -> dict[str, list[MCItem]]:
    """Each category's items into the splits (``sizes``), then each split
    shuffled (see the module doc)."""
    chosen: dict[str, list[MCItem]] = {s: [] for s in SPLITS}
    for cat in sorted(by_cat):
        members = sorted(by_cat[cat], key=lambda it: id_key(it.question_id))
        order = _rng(seed, f"category:{cat}").permutation(len(members))
        start = 0
        for split in SPLITS:
            stop = start + sizes[cat][split]
            chosen[split].extend(members[i] for i in order[start:stop])
            start = stop
    for split in SPLITS:
        order = _rng(seed, f"split:{split}").permutation(len(chosen[split]))
        chosen[split] = [chosen[split][i] for i in order]
    return chosen


def _write(out: Path, chosen: dict[str, list[MCItem]], result: SetGResult, force: bool) -> None:
    with staged_dir(out, force, "--out") as tmp:  # the whole directory, or nothing
        for split in SPLITS:
            if chosen[split] or split != "valid":  # mlx-lm data: valid.jsonl only when there is one
                write_jsonl(tmp / f"{split}.jsonl", [chat_example(it) for it in chosen[split]])
        write_json(tmp / "items.json", result.splits)
        write_json(tmp / "counts.json", {
            "n_items": result.n_items, "n_setg": result.n_setg, "split": result.split,
            "valid_frac": result.valid_frac, "seed": result.seed, "categories": result.counts,
            "total": {**result.totals(), "total": result.n_setg}})
    result.out = out


def mine_setg(base_results: str | os.PathLike | Sequence, persona_results: str | os.PathLike | Sequence,
              data: str | os.PathLike | Sequence, split: dict | None = None, valid_frac: float = 0.0,
              seed: int = 0, out: str | os.PathLike | None = None, force: bool = False) -> SetGResult:
    """Mine Set-G from two eval result sets and split it (see the module
    docstring). ``base_results``/``persona_results`` are result JSONL paths
    or lists of results, ``data`` the MMLU-Pro file (or items) the evals ran
    on; ``split`` the train/test fractions (default 70/30), ``valid_frac``
    the share of train carved out for validation. With ``out=None`` nothing
    is written; an existing ``out`` directory is replaced only with ``force``."""
    split, valid_frac = check_split(split, valid_frac)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if out is not None:
        check_destination(out, force, "--out")  # before any work
    base = _as_results(base_results, "base")
    persona = _as_results(persona_results, "persona")
    pairs = match_results(base, persona, "base", "persona")
    items = {id_key(it.question_id): it for it in _as_items(data)}
    _check_same_items(pairs, items)

    setg = [items[id_key(b.id)] for b, p in pairs if not b.correct and not p.correct]
    if not setg:
        raise UserError(f"Set-G is empty: no item out of {len(pairs)} is wrong for both models")
    by_cat: dict[str, list[MCItem]] = {}
    for item in setg:
        by_cat.setdefault(item.category, []).append(item)
    sizes = split_sizes({c: len(v) for c, v in by_cat.items()}, split, valid_frac)
    chosen = _stratified_split(by_cat, sizes, int(seed))
    empty = [s for s in SPLITS if not chosen[s] and (s != "valid" or valid_frac > 0)]
    if empty:
        raise UserError(f"Set-G has only {len(setg)} item(s): the {' and '.join(empty)} split(s) would "
                        f"be empty (change the split or evaluate more items)")

    result = SetGResult(n_items=len(pairs), n_setg=len(setg), split=split, valid_frac=valid_frac,
                        seed=int(seed),
                        splits={s: [it.question_id for it in chosen[s]] for s in SPLITS},
                        counts={c: {**sizes[c], "total": len(by_cat[c])} for c in sorted(by_cat)})
    if out is not None:
        _write(Path(out), chosen, result, force)
    return result
