"""``pyfuse fuse`` / ``pyfuse.fuse_model`` in stock mode against ``mlx_lm fuse``
run in the same test (the oracle): the same tensors, byte for byte, on MoE,
dense, Qwen3.5 (every layer type), mixed-precision, DoRA, embedding and
dequantized fuses; the output loads and generates like mlx-lm's; everything
but the weights is copied unchanged.

Adapters are made with mlx-lm's own ``linear_to_lora_layers`` (see
``helpers.make_adapter``); the shared fused models are fixtures in conftest.py.
"""

from __future__ import annotations

import filecmp
from pathlib import Path

import mlx.core as mx
import pytest

import pyfuse.fuse.compute as compute
from pyfuse.fuse import fuse_model
from pyfuse.io.model_dir import ModelDir

from helpers import (DOWN, GATE, UP, differing, make_adapter, mlx_fuse, model_tensors, module_tensors, read_json,
                     run_cli)


def test_stock_matches_mlx_lm_fuse_on_moe(tiny_moe_dir, moe_mlx, moe_pyfuse):
    base, ref, got = model_tensors(tiny_moe_dir), model_tensors(moe_mlx), model_tensors(moe_pyfuse)
    assert differing(ref, got) == []
    # and the fuse did something: 2 layers x 3 modules x (weight, scales, biases)
    changed = differing(base, got)
    assert len(changed) == 18
    assert {".".join(n.split(".")[:3]) for n in changed} == {"model.layers.2", "model.layers.3"}


def test_stock_matches_when_processed_in_chunks(fuse_work, tiny_moe_dir, moe_adapter, moe_mlx, monkeypatch):
    """The fuse runs a few experts / rows at a time: results must not depend on it."""
    monkeypatch.setattr(compute, "CHUNK_ELEMENTS", 64 * 64 * 3)  # 3 experts or 192 rows a chunk
    monkeypatch.setattr(compute, "_kernel_is_native", lambda: False)  # chunk the kernel calls too
    out = fuse_model(tiny_moe_dir, moe_adapter, fuse_work / "moe_chunked").save_path
    assert differing(model_tensors(moe_mlx), model_tensors(out)) == []


def test_output_loads_and_generates_like_mlx_lm(tiny_moe_dir, moe_mlx, moe_pyfuse):
    from mlx_lm import generate, load

    m_ref, tok = load(str(moe_mlx))
    m_got, tok_got = load(str(moe_pyfuse))
    m_base, _ = load(str(tiny_moe_dir))
    ids = mx.array([tok.encode("The quick brown fox jumps over the lazy dog")])
    ref_logits, got_logits, base_logits = m_ref(ids), m_got(ids), m_base(ids)
    assert mx.array_equal(ref_logits, got_logits).item()
    assert not mx.array_equal(base_logits, got_logits).item()  # the adapter is in there
    prompt = "Question: what is two plus two?"
    out_ref = generate(m_ref, tok, prompt=prompt, max_tokens=12, verbose=False)
    out_got = generate(m_got, tok_got, prompt=prompt, max_tokens=12, verbose=False)
    assert out_ref == out_got and len(out_ref) > 0
    # the chat template came along unchanged
    assert tok_got.chat_template == tok.chat_template


def test_everything_but_the_weights_is_copied_unchanged(tiny_moe_dir, moe_pyfuse):
    src = {p.name for p in Path(tiny_moe_dir).iterdir()}
    assert {p.name for p in Path(moe_pyfuse).iterdir()} == src
    for name in src:
        if not name.endswith(".safetensors"):
            assert filecmp.cmp(Path(tiny_moe_dir) / name, Path(moe_pyfuse) / name, shallow=False), name


def test_mixed_precision_model(fuse_work, tiny_moe_mixed_dir):
    """6-bit down_proj in a 3-bit model: per-module precision is kept and the
    fused tensors match mlx-lm's."""
    from mlx_lm import load

    adapter = make_adapter(tiny_moe_mixed_dir, fuse_work / "mixed_adapter", keys=[DOWN, UP])
    ref = mlx_fuse(tiny_moe_mixed_dir, adapter, fuse_work / "mixed_mlx")
    out = fuse_model(tiny_moe_mixed_dir, adapter, fuse_work / "mixed_pyfuse")
    assert differing(model_tensors(ref), model_tensors(out.save_path)) == []
    cfg_in = read_json(Path(tiny_moe_mixed_dir) / "config.json")
    cfg_out = read_json(out.save_path / "config.json")
    assert cfg_out == cfg_in
    assert cfg_out["quantization"][f"model.layers.3.{DOWN}"]["bits"] == 6
    by_name = {r["module"]: r for r in out.report["tensors"]}
    assert by_name[f"model.layers.3.{DOWN}"]["bits"] == 6
    assert by_name[f"model.layers.3.{UP}"]["bits"] == 3
    model, _ = load(str(out.save_path))
    assert model.model.layers[3].mlp.switch_mlp.down_proj.bits == 6
    assert model.model.layers[3].mlp.switch_mlp.up_proj.bits == 3


def test_configured_layers_without_weights_are_left_alone(fuse_work, tiny_moe_dir):
    """mlx_lm fuse re-quantizes configured layers that have no adapter weights
    (with a zero lora_b); pyfuse leaves them byte-identical and says so."""
    missing = f"model.layers.2.{DOWN}"
    adapter = make_adapter(tiny_moe_dir, fuse_work / "partial_adapter", keys=[DOWN, GATE], drop=(missing,))
    ref = model_tensors(mlx_fuse(tiny_moe_dir, adapter, fuse_work / "partial_mlx"))
    res = fuse_model(tiny_moe_dir, adapter, fuse_work / "partial_pyfuse")
    got, base = model_tensors(res.save_path), model_tensors(tiny_moe_dir)
    names = set(base)
    untouched = module_tensors(names, missing)
    fused = set().union(*(module_tensors(names, f"model.layers.{i}.{k}")
                          for i, k in ((3, DOWN), (2, GATE), (3, GATE))))
    assert differing({k: ref[k] for k in fused}, {k: got[k] for k in fused}) == []
    assert differing({k: base[k] for k in names - fused}, {k: got[k] for k in names - fused}) == []
    # mlx-lm did change the weightless module (its zero-delta re-quantization)
    assert differing({k: base[k] for k in untouched}, {k: ref[k] for k in untouched})
    assert res.summary["configured_without_weights"] == [missing]
    assert any("have no adapter weights" in w for w in res.warnings)


@pytest.fixture(scope="module")
def qwen35_dir(fuse_work, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(fuse_work / "qwen35", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_5_moe",
                            quantize={"group_size": 64, "bits": 3})


def test_stock_matches_mlx_lm_on_qwen3_5_moe_every_layer_type(fuse_work, qwen35_dir):
    """No keys: every Linear / SwitchLinear of the last two blocks (linear
    attention, full attention, routed and shared experts, router gates)."""
    adapter = make_adapter(qwen35_dir, fuse_work / "q35_adapter", keys=None, num_layers=2)
    ref = model_tensors(mlx_fuse(qwen35_dir, adapter, fuse_work / "q35_mlx"))
    res = fuse_model(qwen35_dir, adapter, fuse_work / "q35_pyfuse")
    assert differing(ref, model_tensors(res.save_path)) == []
    assert len(res.fused) > 20 and res.summary["configured_without_weights"] == []
    assert {r["kind"] for r in res.report["tensors"]} == {"linear", "switch"}


def test_configured_modules_match_mlx_lm_graph(fuse_work, tiny_moe_dir, tiny_llama_dir, qwen35_dir):
    """The name-based list of modules an adapter config covers equals the
    LoRA layers mlx-lm's linear_to_lora_layers creates."""
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from pyfuse.fuse.mapping import configured_modules
    from pyfuse.io.adapter_dir import Adapter

    for model_dir, num_layers, keys in ((tiny_moe_dir, 2, None), (tiny_llama_dir, 3, None),
                                        (tiny_moe_dir, 1, [DOWN, "self_attn.o_proj"]),
                                        (tiny_llama_dir, -1, ["mlp.up_proj", "lm_head"]),
                                        (qwen35_dir, 3, None),
                                        (qwen35_dir, 0, ["linear_attn.out_proj", "mlp.switch_mlp.up_proj"])):
        model, _ = load(str(model_dir))
        params = {"rank": 2, "scale": 1.0, "dropout": 0.0}
        if keys:
            params["keys"] = keys
        linear_to_lora_layers(model, num_layers, params)
        expected = sorted(n for n, m in model.named_modules()
                          if isinstance(m, (LoRALinear, LoRASwitchLinear, LoRAEmbedding)))
        md = ModelDir(model_dir)
        adapter = Adapter(path=Path("."), config={}, fine_tune_type="lora", scale=1.0, rank=2,
                          num_layers=num_layers, keys=keys)
        layers = md.config.get("num_hidden_layers") or md.config["text_config"]["num_hidden_layers"]
        assert sorted(configured_modules(adapter, md.tensors, layers)) == expected, model_dir
        md.close()


# -- other layer types, dequantize -------------------------------------------------------------

def test_dora_and_embedding_match_mlx_lm(fuse_work, tiny_llama_dir):
    dora = make_adapter(tiny_llama_dir, fuse_work / "dora_adapter", dora=True,
                        keys=["self_attn.q_proj", "mlp.down_proj"])
    ref = mlx_fuse(tiny_llama_dir, dora, fuse_work / "dora_mlx")
    got = fuse_model(tiny_llama_dir, dora, fuse_work / "dora_pyfuse")
    assert differing(model_tensors(ref), model_tensors(got.save_path)) == []
    assert len(got.fused) == 4 and all("dora" in r["kind"] for r in got.report["tensors"])

    emb = make_adapter(tiny_llama_dir, fuse_work / "emb_adapter", num_layers=1,
                       keys=["model.embed_tokens", "lm_head", "self_attn.k_proj"])
    ref = mlx_fuse(tiny_llama_dir, emb, fuse_work / "emb_mlx")
    got = fuse_model(tiny_llama_dir, emb, fuse_work / "emb_pyfuse")
    assert differing(model_tensors(ref), model_tensors(got.save_path)) == []
    kinds = {r["module"]: r["kind"] for r in got.report["tensors"]}
    assert kinds == {"model.embed_tokens": "embedding", "lm_head": "linear",
                     "model.layers.3.self_attn.k_proj": "linear"}


def test_dequantize_matches_mlx_lm(fuse_work, tiny_moe_mixed_dir, moe_adapter):
    adapter = make_adapter(tiny_moe_mixed_dir, fuse_work / "dq_adapter", keys=[DOWN, "self_attn.q_proj"])
    ref = mlx_fuse(tiny_moe_mixed_dir, adapter, fuse_work / "dq_mlx", "--dequantize")
    out = fuse_work / "dq_pyfuse"
    assert run_cli("fuse", "--model", tiny_moe_mixed_dir, "--adapter-path", adapter, "--save-path", out,
                   "--dequantize").code == 0
    assert differing(model_tensors(ref), model_tensors(out)) == []
    cfg_ref = read_json(ref / "config.json")
    cfg = read_json(out / "config.json")
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert cfg == {k: v for k, v in cfg_ref.items() if k in cfg}
    index = read_json(out / "model.safetensors.index.json")
    assert set(index["weight_map"]) == set(model_tensors(out))
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in out.glob("*.safetensors")) \
        - sum(_header_size(p) for p in out.glob("*.safetensors"))


def _header_size(p: Path) -> int:
    import struct

    with open(p, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]
