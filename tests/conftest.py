"""Session-wide test setup: quiet progress bars, no network, the tiny
mlx-lm models (built once per session, ~1 s in all, see pyfuse.demo.tiny_model)
and the demo's default model (built on first use, ~45 s, e2e tests only).

Fixtures that several test files need live here; plain helper functions
(running the CLI, writing adapters and JSON Lines, ...) in helpers.py."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub / transformers (they read these at
# import time): tests never reach a model hub.
os.environ.setdefault("PYFUSE_PROGRESS", "0")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_models_root):
    """Byte-level BPE (1024 ids) with Qwen3 special tokens and chat template."""
    from pyfuse.demo.tiny_model import build_tokenizer

    return build_tokenizer(tiny_models_root / "tokenizer")


@pytest.fixture(scope="session")
def tiny_moe_dir(tiny_models_root, tiny_tokenizer_dir):
    """qwen3_moe, 4 layers x 8 experts (top-2), hidden 64, 3-bit g64, f32 scales."""
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(tiny_models_root / "moe_3bit", tokenizer_dir=tiny_tokenizer_dir,
                            arch="qwen3_moe", quantize={"group_size": 64, "bits": 3})


@pytest.fixture(scope="session")
def tiny_moe_mixed_dir(tiny_models_root, tiny_tokenizer_dir):
    """As ``tiny_moe_dir`` but every ``down_proj`` (the experts') at 6-bit g64."""
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(tiny_models_root / "moe_3bit_down6", tokenizer_dir=tiny_tokenizer_dir,
                            arch="qwen3_moe", quantize={"group_size": 64, "bits": 3},
                            quant_overrides={"down_proj": {"group_size": 64, "bits": 6}})


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_models_root, tiny_tokenizer_dir):
    """Dense llama, 4 layers, hidden 64, 4-bit g64, f32 scales."""
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(tiny_models_root / "llama_4bit", tokenizer_dir=tiny_tokenizer_dir,
                            arch="llama", quantize={"group_size": 64, "bits": 4})


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """The session's cache of the demo's default model (shared by the demo's
    and the default model's tests, so that it is built once)."""
    return tmp_path_factory.getbasetemp() / "pyfuse-cache"


@pytest.fixture(scope="session")
def default_assets(default_model_cache):
    """The default model and its data (pyfuse.demo.default_model), built
    into the session's cache on first use."""
    from pyfuse.demo.default_model import default_assets as build_or_reuse

    return build_or_reuse(default_model_cache)


# -- one adapter fused by mlx-lm and by pyfuse (the fuse tests' common case) --------------------


@pytest.fixture(scope="session")
def fuse_work(tmp_path_factory):
    """Where the fuse tests write (each under its own name)."""
    return tmp_path_factory.mktemp("fuse")


@pytest.fixture(scope="session")
def moe_adapter(fuse_work, tiny_moe_dir):
    """A random LoRA on the last two layers' down_proj, gate_proj and q_proj of the tiny MoE."""
    from helpers import DOWN, GATE, make_adapter

    return make_adapter(tiny_moe_dir, fuse_work / "moe_adapter", keys=[DOWN, GATE, "self_attn.q_proj"])


@pytest.fixture(scope="session")
def moe_mlx(fuse_work, tiny_moe_dir, moe_adapter):
    """``moe_adapter`` fused by ``mlx_lm fuse`` (the oracle)."""
    from helpers import mlx_fuse

    return mlx_fuse(tiny_moe_dir, moe_adapter, fuse_work / "moe_mlx")


@pytest.fixture(scope="session")
def moe_pyfuse(fuse_work, tiny_moe_dir, moe_adapter):
    """``moe_adapter`` fused by ``pyfuse fuse`` (stock), its report in ``fuse_work / "moe_report.json"``."""
    from helpers import run_cli

    out = fuse_work / "moe_pyfuse"
    assert run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out,
                   "--report", fuse_work / "moe_report.json").code == 0
    return out
