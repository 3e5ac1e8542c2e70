"""Calibration rows (mlx-lm's data formats, read and checked by
:func:`pyfuse.train.data.load_training_data`) -> token ids, rendered the way
mlx-lm's trainer renders them: ``text`` as is, ``messages`` and
``prompt``/``completion`` through the one chat renderer
(:func:`pyfuse.lm.chat.chat_prompt`), whole conversations."""

from __future__ import annotations

from ..errors import UserError
from ..lm.chat import chat_prompt
from ..train.data import load_training_data


def row_tokens(tokenizer, row: dict, fmt: str) -> list[int]:
    if fmt == "text":
        return list(tokenizer.encode(row["text"]))
    if fmt == "chat":
        return chat_prompt(tokenizer, messages=row["messages"], add_generation_prompt=False)
    return chat_prompt(tokenizer, messages=[{"role": "user", "content": row["prompt"]},
                                            {"role": "assistant", "content": row["completion"]}],
                       add_generation_prompt=False)


def calibration_sequences(tokenizer, data, *, max_seq_len: int) -> list[list[int]]:
    """Token ids of every row of ``data`` (a ``.jsonl`` file, an mlx-lm data
    directory: train then valid rows, or a list of rows), each cut to
    ``max_seq_len`` tokens."""
    loaded = load_training_data(data)
    seqs = [row_tokens(tokenizer, row, loaded.format)[:max_seq_len] for row in loaded.train + loaded.valid]
    seqs = [s for s in seqs if s]
    if not seqs:
        raise UserError(f"{loaded.source}: no tokens to calibrate with")
    return seqs
