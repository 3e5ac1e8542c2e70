r"""MMLU-Pro style multiple-choice data and per-item eval results.

* :func:`load_mc` reads MMLU-Pro rows (question_id, question, options,
  answer, answer_index, cot_content, category, src) from JSON Lines or
  Parquet (the format of the Hugging Face release) into validated
  :class:`MCItem` objects. Trailing ``"N/A"`` options (padding in some
  MMLU-Pro exports) are dropped before validation.
* :func:`load_mc_rows`: the same rows, each with the row as read (to write
  a subset back unchanged: :mod:`pyfuse.data.sampler`).
* :func:`format_question` renders the prompt used for evaluation and for
  Set-G training data, ending with the ``\boxed{X}`` instruction.
* :func:`read_results` / :func:`match_results` read and pair the per-item
  result files written by ``pyfuse eval mc`` (one JSON object per item:
  id, category, gold, prediction, rule, correct, output).

Every problem with a file's contents raises :class:`pyfuse.errors.UserError`
naming the file, the line (JSONL, 1-based) or row (Parquet, 0-based) and
the field.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any, Iterator, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, \
    field_validator, model_validator

from ..errors import UserError
from ..io.files import iter_jsonl

LETTERS = string.ascii_uppercase[:10]  # MMLU-Pro: at most 10 options, A-J
MIN_OPTIONS, MAX_OPTIONS = 2, 10
PARQUET_SUFFIXES = (".parquet", ".pq")

ItemId = Union[StrictInt, StrictStr]


def id_key(item_id: int | str) -> str:
    """Items are matched across files by ``str(id)``: an id written as 5 in
    one file and "5" in another is the same item."""
    return str(item_id)


def _check_id(v: Any) -> Any:
    # One clear message instead of the union's two ("not an int", "not a str").
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"must be an integer or a string, got {v!r}")
    return v


class MCItem(BaseModel):
    """One multiple-choice item (an MMLU-Pro row). Extra columns are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    question_id: ItemId
    question: StrictStr = Field(min_length=1)
    options: list[StrictStr] = Field(min_length=MIN_OPTIONS, max_length=MAX_OPTIONS)
    answer: StrictStr
    answer_index: StrictInt
    cot_content: StrictStr = ""
    category: StrictStr = Field(min_length=1)
    src: StrictStr = ""

    @field_validator("question_id", mode="before")
    @classmethod
    def _id_type(cls, v: Any) -> Any:
        return _check_id(v)

    @field_validator("options", mode="before")
    @classmethod
    def _drop_trailing_na(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            v = list(v)
            while v and v[-1] == "N/A":
                v.pop()
        return v

    @field_validator("cot_content", "src", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return "" if v is None else v

    @field_validator("answer")
    @classmethod
    def _answer_is_letter(cls, v: str) -> str:
        if len(v) != 1 or v not in LETTERS:
            raise ValueError(f"must be one letter A-J, got {v!r}")
        return v

    @model_validator(mode="after")
    def _answer_agrees(self) -> "MCItem":
        if not 0 <= self.answer_index < len(self.options):
            raise ValueError(f"field 'answer_index': {self.answer_index} is out of range for "
                             f"{len(self.options)} options")
        if LETTERS[self.answer_index] != self.answer:
            raise ValueError(f"field 'answer': {self.answer!r} disagrees with answer_index "
                             f"{self.answer_index} ({LETTERS[self.answer_index]!r})")
        return self

    @property
    def num_options(self) -> int:
        return len(self.options)


class MCResult(BaseModel):
    """One line of a per-item eval result file (``pyfuse eval mc``)."""

    model_config = ConfigDict(extra="allow")

    id: ItemId
    correct: StrictBool
    category: StrictStr | None = None
    gold: StrictStr | None = None
    prediction: StrictStr | None = None
    rule: StrictStr | None = None
    output: StrictStr | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_type(cls, v: Any) -> Any:
        return _check_id(v)


def describe_validation_error(err: ValidationError) -> str:
    """pydantic's first error in one line: ``field 'options[2]': ...``."""
    first = err.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                  for i, p in enumerate(first["loc"]))
    msg = first["msg"].removeprefix("Value error, ")
    return f"field '{loc}': {msg}" if loc else msg


def validate_as(model: type[BaseModel], data: Any, where: str):
    """``model.model_validate(data)``, or a one-line UserError: ``where: field '...': ...``."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{where}: {describe_validation_error(err)}") from None


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise UserError(f"{path}: no such file")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: cannot read as Parquet ({err})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"row {row} (0-based)", record
            row += 1


def _validated(path: Path, rows: Iterator[tuple[str, Any]], model: type[BaseModel], id_field: str,
               limit: int | None = None, keep_raw: bool = False) -> list:
    """``rows`` (``(where, row)``) validated as ``model``, at most ``limit``
    (with ``keep_raw``: ``(object, row as read)`` pairs); ids (``id_field``)
    must be unique. Errors name the file, row and field."""
    out: list = []
    seen: dict[str, str] = {}
    for where, row in rows:
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(row, dict):
            raise UserError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}")
        obj = validate_as(model, row, f"{path}: {where}")
        value = getattr(obj, id_field)
        key = id_key(value)
        if key in seen:
            raise UserError(f"{path}: {where}: field '{id_field}': {value!r} repeats {seen[key]}")
        seen[key] = where
        out.append((obj, row) if keep_raw else obj)
    return out


def _iter_rows(path: str | os.PathLike) -> tuple[Path, Iterator[tuple[str, Any]]]:
    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return path, _iter_parquet(path)
    return path, iter_jsonl(path)


def load_mc(path: str | os.PathLike, limit: int | None = None) -> list[MCItem]:
    """Validated multiple-choice items from a JSONL or Parquet file (by
    suffix: ``.parquet``/``.pq`` is Parquet, anything else JSON Lines), the
    first ``limit`` of them if given. Question ids must be unique."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer, got {limit!r}")
    path, rows = _iter_rows(path)
    items = _validated(path, rows, MCItem, "question_id", limit)
    if not items:
        raise UserError(f"{path}: no items")
    return items


def load_mc_rows(path: str | os.PathLike) -> list[tuple[MCItem, dict]]:
    """Every row of a JSONL or Parquet file as ``(validated item, the row as
    read)``, so that a subset can be written back with every column."""
    path, rows = _iter_rows(path)
    pairs = _validated(path, rows, MCItem, "question_id", keep_raw=True)
    if not pairs:
        raise UserError(f"{path}: no items")
    return pairs


def format_question(item: MCItem) -> str:
    r"""The question, its lettered options and the ``\boxed{X}`` instruction."""
    letters = LETTERS[:item.num_options]
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, item.options))
    # The instruction names no option letter, so that an output echoing it
    # extracts no answer.
    return (f"{item.question.strip()}\n\nOptions:\n{options}\n\n"
            f"Answer with the letter of the correct option in the form \\boxed{{X}}.")


def read_results(path: str | os.PathLike) -> list[MCResult]:
    """Per-item eval results (JSONL); ids must be unique, the file non-empty."""
    path = Path(path)
    results = _validated(path, iter_jsonl(path), MCResult, "id")
    if not results:
        raise UserError(f"{path}: no results")
    return results


def match_results(a: list[MCResult], b: list[MCResult], name_a: str = "a",
                  name_b: str = "b") -> list[tuple[MCResult, MCResult]]:
    """Pairs ``(a_i, b_i)`` of results for the same item, in ``a``'s order.
    Both must cover exactly the same ids (otherwise the comparison would
    silently be on different items)."""
    by_id_b = {id_key(r.id): r for r in b}
    ids_a = {id_key(r.id) for r in a}
    only_a = sorted(ids_a - by_id_b.keys())
    only_b = sorted(by_id_b.keys() - ids_a)
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in {name_a} (e.g. {', '.join(only_a[:3])})")
        if only_b:
            parts.append(f"{len(only_b)} only in {name_b} (e.g. {', '.join(only_b[:3])})")
        raise UserError(f"{name_a} and {name_b} cover different items: {'; '.join(parts)}")
    return [(r, by_id_b[id_key(r.id)]) for r in a]
