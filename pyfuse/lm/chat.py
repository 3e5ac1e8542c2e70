"""The one chat renderer: turns -> the text (and token ids) a model is asked with.

Every prompt pyfuse puts to a chat model (``pyfuse eval mc`` and ``eval
identity`` questions, the noise floor's conversation prompts and MC items)
is rendered here: the tokenizer's chat template, ``enable_thinking=False``
passed explicitly, an optional system turn first. The text is encoded as
``mlx_lm generate`` does: without special tokens when the template made
them, with them otherwise.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["chat_prompt", "chat_text"]


def chat_text(tokenizer, user_text: str | None = None, *, system_prompt: str | None = None,
              messages: Sequence[dict] | None = None, add_generation_prompt: bool = True) -> tuple[str, bool]:
    """``(text, add_special_tokens)``: ``user_text`` as one user turn (or
    ``messages``, a conversation) of the chat template, with the generation
    prompt (the start of the assistant's turn) unless
    ``add_generation_prompt`` is False (a whole conversation, e.g. to be
    teacher-forced), rendered to text. Encode it with the flag. A tokenizer
    without a chat template gets the plain text (the turns' contents
    separated by blank lines, then a newline), encoded with its special
    tokens."""
    if (user_text is None) == (messages is None):
        raise ValueError("give exactly one of user_text and messages")
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns += list(messages) if messages is not None else [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "has_chat_template", False):
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt,
                                             enable_thinking=False, tokenize=False)
        return text, False
    return "\n\n".join(t["content"] for t in turns) + "\n", True


def chat_prompt(tokenizer, user_text: str | None = None, *, system_prompt: str | None = None,
                messages: Sequence[dict] | None = None, add_generation_prompt: bool = True,
                assistant_prefix: str = "") -> list[int]:
    """Token ids of :func:`chat_text` with ``assistant_prefix`` (the start of
    the assistant's answer) appended before tokenising."""
    text, special = chat_text(tokenizer, user_text, system_prompt=system_prompt, messages=messages,
                              add_generation_prompt=add_generation_prompt)
    return list(tokenizer.encode(text + assistant_prefix, add_special_tokens=special))
