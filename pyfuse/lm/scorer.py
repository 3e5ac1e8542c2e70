r"""The one multiple-choice scorer: one MMLU-Pro item -> the answer letter and
the log-probability of every option letter.

Used by ``pyfuse eval mc --method logprob`` (:func:`pyfuse.evals.mc.evaluate_mc`,
and through it the experiments) and by the noise floor's MC flips, so that
the answers the noise floor compares are the ones ``eval mc`` gives for the
same model and items.

The question (:func:`pyfuse.data.mmlu.format_question`) is the user turn of
the chat template (:func:`pyfuse.lm.chat.chat_text`; an optional system
prompt first), followed by the assistant's ``answer_prefix`` (default
``\boxed{``). For each valid option letter ``X`` the score is
``log P(answer_prefix + X | prompt)``, the summed log-probability of the
tokens that spell ``answer_prefix + X`` after the prompt (tokenised
together, so a tokenizer that merges ``{C`` into one token is scored on that
token, and one that splits ``{`` ``G`` on both). The prediction is the
best-scoring letter (ties: the earliest). It is the letter the model
prefers *if it answers immediately* in the boxed form, restricted to valid
letters: when the greedy output begins with ``\boxed{X`` and each letter is
one token after the shared prefix, greedy decoding gives ``X`` too; they
differ when the model reasons first, answers in another form, or would not
answer at all. It costs one prefill and no decoding. Items are scored one
at a time (a prompt's prefill is already parallel over its tokens), so
scores never depend on batch-mates or padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..data.mmlu import LETTERS, MCItem, format_question
from ..errors import UserError
from .chat import chat_text

DEFAULT_ANSWER_PREFIX = "\\boxed{"
LOGPROB_DECIMALS = 6  # scores are reported (result rows, the noise floor's items) to this many decimals

__all__ = ["DEFAULT_ANSWER_PREFIX", "MCScore", "score_item", "score_letters"]


@dataclass(frozen=True)
class MCScore:
    """The scorer's answer to one item: the predicted letter and
    ``{letter: log-probability}`` (rounded to LOGPROB_DECIMALS)."""

    prediction: str
    logprobs: dict[str, float]


def score_item(model, tokenizer, item: MCItem, *, system_prompt: str | None = None,
               answer_prefix: str = DEFAULT_ANSWER_PREFIX) -> MCScore:
    """Score one multiple-choice item (see the module doc)."""
    text, special = chat_text(tokenizer, format_question(item), system_prompt=system_prompt)

    def ids_for(letter: str) -> list[int]:
        return tokenizer.encode(text + answer_prefix + letter, add_special_tokens=special)

    scores = score_letters(model, ids_for, LETTERS[:item.num_options])
    best = max(scores, key=lambda x: (scores[x], -LETTERS.index(x)))
    return MCScore(best, {k: round(v, LOGPROB_DECIMALS) for k, v in scores.items()})


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


def score_letters(model, prompt_text_ids: Callable[[str], Sequence[int]], letters: str) -> dict[str, float]:
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
