"""Reading and checking mlx-lm training data before any model is loaded.

The formats are mlx-lm's (``mlx_lm.tuner.datasets``): chat rows
``{"messages": [...]}``, completions ``{"prompt", "completion"}`` and
``{"text"}`` rows, the format decided by the first row. Every row is checked
here so that a bad row is reported by file and line, not as a stack trace
from deep inside the trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io.files import iter_jsonl

DATA_FORMATS = ("chat", "completions", "text", "pairs")
_ROLES = ("system", "user", "assistant", "tool")

__all__ = ["DATA_FORMATS", "TrainingData", "load_training_data"]


@dataclass
class TrainingData:
    """Validated rows in one of mlx-lm's formats (``chat``, ``completions``,
    ``text``). ``where`` gives each row's origin (``file: line N``)."""

    train: list[dict]
    valid: list[dict]
    format: str
    source: str
    train_where: list[str] = field(default_factory=list)
    valid_where: list[str] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    test_where: list[str] = field(default_factory=list)


def _row_format(row: dict) -> str | None:
    if "chosen" in row and "rejected" in row:  # preference pairs (DPO / ORPO)
        return "pairs"
    # mlx-lm's create_dataset order: completions, chat, text
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    return None


def _check_chat(row: dict, where: str) -> None:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: field 'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            raise UserError(f"{where}: field 'messages[{j}]' must be an object with 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise UserError(f"{where}: field 'messages[{j}].role': unknown role {m['role']!r} "
                            f"(one of {', '.join(_ROLES)})")
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise UserError(f"{where}: field 'messages[{j}].content' must be a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: field 'messages' has no assistant turn to learn from")


def _check_completions(row: dict, where: str) -> None:
    for k in ("prompt", "completion"):
        if not isinstance(row[k], str):
            raise UserError(f"{where}: field '{k}' must be a string")
    if not row["completion"]:
        raise UserError(f"{where}: field 'completion' is empty")


def _check_text(row: dict, where: str) -> None:
    if not isinstance(row["text"], str) or not row["text"].strip():
        raise UserError(f"{where}: field 'text' must be a non-empty string")


def _check_pairs(row: dict, where: str) -> None:
    if "messages" in row:
        _check_chat({"messages": list(row["messages"]) + [{"role": "assistant", "content": ""}]}
                    if isinstance(row["messages"], list) else row, where)
    elif not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise UserError(f"{where}: a preference pair needs 'prompt' (a string) or 'messages'")
    for k in ("chosen", "rejected"):
        if not isinstance(row[k], str) or not row[k].strip():
            raise UserError(f"{where}: field '{k}' must be a non-empty string")


_CHECKS = {"chat": _check_chat, "completions": _check_completions, "text": _check_text, "pairs": _check_pairs}


def _check_row(row: Any, fmt: str | None, where: str) -> str:
    """The row's format, after checking it (and that it is ``fmt``, if given)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    got = _row_format(row)
    if got is None:
        raise UserError(f"{where}: not an mlx-lm training row: expected 'messages' (chat), "
                        f"'prompt' and 'completion' (completions), 'text', or 'chosen' and 'rejected' "
                        f"(preference pairs), got keys "
                        f"{sorted(row)[:6]}")
    if fmt is not None and got != fmt:
        raise UserError(f"{where}: a {got} row in {fmt} data (mlx-lm takes the format from the "
                        "first row; use one format per file)")
    _CHECKS[got](row, where)
    return got


def _read_jsonl_rows(path: Path) -> tuple[list[Any], list[str]]:
    rows, where = [], []
    for line, row in iter_jsonl(path):
        rows.append(row)
        where.append(f"{path}: {line}")
    return rows, where


def _read_dir(path: Path) -> tuple[list, list[str], list, list[str], list, list[str]]:
    """``train.jsonl`` and the optional ``valid.jsonl`` and ``test.jsonl`` of
    an mlx-lm data directory."""
    tpath = path / "train.jsonl"
    if not tpath.exists():
        raise UserError(f"{path}: no train.jsonl (a data directory holds train.jsonl and "
                        "optionally valid.jsonl)")
    train, tw = _read_jsonl_rows(tpath)
    vpath = path / "valid.jsonl"
    valid, vw = _read_jsonl_rows(vpath) if vpath.exists() else ([], [])
    if vpath.exists() and not valid:
        raise UserError(f"{vpath}: no rows (remove the file to train without validation)")
    test_path = path / "test.jsonl"
    test, sw = _read_jsonl_rows(test_path) if test_path.exists() else ([], [])
    return train, tw, valid, vw, test, sw


def _read(data) -> tuple[str, list, list[str], list, list[str], list, list[str]]:
    """``(source, train rows, their origins, valid rows, their origins,
    test rows, their origins)``."""
    if isinstance(data, (list, tuple)):
        return "<rows>", list(data), [f"row {i}" for i in range(len(data))], [], [], [], []
    if not isinstance(data, (str, os.PathLike)):
        raise UserError(f"data must be a directory, a .jsonl file or a list of rows, got {type(data).__name__}")
    path = Path(data)
    if path.is_dir():
        return (str(path), *_read_dir(path))
    if path.exists():
        return (str(path), *_read_jsonl_rows(path), [], [], [], [])
    raise UserError(f"data {path} does not exist")


def load_training_data(data) -> TrainingData:
    """mlx-lm training data from a directory (``train.jsonl``, optional
    ``valid.jsonl``, as ``mlx_lm lora --data``), one ``.jsonl`` file (train
    only) or a list of row dicts. Every row is checked; the format is the
    first row's and every other row (train and valid) must share it."""
    source, train, tw, valid, vw, test, sw = _read(data)
    if not train:
        raise UserError(f"{source}: no training rows")
    fmt = _check_row(train[0], None, tw[0])
    for row, w in zip(train[1:], tw[1:]):
        _check_row(row, fmt, w)
    for row, w in zip(valid + test, vw + sw):
        _check_row(row, fmt, w)
    return TrainingData(train=train, valid=valid, format=fmt, source=source, train_where=tw, valid_where=vw,
                        test=test, test_where=sw)
