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


def is_held_out(i: int, n: int, every: int) -> bool:
    """Whether sequence ``i`` of ``n`` is held out when every ``every``-th is
    (none when ``every`` is 0 or there is one sequence): the rule of
    :func:`pyfuse.calibration.collect_hessians`."""
    return bool(every) and n > 1 and i % every == every - 1


def held_out_sequences(tokenizer, data, *, every: int, max_seq_len: int) -> list[list[int]]:
    """The token ids of the sequences of ``data`` that the calibration holds out."""
    seqs = calibration_sequences(tokenizer, data, max_seq_len=max_seq_len)
    return [s for i, s in enumerate(seqs) if is_held_out(i, len(seqs), every)]
