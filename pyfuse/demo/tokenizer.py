"""The tiny models' tokenizer: a byte-level BPE trained in code, written
the way Qwen3 ships its tokenizer (special tokens, chat template), so that
``transformers.AutoTokenizer`` and ``mlx_lm.load`` read it offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..io.files import write_json
from .corpus import synthetic_corpus

__all__ = ["CHAT_TEMPLATE", "DEFAULT_VOCAB_SIZE", "TOKENIZER_FILES", "build_tokenizer", "token_ids"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_VOCAB_SIZE = 1024

# Qwen2/Qwen3 pre-tokenizer split: contractions, letter runs, single digits,
# punctuation runs, newlines, whitespace.
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# (content, special) in id order after the BPE vocabulary, as in Qwen3.
_ADDED_TOKENS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                 ("<tool_call>", False), ("</tool_call>", False),
                 ("<tool_response>", False), ("</tool_response>", False),
                 ("<think>", False), ("</think>", False)]

# Qwen3's chat template (tools, reasoning_content, enable_thinking).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def _train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on ``texts``,
    plus the Qwen3 added tokens (which take the last ids)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(_ADDED_TOKENS), min_frequency=2,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    # The BPE trainer counts pairs in parallel; one thread keeps ties (and so
    # the merges) in a fixed order.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    tok.add_tokens([AddedToken(t, special=s, normalized=False, single_word=False,
                               lstrip=False, rstrip=False) for t, s in _ADDED_TOKENS])
    return tok


def _tokenizer_config(vocab: dict[str, int]) -> dict:
    """``tokenizer_config.json`` as Qwen3 ships it (``vocab``: token -> id)."""
    added_decoder = {
        str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": s}
        for t, s in _ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def build_tokenizer(out_dir: str | os.PathLike, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    corpus: Sequence[str] | None = None) -> Path:
    """Train a byte-level BPE tokenizer and write it, Qwen3-style, to ``out_dir``.

    ``vocab_size`` counts everything: the 256 byte symbols, the BPE merges and
    the 9 Qwen3 added tokens (``<|endoftext|>`` = pad, ``<|im_start|>``,
    ``<|im_end|>`` = eos, ``<think>``/``</think>``, tool-call tags), which
    take the last ids as in Qwen3. The pre-tokenizer is Qwen2's regex split
    (digits one by one) followed by ByteLevel, so any text round-trips.
    Files: ``tokenizer.json``, ``tokenizer_config.json`` (chat template
    inline, ``tokenizer_class`` ``PreTrainedTokenizerFast``) and
    ``special_tokens_map.json``. Deterministic: training runs on one thread.
    """
    n_added = len(_ADDED_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                        f"(needs at least {256 + n_added + 1})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(list(corpus) if corpus is not None else synthetic_corpus(), vocab_size)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    write_json(out / "tokenizer_config.json", _tokenizer_config(tok.get_vocab(with_added_tokens=True)))
    write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
    })
    return out


def token_ids(tokenizer_dir: Path) -> tuple[int, int, int]:
    """(vocab size, eos id, pad id) read back from ``tokenizer.json``."""
    with open(tokenizer_dir / "tokenizer.json", encoding="utf-8") as f:
        data = json.load(f)
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    size = max(max(data["model"]["vocab"].values()), max(ids.values())) + 1
    return size, ids["<|im_end|>"], ids["<|endoftext|>"]
