"""Tiny, reproducible mlx-lm model directories for tests, benchmarks and the demo.

Everything is built in code (no model hub, no downloads) and is
byte-for-byte reproducible: building twice with the same arguments gives
identical files.

* :func:`build_tokenizer` (:mod:`.tokenizer`) trains a small byte-level
  BPE (HF ``tokenizers``, Qwen2-style pre-tokenizer, 1024 ids) on
  :func:`synthetic_corpus` (:mod:`.corpus`), adds the Qwen3 special tokens
  and writes ``tokenizer.json``, ``tokenizer_config.json``
  (with a Qwen3-style chat template that understands ``enable_thinking``) and
  ``special_tokens_map.json``, which ``transformers.AutoTokenizer`` and
  ``mlx_lm.load`` read offline.
* :func:`build_tiny_model` builds the graph with mlx-lm's own classes
  (``mlx_lm.models.<arch>.Model`` from a HF-style ``config.json``), replaces
  every weight with realistic draws, quantizes it with
  ``mlx_lm.utils.quantize_model`` and writes it with
  ``mlx_lm.utils.save_model`` / ``save_config``, so the directory is what
  ``mlx_lm.convert`` would have written for a real checkpoint.
* :func:`pretrain_tiny_model` (:mod:`.pretrain`; optional, passed as
  ``pretrain=``) trains the full-precision weights briefly before they are
  quantized;
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
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from ..errors import UserError
# The tokenizer, corpus and pre-training live in their own modules; their
# public names are importable from here too (the tests' and bench's one
# entry point for tiny models).
from .corpus import chat_corpus, synthetic_corpus
from .pretrain import pretrain_tiny_model
from .tokenizer import TOKENIZER_FILES, build_tokenizer, token_ids

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


def _tokenizer(out: Path, tokenizer_dir, vocab_size: int | None) -> tuple[Path, int, int, int]:
    """``(tokenizer directory, vocab size, eos id, pad id)``: the tokenizer
    of ``tokenizer_dir``, else one trained into ``out``."""
    if tokenizer_dir is None:
        tok_dir = build_tokenizer(out)
    else:
        tok_dir = Path(tokenizer_dir)
        missing = [n for n in TOKENIZER_FILES if not (tok_dir / n).is_file()]
        if missing:
            raise UserError(f"tokenizer_dir {tok_dir} lacks {', '.join(missing)}")
    tok_vocab, eos_id, pad_id = token_ids(tok_dir)
    if vocab_size is None:
        vocab_size = tok_vocab
    elif vocab_size < tok_vocab:
        raise UserError(f"vocab_size={vocab_size} is smaller than the tokenizer's {tok_vocab}")
    return tok_dir, vocab_size, eos_id, pad_id


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
    tok_dir, vocab_size, eos_id, pad_id = _tokenizer(out, tokenizer_dir, vocab_size)
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
