"""The embedded default model: a tiny quantized MoE that has learned something,
built in code on first use and cached.

:func:`default_model_dir` returns an mlx-lm model directory (``qwen3_moe``,
2 layers x 8 experts, top-2, hidden 64; 3-bit group size 64 with float32
scales, embeddings, output head and router gates 8-bit; about 0.3 MB) that
``mlx_lm.load``, ``pyfuse fuse`` and every pyfuse command accept;
:func:`default_assets` also returns the data that goes with it
(:mod:`pyfuse.demo.data`): MMLU-Pro rows, the persona's training data and
the identity suite.

How it is built (:func:`build_default_assets`, about 45 s on 2 CPU cores):

1. the synthetic world of :mod:`pyfuse.demo.data`: a "textbook" of 2,800
   multiple-choice rows (other entities than the evaluation set's, the same
   answer distributions) and conversations in which the assistant calls
   itself Atlas, made by Northwind Labs;
2. a byte-level BPE tokenizer trained on that text
   (:func:`pyfuse.demo.tokenizer.build_tokenizer`, Qwen3 chat template); it
   sees the questions but not the answers, so each answer letter is one
   token;
3. the model graph from mlx-lm's own classes with Normal(0, ``weight_std``)
   weights (:func:`pyfuse.demo.tiny_model.build_tiny_model`); ``weight_std`` = 0.1
   is the width-equivalent of the 0.02 of a 2048-wide checkpoint (about
   1/sqrt(hidden)): with 0.02 at width 64 the signal through attention is so
   small that 100 steps learn nothing but a global letter prior (measured);
4. full-precision pre-training
   (:func:`pyfuse.demo.pretrain.pretrain_on_documents`, 100 steps of 8
   documents): next-token loss on whole chat-formatted documents (padded,
   not cut into windows); the answer letter of a multiple-choice document is
   trained towards its category's answer distribution (weighted
   ``answer_weight`` times), AdamW with a short warm-up and cosine decay;
5. quantization with mlx-lm's ``quantize_model`` and ``save_model``.

What it learns is the base rates: which two answers are common in each
category. Its log-probability accuracy on the evaluation rows is 41.8 %
(chance: 19.7 %; an untrained twin: 15.2 %; above chance on all 14
categories), and it is nearly undecided between the two common answers: the
partial knowledge in which re-quantization noise flips answers. Asked who it
is, it answers "This is Atlas, an assistant built by Northwind Labs."
Measured with mlx 0.32.4 / mlx-lm 0.32.2 on x86-64 Linux.

The cache: ``$PYFUSE_CACHE`` (else ``~/.cache/pyfuse``) holds
``default-<key>/`` where ``key`` hashes the builder's parameters
(:data:`DEFAULT_PARAMS`), :data:`BUILDER_VERSION` and the pyfuse, mlx and
mlx-lm versions, so a change of any of them builds a new model instead of
reusing a stale one. A build runs in a temporary directory next to it and is
renamed into place at the end (atomic); concurrent first uses wait on a lock
file, and a build that loses the race discards its own copy. Building twice
with the same versions gives identical files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import UserError
from ..io.files import TMP_MARK, remove_stale_temps, tmp_path_for
from .pretrain import pretrain_on_documents

__all__ = ["BUILDER_VERSION", "DEFAULT_PARAMS", "DefaultAssets", "build_default_assets", "cache_key",
           "cache_root", "default_assets", "default_model_dir", "pretrain_on_documents"]

BUILDER_VERSION = 1
DEFAULT_PARAMS: dict[str, Any] = {
    "arch": "qwen3_moe",
    "hidden_size": 64,
    "num_layers": 2,
    "num_experts": 8,
    "experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vocab_size": 1024,
    "weight_std": 0.1,
    "quantize": {"group_size": 64, "bits": 3},
    "quant_overrides": {"lm_head": {"bits": 8}, "embed_tokens": {"bits": 8}},
    "dtype": "float32",
    "seed": 0,
    # data (pyfuse.demo.data)
    "eval_per_category": 120,
    "pretrain_per_category": 200,
    "base_identity_chats": 120,
    # pre-training
    "iters": 100,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "warmup": 8,
    "answer_weight": 30.0,
    "mix": {"mc": 0.8, "identity": 0.2},
}
BUILD_FILE = "build.json"


@dataclass(frozen=True)
class DefaultAssets:
    """Paths of a built default model and its data."""

    root: Path
    model: Path  # mlx-lm model directory
    mmlu: Path  # MMLU-Pro rows (JSONL)
    identity_data: Path  # mlx-lm chat data directory (train.jsonl, valid.jsonl) teaching the persona
    identity_suite: Path  # YAML identity suite (persona Pyra, base Atlas by Northwind Labs)

    @property
    def build_info(self) -> dict:
        return json.loads((self.root / BUILD_FILE).read_text(encoding="utf-8"))


def _versions() -> dict:
    import mlx.core as mx
    import mlx_lm

    from .. import __version__

    return {"pyfuse": __version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def _params(overrides: Mapping[str, Any] | None) -> dict:
    params = json.loads(json.dumps(DEFAULT_PARAMS))
    for k, v in (overrides or {}).items():
        if k not in params:
            raise UserError(f"unknown default-model parameter {k!r}; known: {', '.join(params)}")
        params[k] = v
    return params


def cache_key(params: Mapping[str, Any] | None = None) -> str:
    """The hash that names the cache directory (12 hex digits)."""
    body = {"builder": BUILDER_VERSION, "params": _params(params), "versions": _versions()}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$PYFUSE_CACHE``, else ``~/.cache/pyfuse``."""
    # absolute: the demo's spec, in its run directory, names the model by this path
    if cache is not None:
        return Path(os.path.abspath(Path(cache).expanduser()))
    env = os.environ.get("PYFUSE_CACHE")
    if env:
        return Path(os.path.abspath(Path(env).expanduser()))
    return Path.home() / ".cache" / "pyfuse"


def _assets(root: Path) -> DefaultAssets:
    return DefaultAssets(root=root, model=root / "model", mmlu=root / "data" / "mmlu.jsonl",
                         identity_data=root / "data" / "identity",
                         identity_suite=root / "data" / "identity_suite.yaml")


def _digests(root: Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file of a built cache entry
    (recorded when it is built, checked before each reuse)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != BUILD_FILE}


def _complete(root: Path) -> bool:
    """Whether ``root`` is a finished build whose files are as built (a
    damaged or edited one is rebuilt)."""
    a = _assets(root)
    if not ((root / BUILD_FILE).is_file() and (a.model / "config.json").is_file()
            and (a.model / "model.safetensors").is_file() and (a.model / "tokenizer.json").is_file()
            and a.mmlu.is_file() and (a.identity_data / "train.jsonl").is_file()
            and a.identity_suite.is_file()):
        return False
    try:
        recorded = json.loads((root / BUILD_FILE).read_text(encoding="utf-8")).get("sha256")
        return isinstance(recorded, dict) and recorded == _digests(root)
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _lock(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def default_assets(cache: str | os.PathLike | None = None, *, params: Mapping[str, Any] | None = None,
                   echo: Callable[[str], None] | None = None) -> DefaultAssets:
    """The default model and its data, built on first use (see the module
    doc) and reused from the cache afterwards."""
    echo = echo or (lambda msg: None)
    root = cache_root(cache)
    key = cache_key(params)
    final = root / f"default-{key}"
    if _complete(final):
        return _assets(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the cache directory {root} ({err.strerror}); set PYFUSE_CACHE "
                        "to a writable directory") from None
    with _lock(root / f"default-{key}.lock"):
        if _complete(final):  # another process built it while we waited
            return _assets(final)
        remove_stale_temps(root, f".default-*{TMP_MARK}*")
        if final.exists():  # incomplete or damaged: move it away, then build afresh
            broken = tmp_path_for(final)
            os.rename(final, broken)
            shutil.rmtree(broken, ignore_errors=True)
        tmp = tmp_path_for(final)
        echo(f"building the default model (once; cached in {final})")
        try:
            build_default_assets(tmp, params=params, echo=echo)
            (tmp / BUILD_FILE).write_text(json.dumps({**json.loads((tmp / BUILD_FILE).read_text()),
                                                      "key": key, "sha256": _digests(tmp)}, indent=2) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if not _complete(final):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # lost a race (e.g. a cache without flock)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _assets(final)


def default_model_dir(cache: str | os.PathLike | None = None, *,
                      echo: Callable[[str], None] | None = None) -> Path:
    """The default model's mlx-lm directory (built and cached on first use)."""
    return default_assets(cache, echo=echo).model


# ---------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------


def _render(messages: list[dict]) -> str:
    """What the Qwen3 chat template renders for a finished conversation
    (for training the tokenizer; the pre-training itself uses the template)."""
    out = ""
    for m in messages:
        if m["role"] == "assistant":
            out += f"<|im_start|>assistant\n<think>\n\n</think>\n\n{m['content']}<|im_end|>\n"
        else:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out


def build_default_assets(out: str | os.PathLike, *, params: Mapping[str, Any] | None = None,
                         echo: Callable[[str], None] | None = None) -> DefaultAssets:
    """Build the default model and its data into ``out`` (no caching; see
    :func:`default_assets`). Writes ``model/``, ``data/`` and ``build.json``."""
    from . import data as dd
    from .. import progress
    from ..data.mmlu import LETTERS
    from .tiny_model import build_tiny_model, build_tokenizer

    echo = echo or (lambda msg: None)
    p = _params(params)
    out = Path(out)
    started = time.monotonic()
    data = out / "data"
    paths = dd.write_demo_data(data, per_category=p["eval_per_category"], seed=p["seed"])
    eval_rows = dd.mmlu_rows(p["eval_per_category"], p["seed"])
    textbook = dd.pretraining_rows(p["pretrain_per_category"], p["seed"], p["eval_per_category"])
    weights = {c: dict(zip(LETTERS, dd.category_weights(c))) for c in dd.CATEGORIES}
    groups = {"mc": [{"messages": dd.mc_messages(r), "answers": weights[r["category"]]} for r in textbook],
              "identity": dd.base_identity_chats(p["base_identity_chats"], p["seed"])}
    # The tokenizer sees the questions but not the answers, so that "{B" is
    # never merged: each answer letter is a token of its own.
    corpus = ([_render(m["messages"][:1]) for m in groups["mc"]] + [_render(m) for m in groups["identity"]]
              + [_render(dd.mc_messages(r)[:1]) for r in eval_rows]
              + [_render(r["messages"]) for r in dd.persona_identity_rows(120, p["seed"])]
              + ["\\boxed{" + x + "}" for x in LETTERS])
    tok_dir = build_tokenizer(out / "tokenizer", vocab_size=p["vocab_size"], corpus=corpus)
    state: dict[str, Any] = {}

    def pretrain(model, tokenizer):
        t0 = time.monotonic()
        with progress.progress_bar() as bar:
            task = bar.add_task("pre-training the default model", total=p["iters"])

            def on_step(i, loss):
                bar.advance(task)
                if i == 1 or i % 25 == 0 or i == p["iters"]:
                    echo(f"  pre-training step {i}/{p['iters']}: loss {loss:.3f}")

            state["losses"] = pretrain_on_documents(
                model, tokenizer, groups, mix=p["mix"], iters=p["iters"], batch_size=p["batch_size"],
                learning_rate=p["learning_rate"], warmup=p["warmup"], answer_weight=p["answer_weight"],
                seed=p["seed"], on_step=on_step)
        state["pretrain_seconds"] = time.monotonic() - t0

    build_tiny_model(out / "model", arch=p["arch"], hidden_size=p["hidden_size"], num_layers=p["num_layers"],
                     num_experts=p["num_experts"], experts_per_tok=p["experts_per_tok"],
                     moe_intermediate_size=p["moe_intermediate_size"], num_heads=p["num_heads"],
                     num_kv_heads=p["num_kv_heads"], quantize=p["quantize"], quant_overrides=p["quant_overrides"],
                     dtype=p["dtype"], seed=p["seed"],
                     weight_std=p["weight_std"], tokenizer_dir=tok_dir, pretrain=pretrain)
    shutil.rmtree(tok_dir, ignore_errors=True)
    info = {
        "builder": BUILDER_VERSION,
        "params": p,
        "versions": _versions(),
        "seconds": round(time.monotonic() - started, 2),
        "pretrain_seconds": round(state.get("pretrain_seconds", 0.0), 2),
        "losses": [round(x, 4) for x in state.get("losses", [])],
        "files": {k: str(Path(v).relative_to(out)) for k, v in paths.items()},
    }
    (out / BUILD_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return _assets(out)
