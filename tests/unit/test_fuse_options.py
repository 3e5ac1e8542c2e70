"""``pyfuse fuse`` beyond the stock fuse: the ``preserve`` and ``stochastic``
policies, ``--requant-bits`` / ``--requant-group-size`` (checked against MLX
ops), ``--only`` and ``--link-unchanged`` (against ``mlx_lm fuse`` for what is
fused, byte identity and hard links for the rest)."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import mlx.core as mx

from pyfuse.fuse import fuse_model

from helpers import (DOWN, GATE, UP, differing, identical, make_adapter, mlx_fuse, model_tensors, module_tensors,
                     read_json, run_cli)


# -- preserve / zero adapter -------------------------------------------------------------------

def test_zero_adapter_preserve_is_byte_identical(fuse_work, tiny_moe_mixed_dir):
    adapter = make_adapter(tiny_moe_mixed_dir, fuse_work / "zero_adapter", keys=[DOWN, GATE, "self_attn.v_proj"],
                           b_std=0.0)
    out = fuse_work / "zero_preserve"
    assert run_cli("fuse", "--model", tiny_moe_mixed_dir, "--adapter-path", adapter, "--save-path", out,
                   "--policy", "preserve").code == 0
    src = Path(tiny_moe_mixed_dir)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert filecmp.cmp(p, out / p.name, shallow=False), p.name
    # whereas stock (mlx-lm's algorithm) changes the same model with the same zero adapter
    ref = model_tensors(mlx_fuse(tiny_moe_mixed_dir, adapter, fuse_work / "zero_mlx"))
    stock = fuse_model(tiny_moe_mixed_dir, adapter, fuse_work / "zero_stock")
    assert differing(ref, model_tensors(stock.save_path)) == []
    assert differing(model_tensors(src), ref)
    assert stock.summary["retention"] is None and stock.summary["codes_changed"] > 0


def test_stochastic_keeps_the_delta_on_average(fuse_work, tiny_moe_dir):
    """A realistic small delta (~1 % of a 3-bit step): stock erases most of it,
    stochastic keeps it in expectation."""
    adapter = make_adapter(tiny_moe_dir, fuse_work / "small_adapter", keys=[DOWN, UP, GATE], num_layers=4,
                           b_std=1e-4)
    stock = fuse_model(tiny_moe_dir, adapter, fuse_work / "small_stock").summary
    sto = fuse_model(tiny_moe_dir, adapter, fuse_work / "small_sto", policy="stochastic", seed=1).summary
    assert stock["retention"] < 0.5
    assert abs(sto["retention"] - 1.0) < 0.35
    assert sto["kernel"] == stock["kernel"]


# -- precision, --only, --link-unchanged -------------------------------------------------------

def test_requant_bits_records_precision_per_module(fuse_work, tiny_moe_dir):
    from mlx_lm import load

    adapter = make_adapter(tiny_moe_dir, fuse_work / "rb_adapter", keys=[DOWN], b_std=1e-3)
    res = fuse_model(tiny_moe_dir, adapter, fuse_work / "rb8", requant_bits=8, requant_group_size=32)
    out = res.save_path
    cfg = read_json(out / "config.json")
    for layer in (2, 3):
        entry = {"group_size": 32, "bits": 8, "mode": "affine"}
        assert cfg["quantization"][f"model.layers.{layer}.{DOWN}"] == entry
        assert cfg["quantization_config"][f"model.layers.{layer}.{DOWN}"] == entry
    # the fused tensors are quantize_8(dequantize_3(W) + delta), computed here with MLX ops
    base, got = model_tensors(tiny_moe_dir), model_tensors(out)
    ad = mx.load(str(adapter / "adapters.safetensors"))
    p = f"model.layers.3.{DOWN}"
    w = mx.dequantize(base[f"{p}.weight"], base[f"{p}.scales"], base[f"{p}.biases"], group_size=64, bits=3)
    w = w + ((20.0 * ad[f"{p}.lora_b"]) @ ad[f"{p}.lora_a"]).astype(w.dtype)
    expect = mx.quantize(w, group_size=32, bits=8)
    for name, x in zip(("weight", "scales", "biases"), expect):
        assert identical(got[f"{p}.{name}"], x)
    untouched = set(base) - module_tensors(base, p) - module_tensors(base, f"model.layers.2.{DOWN}")
    assert differing({k: base[k] for k in untouched}, {k: got[k] for k in untouched}) == []
    model, tok = load(str(out))
    assert model.model.layers[3].mlp.switch_mlp.down_proj.bits == 8
    assert model.model.layers[3].mlp.switch_mlp.gate_proj.bits == 3
    model(mx.array([[1, 2, 3]]))
    # 8 bits keep the delta far better than the stock 3-bit fuse of the same adapter
    stock = fuse_model(tiny_moe_dir, adapter, fuse_work / "rb_stock")
    assert res.summary["retention"] > 0.95 > stock.summary["retention"]
    assert {r["from_bits"] for r in res.report["tensors"]} == {3}


def test_only_and_link_unchanged(fuse_work, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    model_dir = build_tiny_model(fuse_work / "sharded", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                                 quantize={"group_size": 64, "bits": 3}, shards=4)
    adapter = make_adapter(model_dir, fuse_work / "sharded_adapter", keys=[DOWN, GATE], num_layers=4)
    ref = model_tensors(mlx_fuse(model_dir, adapter, fuse_work / "sharded_mlx"))
    res = fuse_model(model_dir, adapter, fuse_work / "sharded_only", only=r"layers\.1\.mlp\.switch_mlp\.down",
                     link_unchanged=True)
    out = res.save_path
    target = f"model.layers.1.{DOWN}"
    assert res.fused == [target]
    assert len(res.summary["excluded_by_only"]) == 7
    base, got = model_tensors(model_dir), model_tensors(out)
    mine = module_tensors(base, target)
    assert differing({k: ref[k] for k in mine}, {k: got[k] for k in mine}) == []
    assert differing({k: base[k] for k in set(base) - mine}, {k: got[k] for k in set(base) - mine}) == []
    index = read_json(Path(model_dir) / "model.safetensors.index.json")
    touched_shards = {index["weight_map"][k] for k in mine}
    shards = sorted(p.name for p in Path(model_dir).glob("model-*.safetensors"))
    assert len(shards) == 4 and len(touched_shards) < 4
    for name in shards:
        same_inode = os.stat(out / name).st_ino == os.stat(Path(model_dir) / name).st_ino
        assert same_inode == (name not in touched_shards), name
        assert res.summary["shards"][name] == ("written" if name in touched_shards else "linked")
    assert filecmp.cmp(Path(model_dir) / "model.safetensors.index.json",
                       out / "model.safetensors.index.json", shallow=False)
