"""``pyfuse.noise_floor.measure``: what a fuse does to a quantized model when the
adapter contributes nothing, and how much of a real adapter survives.

For every requested (group size, bits) and policy, this module

1. builds the **baseline**: the quantized model at that setting.

   * ``source = "quantized"``: a full-precision model, quantized here with
     mlx-lm's own ``quantize_model`` (the model's ``quant_predicate``, e.g.
     8-bit MoE router gates, and mlx-lm's rule that a tensor whose input
     dimension is not a multiple of the group size stays in full precision:
     such tensors are listed under ``skipped``);
   * ``source = "model"``: a quantized model at its own settings (its stored
     tensors, per-module overrides included);
   * ``source = "requantized"``: a quantized model at another setting: its
     weights are dequantized and quantized again at that setting (as above).

2. fuses a **zero delta** into every affine-quantized tensor through the
   native kernel (:func:`pyfuse.fuse_requant`, one call per tensor, all
   experts of a SwitchLinear at once), ``rounds`` times in a row (what
   stacking ``rounds`` adapters does; round ``r`` of ``stochastic`` uses seed
   ``seed + r - 1``), and compares each round with the baseline
   (:func:`pyfuse.kernel.fidelity.tensor_fidelity`):

   * ``weights_changed``: share of weights whose dequantized value changed;
   * ``codes_changed``: share of weights whose integer code changed;
   * ``rel_error`` = ||change|| / ||W|| over all measured tensors;
   * ``max_abs`` = the largest |change|;
   * ``drift``: these four after round 1, 2, ..., ``rounds``.

   **The scalar fields of a row describe the model after all ``rounds``
   fuses** (round ``rounds``; with the default ``rounds=1``, one fuse);
   ``drift`` holds every round.

3. with an adapter: fuses the adapter's real delta once into the baseline
   (same kernel and policy) and reports ``retention`` = <change, delta> /
   ||delta||^2 and ``noise`` = ||change - retention * delta|| / ||delta||
   over all adapted tensors; both are null (undefined) for a zero adapter.
   At settings other than the model's own, the adapter is fused into the
   baseline of that setting (labelled by ``source``).

4. on a prompt set (a built-in dozen, or ``prompts``), runs the baseline and
   the zero-delta-fused model (after ``rounds`` fuses) teacher-forced and
   reports the mean and 99th percentile over token positions of
   KL(baseline || fused) of the next-token distributions, and the share of
   positions whose top-1 token differs (``top1_flip``); with ``mc``
   (MMLU-Pro rows) the share of items whose answer letter flips
   (``mc_flip``): the letter with the highest next-token logit after the
   chat-formatted question and ``The answer is \\boxed{``. When every
   fused tensor is bit-identical to its baseline the outputs are identical
   by construction: the forward pass is skipped, the figures are 0 and the
   row says ``outputs_identical: true``.

Absent figures are ``None`` (JSON null). The output directory gets
``noise_floor.json`` (``{"rows": [...], "meta": {...}}``),
``noise_floor.md``, ``noise_floor_tensors.jsonl`` (per-tensor figures) and
PNG plots (:mod:`pyfuse.noise_floor.plots`), all written atomically.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import mlx.core as mx
import numpy as np

from .. import progress
from ..errors import UserError
from ..io.names import natural_key
from ..kernel.fidelity import retention_and_noise, tensor_fidelity
from ..kernel.ops import fuse_requant, native_available
from ..options import POLICIES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

__all__ = ["DEFAULT_PROMPTS", "NoiseFloorResult", "measure_noise_floor", "format_markdown", "write_outputs",
           "ROW_FIELDS"]

# The fields of every row of noise_floor.json, in order (more may follow).
ROW_FIELDS = ("group_size", "bits", "policy", "source", "weights_changed", "codes_changed",
              "rel_error", "max_abs", "rounds", "drift", "retention", "noise", "kl_mean", "kl_p99",
              "top1_flip", "mc_flip")

# Teacher-forced prompts are cut to this many tokens.
MAX_PROMPT_TOKENS = 512
# Logit elements per forward batch (batch x length x vocab), ~256 MB of float32.
LOGIT_BUDGET = 1 << 26
_CHUNK_ELEMENTS = 1 << 22

DEFAULT_PROMPTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Once upon a time, in a small village near the mountains, there lived an old baker.",
    "To compute the area of a circle, multiply pi by the square of the radius.",
    "Question: Which planet is known as the red planet?\nAnswer: Mars.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "The mitochondria is the part of the cell that produces most of its energy.",
    "Dear Sir or Madam, I am writing to inform you that your order has been shipped.",
    "In 1945 the Second World War ended, and the United Nations was founded.",
    "My name is Alice. I work as a teacher and I love hiking and painting.",
    "Compute $12 \\times 7$. The answer is \\boxed{84}.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
)


# -- the result ---------------------------------------------------------------------------


@dataclass
class NoiseFloorResult:
    """What :func:`measure_noise_floor` measured (rows as plain dicts)."""

    rows: list[dict]
    meta: dict
    tensors: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "meta": self.meta}

    def row(self, group_size: int, bits: int, policy: str, source: str | None = None) -> dict:
        """The row of one setting (``source`` needed only when ambiguous)."""
        found = [r for r in self.rows if (r["group_size"], r["bits"], r["policy"]) == (group_size, bits, policy)
                 and (source is None or r["source"] == source)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} rows for group size {group_size}, {bits} bits, {policy}"
                           + (f", source {source}" if source else ""))
        return found[0]

    def markdown(self) -> str:
        return format_markdown(self)


# -- argument checks ----------------------------------------------------------------------


def _int_list(values, name: str, supported: Sequence[int]) -> list[int]:
    if isinstance(values, (int, str)):
        values = [values]
    out: list[int] = []
    for v in values:
        try:
            iv = int(v)
            if isinstance(v, bool) or (isinstance(v, float) and v != iv):
                raise ValueError
        except (TypeError, ValueError):
            raise UserError(f"{name}: {v!r} is not an integer") from None
        if iv not in supported:
            raise UserError(f"{name}: {iv} is not supported; supported: {', '.join(map(str, supported))}")
        if iv not in out:
            out.append(iv)
    if not out:
        raise UserError(f"{name}: give at least one value ({', '.join(map(str, supported))})")
    return out


def _policy_list(values) -> list[str]:
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for p in values:
        if p not in POLICIES:
            raise UserError(f"policies: {p!r} is not a policy; supported: {', '.join(POLICIES)}")
        if p not in out:
            out.append(p)
    if not out:
        raise UserError(f"policies: give at least one ({', '.join(POLICIES)})")
    return out


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    if not path.is_dir():
        raise UserError(f"model path {path} is not a directory")
    cfg = path / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{cfg}: no config.json (is this an mlx-lm model directory?)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{cfg}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{cfg}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{cfg}: not a JSON object")
    if not any(path.glob("model*.safetensors")):
        raise UserError(f"{path}: no model*.safetensors weights (is this an mlx-lm model directory?)")
    return data


def _model_quantization(config: dict) -> dict | None:
    q = config.get("quantization")
    if q is None:
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and "bits" in qc:
            q = qc
        elif isinstance(qc, dict):
            raise UserError(f"the model's quantization_config (quant_method "
                            f"{qc.get('quant_method')!r}) is not an mlx-lm affine quantization; "
                            "convert the model with mlx_lm convert first")
    if q is None:
        return None
    if not isinstance(q, dict) or "bits" not in q or "group_size" not in q:
        raise UserError("config.json: quantization must name bits and group_size")
    return q


# -- prompts and multiple choice ------------------------------------------------------------


def _read_prompts(prompts) -> tuple[list[dict], str]:
    """Prompt records ``{"text"}`` / ``{"messages"}`` and a description."""
    from ..io.files import iter_jsonl

    if prompts is None:
        return [{"text": t} for t in DEFAULT_PROMPTS], f"built-in ({len(DEFAULT_PROMPTS)} prompts)"
    if isinstance(prompts, (str, os.PathLike)):
        path = Path(prompts)
        records = []
        for where, row in iter_jsonl(path):
            records.append(_check_prompt(row, f"{path}: {where}"))
        if not records:
            raise UserError(f"{path}: no prompts")
        return records, str(path)
    records = [_check_prompt({"text": p} if isinstance(p, str) else p, f"prompts[{i}]")
               for i, p in enumerate(prompts)]
    if not records:
        raise UserError("prompts: the list is empty")
    return records, f"{len(records)} given prompts"


def _check_prompt(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with 'text' or 'messages'")
    if "text" in row:
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise UserError(f"{where}: 'text' must be a non-empty string")
        return {"text": row["text"]}
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        return {"messages": msgs}
    raise UserError(f"{where}: expected 'text' or 'messages'")


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             enable_thinking=False)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


def _encode_prompts(tokenizer, records: list[dict]) -> list[list[int]]:
    seqs = []
    for i, rec in enumerate(records):
        if "text" in rec:
            ids = tokenizer.encode(rec["text"])
        else:
            ids = tokenizer.encode(_chat(tokenizer, rec["messages"], False), add_special_tokens=False)
        ids = list(ids)[:MAX_PROMPT_TOKENS]
        if not ids:
            raise UserError(f"prompt {i + 1} encodes to no tokens")
        seqs.append(ids)
    return seqs


def _encode_mc(tokenizer, items) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each item's prompt (ending in ``\\boxed{``) and of its
    option letters."""
    from ..data.mmlu import LETTERS, format_question

    letter_ids = []
    for letter in LETTERS:
        ids = tokenizer.encode(letter, add_special_tokens=False)
        letter_ids.append(ids[0] if ids else None)
    seqs, options = [], []
    for item in items:
        text = _chat(tokenizer, [{"role": "user", "content": format_question(item)}], True)
        ids = tokenizer.encode(text + "The answer is \\boxed{", add_special_tokens=False)
        seqs.append(list(ids)[-MAX_PROMPT_TOKENS:])
        opts = letter_ids[:item.num_options]
        if any(o is None for o in opts):
            raise UserError("the tokenizer encodes an option letter to no token")
        options.append(opts)
    return seqs, options


# -- forward passes -------------------------------------------------------------------------


def _batches(seqs: list[list[int]], vocab: int) -> list[list[int]]:
    """Indices of ``seqs`` grouped by length so that each batch's logits
    stay within LOGIT_BUDGET elements."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out, cur, cur_max = [], [], 0
    for i in order:
        n = len(seqs[i])
        if cur and (len(cur) + 1) * max(cur_max, n) * vocab > LOGIT_BUDGET:
            out.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        out.append(cur)
    return out


def _logprobs(model, seqs: list[list[int]], batch: list[int]) -> tuple[mx.array, list[int]]:
    """Log-softmax of the next-token logits, ``[len(batch), L, vocab]`` float32,
    right-padded (causal models: padding after a sequence does not change it)."""
    lengths = [len(seqs[i]) for i in batch]
    L = max(lengths)
    ids = np.zeros((len(batch), L), dtype=np.int32)
    for j, i in enumerate(batch):
        ids[j, :lengths[j]] = seqs[i]
    logits = model(mx.array(ids)).astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.eval(lp)
    return lp, lengths


class _OutputProbe:
    """Teacher-forced baseline outputs of one setting, to compare fused models with."""

    def __init__(self, prompt_seqs, mc_seqs, mc_options, vocab):
        self.prompt_seqs, self.mc_seqs, self.mc_options = prompt_seqs, mc_seqs, mc_options
        self.vocab = vocab
        self.prompt_batches = _batches(prompt_seqs, vocab)
        self.mc_batches = _batches(mc_seqs, vocab) if mc_seqs else []
        self.base_lp: list[mx.array] = []
        self.base_choice: dict[int, int] = {}

    def _mc_choices(self, model) -> dict[int, int]:
        choice = {}
        for batch in self.mc_batches:
            lp, lengths = _logprobs(model, self.mc_seqs, batch)
            last = lp[mx.arange(len(batch)), mx.array([n - 1 for n in lengths])]
            last = np.asarray(last)
            for j, i in enumerate(batch):
                opts = self.mc_options[i]
                choice[i] = int(np.argmax(last[j, opts]))
        return choice

    def record_baseline(self, model) -> None:
        self.base_lp = [_logprobs(model, self.prompt_seqs, b) for b in self.prompt_batches]
        self.base_choice = self._mc_choices(model)

    def compare(self, model) -> dict:
        kls, flips = [], []
        for batch, (lp_b, lengths) in zip(self.prompt_batches, self.base_lp):
            lp_f, _ = _logprobs(model, self.prompt_seqs, batch)
            kl = (mx.exp(lp_b) * (lp_b - lp_f)).sum(axis=-1)
            flip = mx.argmax(lp_b, axis=-1) != mx.argmax(lp_f, axis=-1)
            kl, flip = np.asarray(kl), np.asarray(flip)
            for j, n in enumerate(lengths):
                kls.append(kl[j, :n])
                flips.append(flip[j, :n])
        kl = np.maximum(np.concatenate(kls).astype(np.float64), 0.0)  # float32 noise below 0
        flip = np.concatenate(flips)
        out = {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
               "top1_flip": float(flip.mean()), "mc_flip": None}
        if self.mc_batches:
            choice = self._mc_choices(model)
            out["mc_flip"] = float(np.mean([choice[i] != self.base_choice[i] for i in choice]))
        return out

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.prompt_seqs)


# -- baselines --------------------------------------------------------------------------------


@dataclass
class _Setting:
    source: str  # "quantized" | "model" | "requantized"
    group_size: int
    bits: int

    @property
    def label(self) -> str:
        return f"{self.bits}-bit g{self.group_size} ({self.source})"


@dataclass
class _QModule:
    path: str
    module: Any
    group_size: int
    bits: int
    base: tuple  # (w, scales, biases)

    @property
    def in_dims(self) -> int:
        return self.base[0].shape[-1] * 32 // self.bits

    @property
    def weights(self) -> int:
        return math.prod(self.base[0].shape[:-1]) * self.in_dims


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())  # mlx-lm's "[INFO] Quantized model ..."


def _load_baseline(path: Path, setting: _Setting):
    """The mlx-lm model graph holding the baseline of ``setting`` and the
    list of (module path, reason) of weight-bearing layers left unquantized."""
    import mlx.nn as nn
    from mlx_lm.utils import dequantize_model, load_model, quantize_model

    try:
        model, config = load_model(path, lazy=True)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise UserError(f"{path}: mlx-lm cannot load this model ({err})") from None
    if setting.source != "model":
        if setting.source == "requantized":
            model = dequantize_model(model)
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
        with _quiet():
            model, _ = quantize_model(model, config, setting.group_size, setting.bits)
    skipped = []
    for name, m in model.named_modules():
        if hasattr(m, "scales"):
            mode = getattr(m, "mode", "affine")
            if mode != "affine" or getattr(m, "biases", None) is None:
                skipped.append((name, f"mode {mode} (pyfuse re-quantizes affine tensors only)"))
            elif m.group_size not in SUPPORTED_GROUP_SIZES or m.bits not in SUPPORTED_BITS:
                skipped.append((name, f"{m.bits}-bit g{m.group_size} is not supported by the kernel"))
        elif isinstance(m, (nn.Linear, nn.Embedding)) or hasattr(m, "to_quantized"):
            if "weight" not in m or m.weight.ndim < 2:
                continue
            if setting.source == "model":
                why = "not quantized in the model"
            elif m.weight.shape[-1] % setting.group_size:
                why = f"input dimension {m.weight.shape[-1]} is not a multiple of {setting.group_size}"
            else:
                why = "kept in full precision by the model's quant predicate"
            skipped.append((name, why))
    return model, sorted(skipped, key=lambda x: natural_key(x[0]))


def _quantized_modules(model) -> list[_QModule]:
    mods = []
    for name, m in model.named_modules():
        if (hasattr(m, "scales") and getattr(m, "mode", "affine") == "affine"
                and getattr(m, "biases", None) is not None
                and m.group_size in SUPPORTED_GROUP_SIZES and m.bits in SUPPORTED_BITS):
            base = (m.weight, m.scales, m.biases)
            mx.eval(*base)  # one module at a time: no burst of float intermediates
            mods.append(_QModule(name, m, m.group_size, m.bits, base))
    return sorted(mods, key=lambda q: natural_key(q.path))


# -- per-tensor figures --------------------------------------------------------------------------
#
# pyfuse.kernel.fidelity.tensor_fidelity computes every figure (natively, in one
# float64-exact pass, when the extension is loaded). Two additions here: a
# tensor bit-identical to its baseline is recognised from the packed arrays
# (much cheaper than a full pass), and ||W||^2, needed to aggregate
# rel_error over tensors, is recovered from ||change|| / rel_error or, for a
# tensor no fuse changed, computed once.


def _identical(old, new) -> bool:
    return all(x.shape == y.shape and x.dtype == y.dtype and mx.array_equal(x, y).item()
               for x, y in zip(old, new))


def _zero_fidelity(w, group_size: int, bits: int):
    from ..kernel.fidelity import Fidelity

    in_dims = w.shape[-1] * 32 // bits
    groups = math.prod(w.shape[:-1]) * (in_dims // group_size)
    return Fidelity(delta_norm=0.0, change_norm=0.0, retention=None, noise=None, weights_changed=0.0,
                    codes_changed=0.0, groups_refit=0, groups=groups, rel_error=0.0, max_abs=0.0)


def _weight_sq_norm(base, group_size: int, bits: int) -> float:
    """||W||^2 of the dequantized weight (float32 values, float64 total)."""
    from ..kernel.fidelity import dequantize_exact

    w, s, b = base
    rows = math.prod(w.shape[:-1])
    in_dims = w.shape[-1] * 32 // bits
    w, s, b = (x.reshape(rows, x.shape[-1]) for x in (w, s, b))
    step = max(1, _CHUNK_ELEMENTS // in_dims)
    total = 0.0
    for i in range(0, rows, step):
        x = dequantize_exact(w[i:i + step], s[i:i + step], b[i:i + step], group_size, bits)
        total += float(np.asarray((x * x).sum(axis=-1), dtype=np.float64).sum())
    return total


def _zero_factors(base, in_dims: int):
    lead = base[0].shape[:-2]
    out = base[0].shape[-2]
    return mx.zeros((*lead, 1, in_dims), mx.float32), mx.zeros((*lead, out, 1), mx.float32)


# -- aggregation ------------------------------------------------------------------------------


class _Sums:
    """Weight-level sums of one round over the tensors of a row."""

    def __init__(self):
        self.n = self.wchg = self.cchg = self.refit = self.groups = 0
        self.cc = self.max_abs = 0.0
        self.modules: list[str] = []

    def add(self, path: str, fid, n: int) -> None:
        self.modules.append(path)
        self.n += n
        self.wchg += round(fid.weights_changed * n)
        self.cchg += round(fid.codes_changed * n)
        self.refit += fid.groups_refit
        self.groups += fid.groups
        self.cc += fid.change_norm ** 2
        self.max_abs = max(self.max_abs, fid.max_abs)

    def figures(self, sq_norm) -> dict:
        """``sq_norm(path)`` gives ||W||^2 of a module (asked only when something changed)."""
        rel = 0.0
        if self.cc > 0:
            rel = math.sqrt(self.cc) / math.sqrt(sum(sq_norm(p) for p in self.modules))
        return {"weights_changed": self.wchg / self.n if self.n else None,
                "codes_changed": self.cchg / self.n if self.n else None,
                "rel_error": rel, "max_abs": self.max_abs, "groups_refit": self.refit}


class _AdapterSums:
    """<c, d>, ||d||^2 and ||c||^2 summed over the adapted tensors, so that
    retention and noise are those of the whole adapter (one retention for
    all tensors: noise = ||c - R d|| / ||d|| with the global R, not the sum
    of per-tensor residuals)."""

    def __init__(self):
        self.dd = self.cd = self.cc = 0.0
        self.modules = 0

    def add(self, fid) -> None:
        dd = fid.delta_norm ** 2
        self.dd += dd
        self.cc += fid.change_norm ** 2
        self.modules += 1
        if fid.retention is not None:
            self.cd += fid.retention * dd

    def figures(self) -> dict:
        retention, noise = retention_and_noise(self.dd, self.cd, self.cc)
        return {"retention": retention, "noise": noise}


# -- the adapter ------------------------------------------------------------------------------


def _read_adapter(adapter_path):
    from ..io.adapter_dir import read_adapter

    adapter = read_adapter(adapter_path)
    if adapter.is_dora:
        raise UserError(f"{adapter_path}: DoRA adapters are not supported by noise-floor "
                        "(retention is defined on the LoRA delta); use pyfuse fuse --report")
    if not any(m.has_delta for m in adapter.modules.values()):
        raise UserError(f"{adapter_path}: the adapter has no module with both lora_a and lora_b")
    return adapter


def _adapter_factors(adapter, qmods: dict[str, _QModule], all_modules: set[str]):
    """``{module path: (a, b)}`` in the kernel layout for the adapter modules
    that are quantized at this setting, and the adapted modules that are not."""
    from ..fuse.mapping import kernel_factors, match_module

    found, unquantized = {}, []
    for path, mod in adapter.modules.items():
        if not mod.has_delta:
            continue
        if path not in all_modules:
            raise UserError(f"adapter does not fit the model: it has weights for {path}, "
                            "which the model does not have")
        q = qmods.get(path)
        if q is None:
            unquantized.append(path)
            continue
        match = match_module(mod, q.base[0])  # only the stored rows/experts are used
        if match.in_dims != q.in_dims:
            raise UserError(f"adapter does not fit the model: {path} takes {match.in_dims} inputs, "
                            f"the model's layer {q.in_dims}")
        found[path] = kernel_factors(mod, match.kind)
    return found, unquantized


# -- the measurement ----------------------------------------------------------------------------


def measure_noise_floor(
    model: str | os.PathLike,
    *,
    group_sizes: Iterable[int] = (32, 64, 128),
    bits: Iterable[int] = (2, 3, 4, 5, 6, 8),
    policies: Iterable[str] = ("stock", "preserve", "stochastic"),
    rounds: int = 1,
    adapter_path: str | os.PathLike | None = None,
    prompts: str | os.PathLike | Sequence[str | dict] | None = None,
    mc: str | os.PathLike | None = None,
    mc_limit: int | None = None,
    outputs: bool = True,
    out: str | os.PathLike | None = None,
    seed: int = 0,
) -> NoiseFloorResult:
    """Measure the re-quantization noise floor of ``model`` (see the module doc).

    Args:
        model: an mlx-lm model directory, full precision or quantized.
        group_sizes, bits: the settings to measure (32/64/128; 2/3/4/5/6/8).
            A quantized model is always measured at its own settings too.
        policies: re-quantization policies (``stock``, ``preserve``, ``stochastic``).
        rounds: successive zero-delta fuses (>= 1); scalar figures are after the last.
        adapter_path: an mlx-lm adapter directory: adds ``retention``/``noise``.
        prompts: None (built-in prompts), a JSONL file of ``{"text"}`` or
            ``{"messages"}`` rows, or a list of strings / such dicts.
        mc: an MMLU-Pro JSONL/Parquet file: adds ``mc_flip``; ``mc_limit``
            takes its first N items.
        outputs: False skips the output level (no tokenizer or forward passes).
        out: a directory for noise_floor.json / .md / _tensors.jsonl and plots.
        seed: the seed of the ``stochastic`` policy (round r uses seed + r - 1).

    Raises:
        UserError: unknown settings, unreadable files, a model with no
            quantizable tensor at any requested setting.
    """
    started = time.monotonic()
    path = Path(model)
    gss = _int_list(group_sizes, "group sizes", SUPPORTED_GROUP_SIZES)
    bitss = _int_list(bits, "bits", SUPPORTED_BITS)
    pols = _policy_list(policies)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"rounds must be a positive integer, got {rounds!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if mc is not None and not outputs:
        raise UserError("mc needs the output level (it runs the models); drop outputs=False / --no-outputs")
    config = _read_config(path)
    quant = _model_quantization(config)
    adapter = _read_adapter(adapter_path) if adapter_path is not None else None
    warnings: list[str] = []

    prompt_desc = None
    probe_args = None
    if outputs:
        records, prompt_desc = _read_prompts(prompts)
        mc_items = None
        if mc is not None:
            from ..data.mmlu import load_mc

            mc_items = load_mc(mc, limit=mc_limit)
        tokenizer = _load_tokenizer(path)
        prompt_seqs = _encode_prompts(tokenizer, records)
        mc_seqs, mc_options = _encode_mc(tokenizer, mc_items) if mc_items else ([], [])
        probe_args = (prompt_seqs, mc_seqs, mc_options)
    elif prompts is not None:
        raise UserError("prompts need the output level; drop outputs=False / --no-outputs")

    # MLX's CPU backend is several times slower in bf16/fp16 (and its MoE
    # kernels need float32): the output level runs in float32 there. Widening
    # bf16/fp16 parameters is exact, so baseline and fused weights are unchanged.
    widen = mx.default_device() == mx.cpu
    # settings
    if quant is None:
        settings = [_Setting("quantized", g, b) for g in gss for b in bitss]
    else:
        own = (int(quant["group_size"]), int(quant["bits"]))
        settings = [_Setting("model", *own)]
        settings += [_Setting("requantized", g, b) for g in gss for b in bitss if (g, b) != own]
    settings.sort(key=lambda s: (s.group_size, s.bits, s.source != "model"))

    rows: list[dict] = []
    tensors: list[dict] = []
    skipped_meta: dict[str, list] = {}
    adapter_meta = None
    n_tokens = None
    setting_seconds: dict[str, float] = {}
    with progress.progress_bar() as bar:
        overall = bar.add_task("noise floor", total=len(settings))
        for setting in settings:
            t_setting = time.monotonic()
            model_obj, skipped = _load_baseline(path, setting)
            bar.update(overall, description=f"noise floor {setting.bits}-bit g{setting.group_size}")
            qmods = _quantized_modules(model_obj)
            if skipped:
                skipped_meta[setting.label] = [{"module": m, "reason": r} for m, r in skipped]
            if not qmods:
                warnings.append(f"{setting.label}: no tensor is quantized at this setting "
                                f"({len(skipped)} stay in full precision); no rows")
                del model_obj
                bar.advance(overall)
                continue
            if skipped and setting.source != "model":
                warnings.append(f"{setting.label}: {len(skipped)} weight tensor(s) stay in full "
                                f"precision and are not measured (e.g. {skipped[0][0]}: {skipped[0][1]})")
            by_path = {q.path: q for q in qmods}
            ww: dict[str, float] = {}  # ||W||^2 per module, when known

            def sq_norm(path: str, by_path=by_path, ww=ww) -> float:
                if path not in ww:
                    q = by_path[path]
                    ww[path] = _weight_sq_norm(q.base, q.group_size, q.bits)
                return ww[path]
            other = {}
            for q in qmods:
                if (q.group_size, q.bits) != (setting.group_size, setting.bits):
                    key = f"{q.bits}-bit g{q.group_size}"
                    other[key] = other.get(key, 0) + 1
            factors, adapter_unq = {}, []
            if adapter is not None:
                all_modules = {n for n, _ in model_obj.named_modules()}
                factors, adapter_unq = _adapter_factors(adapter, by_path, all_modules)
                if adapter_unq:
                    warnings.append(f"{setting.label}: {len(adapter_unq)} adapted module(s) are not "
                                    f"quantized here and do not count in retention/noise "
                                    f"(e.g. {adapter_unq[0]})")
            probe = None
            if probe_args is not None:
                if widen:
                    _widen(model_obj)
                base_params = [(f"{q.path}.{leaf}", getattr(q.module, leaf)) for q in qmods
                               for leaf in ("weight", "scales", "biases")]
                probe = _OutputProbe(*probe_args, vocab=_vocab(model_obj, probe_args[0]))
                probe.record_baseline(model_obj)
                n_tokens = probe.tokens

            task = bar.add_task(f"  {setting.label}", total=len(pols) * len(qmods))
            for policy in pols:
                t_row = time.monotonic()
                sums = [_Sums() for _ in range(rounds)]
                asums = _AdapterSums()
                fused_params = []
                identical = True  # every fused tensor bit-identical to its baseline
                for q in qmods:
                    za, zb = _zero_factors(q.base, q.in_dims)
                    cur = q.base
                    per_round = []
                    for r in range(rounds):
                        cur = fuse_requant(*cur, za, zb, scale=1.0, group_size=q.group_size, bits=q.bits,
                                           policy=policy, seed=(seed + r) % 2**32)
                        mx.eval(*cur)
                        if _identical(q.base, cur):
                            fid = _zero_fidelity(cur[0], q.group_size, q.bits)
                        else:
                            fid = tensor_fidelity(q.base, cur, group_size=q.group_size, bits=q.bits)
                            if fid.change_norm > 0 and fid.rel_error > 0 and q.path not in ww:
                                ww[q.path] = (fid.change_norm / fid.rel_error) ** 2
                        sums[r].add(q.path, fid, q.weights)
                        per_round.append(fid)
                    rec = {"setting": setting.label, "source": setting.source,
                           "row_group_size": setting.group_size, "row_bits": setting.bits,
                           "policy": policy, "module": q.path, "shape": [*q.base[0].shape[:-1], q.in_dims],
                           "group_size": q.group_size, "bits": q.bits,
                           "weights_changed": per_round[-1].weights_changed,
                           "codes_changed": per_round[-1].codes_changed,
                           "rel_error": per_round[-1].rel_error,
                           "max_abs": per_round[-1].max_abs,
                           "groups_refit": per_round[-1].groups_refit,
                           "retention": None, "noise": None, "delta_norm": None}
                    if q.path in factors:
                        a, b = factors[q.path]
                        fused = fuse_requant(*q.base, a, b, scale=adapter.scale, group_size=q.group_size,
                                             bits=q.bits, policy=policy, seed=seed)
                        mx.eval(*fused)
                        afid = tensor_fidelity(q.base, fused, a, b, scale=adapter.scale,
                                               group_size=q.group_size, bits=q.bits)
                        asums.add(afid)
                        rec.update(retention=afid.retention, noise=afid.noise, delta_norm=afid.delta_norm)
                        del fused
                    tensors.append(rec)
                    identical = identical and per_round[-1].codes_changed == 0 \
                        and per_round[-1].groups_refit == 0
                    if probe is not None:
                        fused_params += [(f"{q.path}.weight", cur[0]), (f"{q.path}.scales", cur[1]),
                                         (f"{q.path}.biases", cur[2])]
                    bar.advance(task)

                final = sums[-1].figures(sq_norm)
                row = {"group_size": setting.group_size, "bits": setting.bits, "policy": policy,
                       "source": setting.source,
                       "weights_changed": final["weights_changed"],
                       "codes_changed": final["codes_changed"],
                       "rel_error": final["rel_error"], "max_abs": final["max_abs"],
                       "rounds": rounds,
                       "drift": [{"round": r + 1, **s.figures(sq_norm)} for r, s in enumerate(sums)],
                       "retention": None, "noise": None,
                       "kl_mean": None, "kl_p99": None, "top1_flip": None, "mc_flip": None,
                       "groups_refit": final["groups_refit"],
                       "tensors": len(qmods), "weights": sums[-1].n,
                       "skipped": len(skipped), "other_settings": other}
                if adapter is not None:
                    row.update(asums.figures())
                    row["adapter_modules"] = asums.modules
                    row["adapter_delta_norm"] = math.sqrt(asums.dd)
                row["seconds_weights"] = time.monotonic() - t_row
                if probe is not None:
                    t_out = time.monotonic()
                    row["outputs_identical"] = identical
                    if identical:
                        # bit-identical parameters: the same outputs, no forward pass needed
                        row.update(kl_mean=0.0, kl_p99=0.0, top1_flip=0.0,
                                   mc_flip=0.0 if probe.mc_batches else None)
                    else:
                        if widen:
                            fused_params = [(n, x.astype(mx.float32) if x.dtype in _NARROW else x)
                                            for n, x in fused_params]
                        _swap(model_obj, fused_params)
                        row.update(probe.compare(model_obj))
                        _swap(model_obj, base_params)
                    row["seconds_outputs"] = time.monotonic() - t_out
                del fused_params
                rows.append(row)
            if adapter is not None and adapter_meta is None:
                adapter_meta = {"path": str(adapter_path), "scale": adapter.scale,
                                "modules": sum(1 for m in adapter.modules.values() if m.has_delta)}
            bar.update(task, visible=False)
            del model_obj, qmods, probe
            bar.advance(overall)
            setting_seconds[setting.label] = time.monotonic() - t_setting

    if not rows:
        raise UserError(f"{path}: no quantizable tensor at any requested setting "
                        f"(group sizes {', '.join(map(str, gss))}): "
                        + "; ".join(warnings[:3]))
    if adapter is not None:
        dd = [r["adapter_delta_norm"] for r in rows]
        adapter_meta["delta_norm"] = max(dd) if dd else 0.0
        adapter_meta["zero"] = all(d == 0 for d in dd)
        if adapter_meta["zero"]:
            warnings.append("the adapter's delta is zero: retention and noise are undefined")
    meta = {
        "model": str(path),
        "model_quantization": ({k: v for k, v in quant.items() if not isinstance(v, dict)}
                               if quant is not None else None),
        "model_kind": "quantized" if quant is not None else "full precision",
        "group_sizes": gss, "bits": bitss, "policies": pols, "rounds": rounds, "seed": seed,
        "scalars_describe": f"round {rounds} (after all rounds); drift lists every round",
        "native_kernel": native_available(),
        "output_dtype": ("float32 (parameters widened: MLX's CPU backend)" if widen else "the model's")
        if outputs else None,
        "adapter": adapter_meta,
        "prompts": prompt_desc, "prompt_tokens": n_tokens,
        "mc": str(mc) if mc is not None else None,
        "mc_items": len(probe_args[1]) if probe_args and mc is not None else None,
        "skipped": skipped_meta,
        "warnings": warnings,
        "setting_seconds": setting_seconds,
        "seconds": time.monotonic() - started,
    }
    result = NoiseFloorResult(rows=rows, meta=meta, tensors=tensors, warnings=warnings)
    if out is not None:
        result.files = write_outputs(result, out)
    return result


_NARROW = (mx.bfloat16, mx.float16)


def _widen(model) -> None:
    from mlx.utils import tree_map

    model.update(tree_map(lambda x: x.astype(mx.float32) if x.dtype in _NARROW else x, model.parameters()))


def _swap(model, items) -> None:
    from mlx.utils import tree_unflatten

    model.update(tree_unflatten(items))


def _vocab(model, seqs) -> int:
    logits = model(mx.array([seqs[0][:1]]))
    return int(logits.shape[-1])


def _load_tokenizer(path: Path):
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(path)
    except Exception as err:  # transformers raises many types for a missing/corrupt tokenizer
        raise UserError(f"{path}: cannot load the tokenizer for the output level ({err}); "
                        "pass outputs=False (--no-outputs) to measure the weights only") from None


# -- outputs ------------------------------------------------------------------------------------


def _pct(x):
    return "—" if x is None else f"{100 * x:.2f} %"


def _sci(x):
    return "—" if x is None else ("0" if x == 0 else f"{x:.2e}")


def format_markdown(result: NoiseFloorResult, command: str | None = None) -> str:
    """The rows as a Markdown table, with what was measured above it."""
    meta = result.meta
    has_adapter = meta.get("adapter") is not None
    zero_adapter = has_adapter and meta["adapter"].get("zero")
    has_out = any(r["kl_mean"] is not None for r in result.rows)
    has_mc = any(r["mc_flip"] is not None for r in result.rows)
    lines = ["# Re-quantization noise floor", ""]
    if command:
        lines += ["```", command, "```", ""]
    kind = meta["model_kind"]
    if meta["model_quantization"]:
        q = meta["model_quantization"]
        kind += f", {q['bits']}-bit g{q['group_size']}"
    lines.append(f"- model: `{meta['model']}` ({kind})")
    lines.append(f"- kernel: {'native' if meta['native_kernel'] else 'pure-MLX reference (fallback)'}; "
                 f"rounds: {meta['rounds']} (figures after round {meta['rounds']}); seed {meta['seed']}")
    if has_adapter:
        a = meta["adapter"]
        lines.append(f"- adapter: `{a['path']}` ({a['modules']} module(s), scale {a['scale']:g})"
                     + (" — its delta is zero: retention and noise are undefined" if zero_adapter else ""))
    if meta.get("prompts"):
        lines.append(f"- prompts: {meta['prompts']}, {meta['prompt_tokens']} tokens, teacher-forced"
                     + (f"; multiple choice: {meta['mc_items']} items from `{meta['mc']}`" if has_mc else ""))
    lines.append(f"- time: {meta['seconds']:.1f} s")
    lines.append("")
    head = ["source", "group size", "bits", "policy", "weights changed", "codes changed", "rel. error",
            "max abs"]
    if has_adapter:
        head += ["retention", "noise"]
    if has_out:
        head += ["KL mean", "KL p99", "top-1 flip"]
    if has_mc:
        head += ["MC flip"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + "|")
    for r in result.rows:
        cells = [r["source"], str(r["group_size"]), str(r["bits"]), r["policy"], _pct(r["weights_changed"]),
                 _pct(r["codes_changed"]), _sci(r["rel_error"]), _sci(r["max_abs"])]
        if has_adapter:
            if r["retention"] is None:
                cells += ["undefined", "undefined"]
            else:
                cells += [f"{r['retention']:.3f}", "0" if r["noise"] == 0 else f"{r['noise']:.3g}x"]
        if has_out:
            cells += [_sci(r["kl_mean"]), _sci(r["kl_p99"]), _pct(r["top1_flip"])]
        if has_mc:
            cells += [_pct(r["mc_flip"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("weights changed: share of weights whose dequantized value changed; codes changed: "
                 "share whose integer code changed; rel. error = ||change|| / ||W||; "
                 + ("retention = <change, delta> / ||delta||^2 and noise = ||change - retention * delta|| "
                    "/ ||delta|| for the adapter fused once; " if has_adapter else "")
                 + ("KL = KL(baseline || fused) of next-token distributions per token; top-1 flip: "
                    "positions whose most likely token changed; " if has_out else "")
                 + "source: `quantized` = full-precision model quantized at that setting, `model` = the "
                   "quantized model as stored, `requantized` = its dequantized weights quantized at "
                   "that setting.")
    with_ret = [r for r in result.rows if r["retention"] is not None]
    if with_ret:
        keep = [r for r in with_ret if 0.5 <= r["retention"] <= 1.5]
        if keep:
            best = min(keep, key=lambda r: r["noise"])
            lines += ["", f"Keeps the adapter best (retention within 0.5-1.5, least noise): {best['policy']} at "
                          f"{best['bits']}-bit g{best['group_size']} ({best['source']}), retention "
                          f"{best['retention']:.3f}, noise {best['noise']:.3g}x."]
        else:
            lines += ["", "No measured setting keeps the adapter (retention within 0.5-1.5)."]
    if result.warnings:
        lines += ["", "Notes:", ""] + [f"- {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def write_outputs(result: NoiseFloorResult, out: str | os.PathLike,
                  command: str | None = None) -> dict[str, Path]:
    """Write noise_floor.json, noise_floor.md, noise_floor_tensors.jsonl and
    the plots into ``out`` (atomically, file by file)."""
    from ..io.files import atomic_write_text
    from .plots import plot_all

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output directory {out} ({err.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"cannot write into {out}")
    files = {}
    files["json"] = atomic_write_text(out / "noise_floor.json",
                                      json.dumps(_jsonable(result.to_dict()), indent=2) + "\n")
    files["md"] = atomic_write_text(out / "noise_floor.md", format_markdown(result, command))
    files["tensors"] = atomic_write_text(out / "noise_floor_tensors.jsonl",
                                         "".join(json.dumps(_jsonable(t)) + "\n" for t in result.tensors))
    for name, p in plot_all(result.rows, out).items():
        files[name] = p
    return files


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
