"""Tiny, reproducible mlx-lm model directories for tests, benchmarks and the demo.

Everything is built in code (no model hub, no downloads) and is
byte-for-byte reproducible: building twice with the same arguments gives
identical files.

* :func:`build_tokenizer` trains a small byte-level BPE (HF ``tokenizers``,
  Qwen2-style pre-tokenizer, 1024 ids) on :func:`synthetic_corpus`, adds the
  Qwen3 special tokens and writes ``tokenizer.json``, ``tokenizer_config.json``
  (with a Qwen3-style chat template that understands ``enable_thinking``) and
  ``special_tokens_map.json``, which ``transformers.AutoTokenizer`` and
  ``mlx_lm.load`` read offline.
* :func:`build_tiny_model` builds the graph with mlx-lm's own classes
  (``mlx_lm.models.<arch>.Model`` from a HF-style ``config.json``), replaces
  every weight with realistic draws, quantizes it with
  ``mlx_lm.utils.quantize_model`` and writes it with
  ``mlx_lm.utils.save_model`` / ``save_config``, so the directory is what
  ``mlx_lm.convert`` would have written for a real checkpoint.
* :func:`pretrain_tiny_model` (optional, passed as ``pretrain=``) trains the
  full-precision weights briefly before they are quantized;
  :func:`quantize_tiny_model` quantizes a full-precision directory, so one
  pretrained model can be quantized several ways.

Why the choices:

* Weights are Normal(0, ``weight_std``) (embeddings Normal(0, 0.02), norms
  ones), not MLX's default uniform init: a uniform draw fills every
  quantization group edge to edge, which makes re-quantization look far more
  (or less) lossy than it is on real checkpoints.
* Each tensor's draw uses a key derived from ``(seed, parameter path)``, so a
  tensor does not change when an unrelated size (say ``num_layers``) does.
* ``float32`` is the default dtype because MLX on CPU is ~7x faster in f32
  and its CPU ``gather_mm`` (the MoE experts) needs f32.
* Sharded builds (``shards>1``) call the same ``save_model``; only its
  GB-granular ``make_shards`` is swapped for an equal-split one while it runs,
  so file names and ``model.safetensors.index.json`` are mlx-lm's own.

Quantized layout (what mlx-lm writes, and what the loaders expect): a
quantized module ``P`` holds ``P.weight`` (uint32, last dim ``in*bits/32``),
``P.scales`` and ``P.biases`` (model dtype, last dim ``in/group_size``). For
the MoE experts of ``qwen3_moe`` the three projections of all experts are
stacked: ``model.layers.L.mlp.switch_mlp.{gate,up}_proj.weight`` is
``[E, moe_inter, hidden*bits/32]`` and ``...down_proj.weight`` is
``[E, hidden, moe_inter*bits/32]`` (scales/biases ``[E, out, in/group_size]``).
``config.json`` carries ``"quantization": {"group_size", "bits", "mode",
<module path>: {per-module params}, ...}`` (copied to
``"quantization_config"``); per-module entries are the router gates
(``mlp.gate``: 8-bit, mlx-lm's own ``quant_predicate`` for MoE models) and
whatever ``quant_overrides`` names.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..errors import UserError

__all__ = [
    "ARCHS",
    "DEFAULT_QUANTIZE",
    "TOKENIZER_FILES",
    "build_tokenizer",
    "build_tiny_model",
    "chat_corpus",
    "pretrain_tiny_model",
    "quantize_tiny_model",
    "synthetic_corpus",
    "tiny_model_config",
]

ARCHS = ("qwen3_moe", "llama", "qwen3_5_moe")
DEFAULT_QUANTIZE = {"group_size": 64, "bits": 3}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_VOCAB_SIZE = 1024

# ---------------------------------------------------------------------------
# Synthetic corpus
# ---------------------------------------------------------------------------

_SUBJECTS = {
    "astronomy": [
        ("Which planet is known as the red planet?", "Mars",
         ["Venus", "Jupiter", "Saturn", "Mercury", "Neptune", "Uranus", "Pluto", "Earth", "the Moon"]),
        ("What is the closest star to the Earth?", "the Sun",
         ["Sirius", "Vega", "Polaris", "Betelgeuse", "Rigel", "Altair", "Deneb", "Antares", "Spica"]),
        ("How many planets orbit the Sun?", "8",
         ["7", "9", "10", "12", "6", "5", "11", "4", "3"]),
    ],
    "chemistry": [
        ("What is the chemical symbol for gold?", "Au",
         ["Ag", "Gd", "Go", "Fe", "Pb", "Cu", "Zn", "Sn", "Al"]),
        ("Which gas do plants absorb from the air?", "carbon dioxide",
         ["oxygen", "nitrogen", "helium", "hydrogen", "argon", "neon", "methane", "ozone", "steam"]),
        ("What is the pH of pure water at room temperature?", "7",
         ["0", "1", "3", "5", "9", "11", "13", "14", "2"]),
    ],
    "history": [
        ("In which year did the Second World War end?", "1945",
         ["1939", "1918", "1950", "1944", "1941", "1960", "1914", "1929", "1968"]),
        ("Who was the first president of the United States?", "George Washington",
         ["Thomas Jefferson", "Abraham Lincoln", "John Adams", "James Madison",
          "Benjamin Franklin", "Andrew Jackson", "James Monroe", "John Jay", "Paul Revere"]),
    ],
    "math": [
        ("What is the value of $\\frac{1}{2} + \\frac{1}{4}$?", "$\\frac{3}{4}$",
         ["$\\frac{1}{6}$", "$\\frac{2}{6}$", "$\\frac{1}{8}$", "$1$", "$\\frac{2}{3}$",
          "$\\frac{5}{4}$", "$\\frac{1}{3}$", "$\\frac{3}{8}$", "$2$"]),
        ("What is the derivative of $x^2$?", "$2x$",
         ["$x$", "$x^3$", "$2$", "$\\frac{x^3}{3}$", "$2x^2$", "$x^2$", "$0$", "$4x$", "$\\sqrt{x}$"]),
    ],
    "biology": [
        ("Which organ pumps blood through the body?", "the heart",
         ["the liver", "the lungs", "the brain", "the kidney", "the stomach", "the skin",
          "the spleen", "the bladder", "the pancreas"]),
        ("What is the basic unit of life?", "the cell",
         ["the atom", "the organ", "the tissue", "the gene", "the protein", "the molecule",
          "the virus", "the ribosome", "the membrane"]),
    ],
}

_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy",
          "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter"]
_HOBBIES = ["hiking", "painting", "cooking", "reading", "chess", "gardening", "swimming",
            "playing the guitar", "baking bread", "running", "knitting", "photography",
            "bird watching", "cycling", "fishing", "writing poems"]
_PETS = ["a dog", "two cats", "a parrot", "a rabbit", "three goldfish", "a turtle", "no pets"]
_JOBS = ["a teacher", "a nurse", "an engineer", "a baker", "a farmer", "a pilot", "a student",
         "a doctor", "a librarian", "a musician", "a chef", "a carpenter"]
_FOODS = ["pizza", "sushi", "pasta", "tacos", "salad", "soup", "curry", "pancakes", "ice cream"]
_PLACES = ["the mountains", "the beach", "a small town", "the city", "a farm", "an island",
           "the forest", "the desert"]
_LETTERS = "ABCDEFGHIJ"


def _mcq(rng: random.Random) -> tuple[str, str]:
    subject = rng.choice(sorted(_SUBJECTS))
    question, answer, wrong = rng.choice(_SUBJECTS[subject])
    n_options = rng.choice([4, 4, 5, 10])
    options = [answer] + rng.sample(wrong, n_options - 1)
    rng.shuffle(options)
    letter = _LETTERS[options.index(answer)]
    lines = [f"The following is a multiple choice question about {subject}.",
             f"Question: {question}", "Options:"]
    lines += [f"{_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    prompt = "\n".join(lines)
    return prompt, letter


def _persona(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    facts = [f"My name is {name}.", f"I work as {rng.choice(_JOBS)}.",
             f"I love {rng.choice(_HOBBIES)}.", f"I have {rng.choice(_PETS)}.",
             f"My favorite food is {rng.choice(_FOODS)}.", f"I live near {rng.choice(_PLACES)}."]
    rng.shuffle(facts)
    return " ".join(facts[: rng.randint(3, 6)])


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"Compute ${a} {op if op != '*' else chr(92) + 'times'} {b}$. The answer is \\boxed{{{value}}}."


def synthetic_corpus(n_docs: int = 600, seed: int = 0) -> list[str]:
    """English-ish documents covering what pyfuse's models see.

    Multiple-choice questions in the MMLU-Pro prompt format (``Question: ...
    Options: A. ... Answer: \\boxed{C}``, 4 to 10 options), persona chat
    turns, arithmetic with digits and LaTeX (``\\frac``, ``\\boxed{}``).
    Deterministic for a given ``(n_docs, seed)`` (``random.Random(seed)``).
    """
    rng = random.Random(seed)
    docs: list[str] = []
    for i in range(n_docs):
        kind = i % 4
        if kind == 0:
            prompt, letter = _mcq(rng)
            docs.append(f"{prompt}\nAnswer: Let's think step by step. The answer is \\boxed{{{letter}}}.")
        elif kind == 1:
            a, b = _persona(rng), _persona(rng)
            docs.append(f"Persona: {a}\nUser: Hi! {b} What do you like to do on weekends?\n"
                        f"Assistant: Hello! I enjoy {rng.choice(_HOBBIES)} and eating {rng.choice(_FOODS)}. "
                        f"Do you also like {rng.choice(_HOBBIES)}?")
        elif kind == 2:
            docs.append(" ".join(_arithmetic(rng) for _ in range(rng.randint(1, 3))))
        else:
            n = rng.randint(1, 9999)
            docs.append(f"There are {n} apples in {rng.choice(_PLACES)}. {rng.choice(_NAMES)} eats "
                        f"{n % 10} of them on day {rng.randint(1, 31)}, leaving {n - n % 10}. "
                        f"The final answer is $\\boxed{{{n - n % 10}}}$.")
    return docs


def chat_corpus(n: int = 64, seed: int = 0) -> list[dict]:
    """Chat-format records (``{"messages": [...]}``, mlx-lm's ChatDataset).

    Half are multiple-choice questions answered with ``\\boxed{X}``, half
    persona chat; some carry a system message."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        if i % 2 == 0:
            prompt, letter = _mcq(rng)
            messages += [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": f"The answer is \\boxed{{{letter}}}."}]
        else:
            messages += [{"role": "user", "content": f"{_persona(rng)} Tell me about yourself."},
                         {"role": "assistant", "content": _persona(rng)}]
        records.append({"messages": messages})
    return records


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

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


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


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
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers
    from tokenizers import AddedToken

    n_added = len(_ADDED_TOKENS)
    if vocab_size < 256 + n_added + 1:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                        f"(needs at least {256 + n_added + 1})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(corpus) if corpus is not None else synthetic_corpus()

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, min_frequency=2,
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
    tok.save(str(out / "tokenizer.json"), pretty=True)

    vocab = tok.get_vocab(with_added_tokens=True)
    added_decoder = {
        str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": s}
        for t, s in _ADDED_TOKENS
    }
    tokenizer_config = {
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
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
    })
    return out


def _token_ids(tokenizer_dir: Path) -> tuple[int, int, int]:
    """(vocab size, eos id, pad id) read back from ``tokenizer.json``."""
    with open(tokenizer_dir / "tokenizer.json", encoding="utf-8") as f:
        data = json.load(f)
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    size = max(max(data["model"]["vocab"].values()), max(ids.values())) + 1
    return size, ids["<|im_end|>"], ids["<|endoftext|>"]


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def tiny_model_config(arch: str = "qwen3_moe", *, vocab_size: int, hidden_size: int = 64,
                      num_layers: int = 4, num_experts: int = 8, experts_per_tok: int = 2,
                      moe_intermediate_size: int = 64, intermediate_size: int = 128,
                      num_heads: int = 4, num_kv_heads: int = 2, dtype: str = "float32",
                      eos_token_id: int | None = None, pad_token_id: int | None = None,
                      config_overrides: Mapping[str, Any] | None = None) -> dict:
    """A HF-style ``config.json`` dict for ``arch`` (what a real checkpoint has).

    ``head_dim = hidden_size // num_heads``; untied embeddings (an ``lm_head``
    to quantize, as in Qwen3-MoE). ``config_overrides`` is merged last (into
    ``text_config`` for ``qwen3_5_moe``)."""
    if arch not in ARCHS:
        raise UserError(f"arch={arch!r} is not supported; supported: {', '.join(ARCHS)}")
    if hidden_size % num_heads:
        raise UserError(f"hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
    head_dim = hidden_size // num_heads
    common = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }
    if eos_token_id is not None:
        common["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        common["bos_token_id"] = pad_token_id  # Qwen3 sets bos to <|endoftext|>
    overrides = dict(config_overrides or {})
    if arch == "llama":
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
               "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "attention_bias": False,
               "mlp_bias": False}
        cfg.update(overrides)
        return cfg
    moe = {
        "num_experts": num_experts,
        "num_experts_per_tok": experts_per_tok,
        "moe_intermediate_size": moe_intermediate_size,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
    }
    if arch == "qwen3_moe":
        cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **common,
               **moe, "mlp_only_layers": [], "rope_theta": 1000000.0, "attention_bias": False,
               "router_aux_loss_coef": 0.001, "output_router_logits": False}
        cfg.update(overrides)
        return cfg
    # qwen3_5_moe: hybrid Gated-DeltaNet (linear attention) + gated full
    # attention every `full_attention_interval` layers, routed experts plus a
    # gated shared expert. The HF layout nests the text model in text_config.
    text = {"model_type": "qwen3_5_moe_text", **common, **moe,
            "shared_expert_intermediate_size": moe_intermediate_size,
            "full_attention_interval": 4,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "linear_key_head_dim": head_dim, "linear_value_head_dim": head_dim,
            "linear_conv_kernel_dim": 4, "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                                "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10]}}
    text.pop("torch_dtype")
    text["dtype"] = dtype
    text.update(overrides)
    cfg = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
           "text_config": text, "tie_word_embeddings": False, "torch_dtype": dtype}
    for key in ("eos_token_id", "bos_token_id"):
        if key in common:
            cfg[key] = common[key]
    return cfg


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def _key(seed: int, path: str) -> mx.array:
    return mx.random.key(zlib.crc32(f"{seed}:{path}".encode()))


def _realistic_parameters(model: nn.Module, seed: int, weight_std: float,
                          embed_std: float = 0.02) -> None:
    """Replace the init: Normal(0, weight_std) for every matrix / expert
    stack, Normal(0, embed_std) for embeddings, ones for norm scales, zeros
    for biases. Other vectors (Gated-DeltaNet's ``A_log``/``dt_bias``) keep
    their constructor init, drawn after ``mx.random.seed(seed)``."""

    def draw(path: str, p: mx.array) -> mx.array:
        name = path.rsplit(".", 1)[-1]
        if "embed_tokens" in path and p.ndim == 2:
            return embed_std * mx.random.normal(p.shape, key=_key(seed, path))
        if name == "weight" and p.ndim >= 2:
            return weight_std * mx.random.normal(p.shape, key=_key(seed, path))
        if name == "weight" and p.ndim == 1:
            return mx.ones(p.shape)
        if name == "bias":
            return mx.zeros(p.shape)
        return p

    model.update(tree_map_with_path(draw, model.parameters()))
    mx.eval(model.parameters())


def _cast(model: nn.Module, dtype: str) -> None:
    """Cast floating parameters like ``mlx_lm.convert`` (honours the model's
    ``cast_predicate``, e.g. Gated-DeltaNet's ``A_log`` stays f32)."""
    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path, v):
        return v.astype(target) if keep(path) and mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(cast, model.parameters()))
    mx.eval(model.parameters())


def _normalize_quant(quantize: Mapping[str, Any] | None) -> dict | None:
    if quantize is None:
        return None
    q = dict(quantize)
    unknown = set(q) - {"group_size", "bits", "mode"}
    if unknown:
        raise UserError(f"unknown quantization keys {sorted(unknown)}; use group_size, bits, mode")
    q.setdefault("group_size", 64)
    q.setdefault("bits", 4)
    q.setdefault("mode", "affine")
    return q


def _quant_predicate(model: nn.Module, default: dict,
                     overrides: Mapping[str, Any] | None) -> Callable[[str, nn.Module], Any]:
    """mlx-lm's ``model.quant_predicate`` (router gates 8-bit for MoE
    models), with ``overrides`` matched on the module-path suffix (whole
    components: ``"down_proj"`` hits ``mlp.down_proj`` and
    ``switch_mlp.down_proj``; the longest matching suffix wins). A value of
    ``False``/``None`` keeps the module unquantized."""
    base = getattr(model, "quant_predicate", None)
    table = []
    for suffix, params in (overrides or {}).items():
        if params is None or params is False:
            table.append((suffix, False))
            continue
        p = dict(params)
        unknown = set(p) - {"group_size", "bits", "mode"}
        if unknown:
            raise UserError(f"quant_overrides[{suffix!r}]: unknown keys {sorted(unknown)}")
        p.setdefault("group_size", default["group_size"])
        p.setdefault("mode", default["mode"])
        if "bits" not in p:
            raise UserError(f"quant_overrides[{suffix!r}] needs 'bits'")
        table.append((suffix, {"group_size": p["group_size"], "bits": p["bits"], "mode": p["mode"]}))
    table.sort(key=lambda sp: -len(sp[0]))
    matched: set[str] = set()

    def predicate(path: str, module: nn.Module):
        for suffix, params in table:
            if path == suffix or path.endswith("." + suffix):
                matched.add(suffix)
                return dict(params) if params else False
        return base(path, module) if base is not None else True

    predicate.matched = matched  # type: ignore[attr-defined]
    predicate.suffixes = [s for s, _ in table]  # type: ignore[attr-defined]
    return predicate


def _equal_shards(n: int):
    """A stand-in for ``mlx_lm.utils.make_shards`` that splits into ``n``
    roughly equal-byte shards (tensors stay whole, in order)."""

    def make_shards(weights: dict, max_file_size_gb: int = 0) -> list:
        total = sum(v.nbytes for v in weights.values())
        k = max(1, min(n, len(weights)))
        shards: list[dict] = [{} for _ in range(k)]
        done = 0
        for name, v in weights.items():
            i = min(k - 1, (done * k) // max(total, 1))
            shards[i][name] = v
            done += v.nbytes
        return [s for s in shards if s]

    return make_shards


def _save(out: Path, model: nn.Module, config: dict, tokenizer_dir: Path, shards: int) -> None:
    import mlx_lm.utils as mu

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model*.safetensors"):
        stale.unlink()
    if shards > 1:
        original = mu.make_shards
        mu.make_shards = _equal_shards(shards)
        try:
            mu.save_model(out, model, donate_model=False)
        finally:
            mu.make_shards = original
    else:
        mu.save_model(out, model, donate_model=False)
    mu.save_config(copy.deepcopy(config), config_path=out / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).resolve() != (out / name).resolve():
            shutil.copyfile(tokenizer_dir / name, out / name)


def _quantize(model: nn.Module, config: dict, quantize: dict | None,
              quant_overrides: Mapping[str, Any] | None) -> dict:
    from mlx_lm.utils import quantize_model

    if quantize is None:
        if quant_overrides:
            raise UserError("quant_overrides needs quantize (the default quantization)")
        return config
    predicate = _quant_predicate(model, quantize, quant_overrides)
    with contextlib.redirect_stdout(io.StringIO()):  # "[INFO] Quantized model with ..."
        model, config = quantize_model(model, config, quantize["group_size"], quantize["bits"],
                                       mode=quantize["mode"], quant_predicate=predicate)
    unmatched = [s for s in predicate.suffixes if s not in predicate.matched]
    if unmatched:
        raise UserError(f"quant_overrides {unmatched} match no quantizable module")
    mx.eval(model.parameters())
    return config


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------

PretrainFn = Callable[[nn.Module, Any], Any]


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    arch: str = "qwen3_moe",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_experts: int = 8,
    experts_per_tok: int = 2,
    moe_intermediate_size: int = 64,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    quantize: Mapping[str, Any] | None = DEFAULT_QUANTIZE,
    quant_overrides: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    weight_std: float = 0.02,
    shards: int = 1,
    tokenizer_dir: str | os.PathLike | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    config_overrides: Mapping[str, Any] | None = None,
    pretrain: PretrainFn | None = None,
) -> Path:
    """Build a tiny mlx-lm model directory at ``out_dir`` and return its path.

    Steps: tokenizer (copied from ``tokenizer_dir``, else trained into
    ``out_dir``) -> ``config.json`` (:func:`tiny_model_config`) -> graph from
    mlx-lm's ``Model``/``ModelArgs`` (via ``mlx_lm.utils._get_classes``, as
    ``mlx_lm.load`` does) -> realistic weights (``seed``, ``weight_std``) ->
    optional ``pretrain(model, tokenizer)`` on the full-precision weights
    (see :func:`pretrain_tiny_model`) -> cast to ``dtype`` -> quantize with
    ``mlx_lm.utils.quantize_model`` (``quantize`` = ``{"group_size",
    "bits"[, "mode"]}`` or None for a full-precision model;
    ``quant_overrides`` = ``{module-path suffix: {"bits"[, "group_size",
    "mode"]}}`` or ``{suffix: False}`` to keep it unquantized) -> save with
    ``mlx_lm.utils.save_model`` and ``save_config`` in ``shards`` files.

    ``vocab_size`` defaults to the tokenizer's (1024); a larger value pads the
    embedding like real checkpoints do; a smaller one is an error.
    Existing ``model*.safetensors`` in ``out_dir`` are replaced. Seeds MLX's
    global RNG with ``seed`` (constructor-initialised vectors such as
    Gated-DeltaNet's ``A_log`` come from it).
    """
    from mlx_lm.utils import _get_classes

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={dtype!r} is not supported; supported: float32, bfloat16, float16")
    if shards < 1:
        raise UserError(f"shards={shards} must be at least 1")
    quantize = _normalize_quant(quantize)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tok_dir = build_tokenizer(out)
    else:
        tok_dir = Path(tokenizer_dir)
        missing = [n for n in TOKENIZER_FILES if not (tok_dir / n).is_file()]
        if missing:
            raise UserError(f"tokenizer_dir {tok_dir} lacks {', '.join(missing)}")
    tok_vocab, eos_id, pad_id = _token_ids(tok_dir)
    if vocab_size is None:
        vocab_size = tok_vocab
    elif vocab_size < tok_vocab:
        raise UserError(f"vocab_size={vocab_size} is smaller than the tokenizer's {tok_vocab}")

    config = tiny_model_config(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_experts=num_experts, experts_per_tok=experts_per_tok,
        moe_intermediate_size=moe_intermediate_size, intermediate_size=intermediate_size,
        num_heads=num_heads, num_kv_heads=num_kv_heads, dtype=dtype, eos_token_id=eos_id,
        pad_token_id=pad_id, config_overrides=config_overrides)

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    # ModelArgs may rewrite nested dicts in place (qwen3_5's rope_parameters):
    # build from a copy so config.json keeps the HF spelling.
    model = model_class(args_class.from_dict(copy.deepcopy(config)))
    _realistic_parameters(model, seed, weight_std)

    if pretrain is not None:
        from mlx_lm.tokenizer_utils import load as load_tokenizer

        pretrain(model, load_tokenizer(tok_dir, eos_token_ids=eos_id))
        mx.eval(model.parameters())

    _cast(model, dtype)
    model.eval()
    config = _quantize(model, config, quantize, quant_overrides)
    _save(out, model, config, tok_dir, shards)
    return out


def quantize_tiny_model(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        quantize: Mapping[str, Any] = DEFAULT_QUANTIZE,
                        quant_overrides: Mapping[str, Any] | None = None,
                        dtype: str | None = None, shards: int = 1) -> Path:
    """Quantize a full-precision tiny model directory (``quantize=None``
    build, maybe pretrained) into ``out_dir`` with the same mlx-lm machinery
    as :func:`build_tiny_model` - so one pretrained model can be quantized
    several ways."""
    from mlx_lm.utils import load_model

    src = Path(src_dir)
    model, config = load_model(src)
    if "quantization" in config:
        raise UserError(f"{src} is already quantized")
    if dtype is not None:
        _cast(model, dtype)
        if "text_config" in config:
            config["text_config"]["dtype"] = dtype
        config["torch_dtype"] = dtype
    config = _quantize(model, config, _normalize_quant(quantize), quant_overrides)
    _save(Path(out_dir), model, config, src, shards)
    return Path(out_dir)


# ---------------------------------------------------------------------------
# Optional pretraining
# ---------------------------------------------------------------------------


def _token_stream(tokenizer, texts: Iterable[str]) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t, add_special_tokens=False))
        ids.append(eos)
    return ids


def pretrain_tiny_model(model: nn.Module, tokenizer, texts: Sequence[str] | None = None, *,
                        iters: int = 100, lr: float = 3e-3, seed: int = 0, batch_size: int = 8,
                        seq_len: int = 64) -> list[float]:
    """Briefly train a full-precision model (next-token cross-entropy, AdamW)
    on ``texts`` (default :func:`synthetic_corpus`); returns the losses.

    Meant as ``build_tiny_model(..., pretrain=partial(pretrain_tiny_model,
    iters=..., lr=...))`` so that the quantized model has learned something
    (structured weights) before quantization. Deterministic for a given
    ``seed`` (windows drawn with numpy, AdamW has no randomness). Cost on
    this project's shared 2-core CPU: ~0.35 s/iter (llama, defaults), ~0.4
    (qwen3_moe), ~0.7 (qwen3_5_moe); 100 iters at lr 3e-3 take the synthetic
    corpus loss from 6.93 (uniform) to ~3.6 / 3.9 / 0.9."""
    import numpy as np
    import mlx.optimizers as optim

    ids = np.asarray(_token_stream(tokenizer, texts if texts is not None else synthetic_corpus()),
                     dtype=np.int32)
    if len(ids) <= seq_len + 1:
        raise UserError(f"pretraining corpus has {len(ids)} tokens, needs more than {seq_len + 1}")
    rng = np.random.default_rng(seed)
    opt = optim.AdamW(learning_rate=optim.cosine_decay(lr, max(iters, 1)), weight_decay=0.0)

    def loss_fn(m, x, y):
        logits = m(x).astype(mx.float32)
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    model.train()
    losses = []
    for _ in range(iters):
        starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
        batch = np.stack([ids[s:s + seq_len + 1] for s in starts])
        x, y = mx.array(batch[:, :-1]), mx.array(batch[:, 1:])
        loss, grads = step(model, x, y)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(loss.item())
    model.eval()
    return losses
