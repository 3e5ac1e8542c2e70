"""The two places where ``pyfuse fuse --policy stock`` does not write
``mlx_lm fuse``'s bytes, as ``pyfuse fuse --help`` states them, checked
against ``mlx_lm fuse`` itself:

1. DoRA on a bf16 (or fp16) model: mlx-lm writes the DoRA layers' scales and biases in
   float32 (its float32 magnitude promotes them); pyfuse keeps bf16.
2. bf16 adapter tensors: pyfuse widens them to float32 before
   ``scale * B @ A``; its output is mlx-lm's fuse of the widened adapter.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest

from pyfuse.fuse import fuse_model

from helpers import DOWN, differing, make_adapter, mlx_fuse, model_tensors


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half_llama(request, fuse_work, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(fuse_work / f"llama_{request.param}", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                            quantize={"group_size": 64, "bits": 4}, dtype=request.param)


def test_dora_on_bf16_keeps_bf16_where_mlx_lm_writes_float32(fuse_work, half_llama):
    """(and the same on float16)"""
    adapter = make_adapter(half_llama, fuse_work / f"dev_dora_{half_llama.name}", dora=True, keys=["mlp.down_proj"],
                           num_layers=1)
    ref = model_tensors(mlx_fuse(half_llama, adapter, fuse_work / f"dev_dora_mlx_{half_llama.name}"))
    got = model_tensors(fuse_model(half_llama, adapter, fuse_work / f"dev_dora_pyfuse_{half_llama.name}").save_path)
    dora = "model.layers.3.mlp.down_proj"
    assert differing(ref, got) == [f"{dora}.biases", f"{dora}.scales", f"{dora}.weight"]
    assert ref[f"{dora}.scales"].dtype == mx.float32
    assert got[f"{dora}.scales"].dtype == model_tensors(half_llama)[f"{dora}.scales"].dtype != mx.float32
    # the same fused weight up to one quantization step (two grids, each rounding to its own)
    w_ref = mx.dequantize(ref[f"{dora}.weight"], ref[f"{dora}.scales"], ref[f"{dora}.biases"], group_size=64, bits=4)
    w_got = mx.dequantize(got[f"{dora}.weight"], got[f"{dora}.scales"], got[f"{dora}.biases"], group_size=64, bits=4)
    step = mx.abs(ref[f"{dora}.scales"]).max().item()
    assert mx.abs(w_ref - w_got.astype(mx.float32)).max().item() <= 1.01 * step


def test_bf16_adapter_is_multiplied_in_float32(fuse_work, tiny_moe_dir):
    adapter = make_adapter(tiny_moe_dir, fuse_work / "dev_f32", keys=[DOWN, "self_attn.q_proj"], b_std=5e-3)
    bf16 = shutil.copytree(adapter, fuse_work / "dev_bf16")
    weights = {k: v.astype(mx.bfloat16) for k, v in mx.load(str(adapter / "adapters.safetensors")).items()}
    mx.save_safetensors(str(bf16 / "adapters.safetensors"), weights, metadata={"format": "mlx"})
    widened = shutil.copytree(adapter, fuse_work / "dev_widened")
    mx.save_safetensors(str(widened / "adapters.safetensors"),
                        {k: v.astype(mx.float32) for k, v in weights.items()}, metadata={"format": "mlx"})

    got = model_tensors(fuse_model(tiny_moe_dir, bf16, fuse_work / "dev_bf16_pyfuse").save_path)
    assert differing(model_tensors(mlx_fuse(tiny_moe_dir, widened, fuse_work / "dev_widened_mlx")), got) == []
    # mlx-lm on the bf16 tensors themselves multiplies in bf16: other bytes
    assert differing(model_tensors(mlx_fuse(tiny_moe_dir, bf16, fuse_work / "dev_bf16_mlx")), got)
