"""DPO pairs from an SFT data set: the real reply is ``chosen``, the model's
own greedy reply to the same prompt is ``rejected`` (the persona recipe's
phase 2: the person's answer preferred over the base model's).

Each chat row's conversation up to its last assistant turn is the prompt
(``messages``), that turn the chosen reply; a completions row gives
``prompt`` / ``completion``. Replies are generated greedily (thinking off)
in fixed batches (:mod:`pyfuse.lm.generate`). A pair whose generated reply
equals the real one teaches nothing and is left out (counted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

__all__ = ["PairsResult", "make_pairs"]


@dataclass
class PairsResult:
    out: Path
    written: dict[str, int]
    identical: int
    truncated: int
    warnings: list[str] = field(default_factory=list)


def _prompt_and_reply(row: dict) -> tuple[list[dict], str]:
    if "messages" in row:
        msgs = list(row["messages"])
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    return [{"role": "user", "content": row["prompt"]}], row["completion"]


def make_pairs(model, data, out: str | os.PathLike, *, adapter_path=None, batch_size: int = 8,
               max_tokens: int = 256, limit: int | None = None, force: bool = False) -> PairsResult:
    """Write ``out/train.jsonl`` (and ``valid.jsonl`` when ``data`` has one)
    of ``{"messages", "chosen", "rejected"}`` rows: ``chosen`` the data's
    reply, ``rejected`` the greedy reply of ``model`` (with ``adapter_path``).
    ``limit``: the first N rows of each file."""
    from ..io.files import write_jsonl
    from ..io.outputs import staged_dir
    from ..lm.chat import chat_prompt
    from ..lm.generate import check_positive, generate_batched
    from ..lm.load import load_for_inference
    from ..train.data import load_training_data

    check_positive("batch_size", batch_size)
    check_positive("max_tokens", max_tokens)
    check_positive("limit", limit, allow_none=True)
    td = load_training_data(data)
    if td.format not in ("chat", "completions"):
        raise UserError(f"{td.source}: pairs need chat or completions rows (a prompt and its reply), "
                        f"the data is {td.format} rows")
    final = Path(out)
    if final.exists() and not force:
        raise UserError(f"{final} exists (pass force=True / --force to replace it)")
    lm = load_for_inference(model, adapter_path)
    result = PairsResult(out=final, written={}, identical=0, truncated=0)
    files = {}
    for name, rows in (("train", td.train), ("valid", td.valid)):
        rows = rows[:limit] if limit else rows
        if not rows:
            continue
        split = [_prompt_and_reply(r) for r in rows]
        prompts = [chat_prompt(lm.tokenizer, messages=m) for m, _ in split]
        gens = generate_batched(lm.model, lm.tokenizer, prompts, batch_size=batch_size, max_tokens=max_tokens,
                                description=f"pairs {name}")
        pairs = []
        for (msgs, real), g in zip(split, gens):
            result.truncated += g.truncated
            if g.text.strip() == real.strip():
                result.identical += 1
                continue
            pairs.append({"messages": msgs, "chosen": real, "rejected": g.text})
        files[name] = pairs
        result.written[name] = len(pairs)
    if not files.get("train"):
        raise UserError(f"{td.source}: no pair left (every generated reply equals the real one)")
    with staged_dir(final, force) as tmp:
        for name, pairs in files.items():
            write_jsonl(tmp / f"{name}.jsonl", pairs)
    if result.identical:
        result.warnings.append(f"{result.identical} row(s) left out: the model's reply equals the real one")
    if result.truncated:
        result.warnings.append(f"{result.truncated} generated reply(ies) cut at max_tokens={max_tokens}")
    return result
