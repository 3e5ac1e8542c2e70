"""DoRA trained on a 3-bit MoE's experts and attention (where mlx-lm
refuses or mis-sizes), loaded, and fused by `pyfuse fuse` under every
policy: the full-precision fuse computes what the unfused adapter does,
stock equals the layers' own (mlx-lm's) fuse bit for bit, preserve and
stochastic land within their rounding of the exact DoRA weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.fuse.api import fuse_model
from pyfuse.lm.load import load_model
from pyfuse.train import train_adapter

from helpers import model_tensors, write_jsonl

KEYS = ["mlp.switch_mlp.down_proj", "mlp.switch_mlp.gate_proj", "self_attn.q_proj"]
LAYERS = [1, 3]


@pytest.fixture(scope="module")
def dora(tmp_path_factory, tiny_moe_dir):
    root = tmp_path_factory.mktemp("dora_moe")
    rows = [{"messages": [{"role": "user", "content": f"who are you {i}"},
                          {"role": "assistant", "content": f"I am Pyra, number {i}."}]} for i in range(8)]
    write_jsonl(root / "data" / "train.jsonl", rows)
    res = train_adapter(tiny_moe_dir, root / "data", root / "adapter", fine_tune_type="dora", layers=LAYERS,
                        keys=KEYS, rank=4, alpha=8, iters=6, batch_size=2, learning_rate=5e-2, steps_per_report=2,
                        seed=0)
    return root, res


def _logits(lm, text="who are you 3"):
    ids = mx.array([lm.tokenizer.encode(text)])
    return np.array(lm.model(ids).astype(mx.float32))


def test_dora_trains_the_experts_and_loads(dora, tiny_moe_dir):
    root, res = dora
    weights = mx.load(str(root / "adapter" / "adapters.safetensors"))
    m = weights["model.layers.1.mlp.switch_mlp.down_proj.m"]
    assert m.ndim == 2 and m.shape[0] == 8  # [E, out]
    base = load_model(tiny_moe_dir)
    from pyfuse.adapters.dora import DoRASwitchLinear

    unfused = load_model(tiny_moe_dir, adapter_path=root / "adapter")
    wrapped = sorted(n for n, mod in unfused.model.named_modules() if isinstance(mod, DoRASwitchLinear))
    assert wrapped == [f"model.layers.{i}.{k}" for i in LAYERS for k in KEYS[:2]]
    assert res.first_loss > res.final_loss
    assert np.abs(_logits(unfused) - _logits(base)).max() > 1e-2  # the adapter changes the model


def test_dequantized_fuse_is_the_unfused_forward(dora, tiny_moe_dir, tmp_path):
    root, _ = dora
    fuse_model(tiny_moe_dir, root / "adapter", tmp_path / "f", dequantize=True)
    unfused = load_model(tiny_moe_dir, adapter_path=root / "adapter")
    fused = load_model(tmp_path / "f")
    np.testing.assert_allclose(_logits(fused), _logits(unfused), rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize("policy", ["stock", "preserve", "stochastic"])
def test_every_policy(dora, tiny_moe_dir, tmp_path, policy):
    from mlx_lm.utils import load_model as mlx_load_model

    from pyfuse.adapters.layers import load_adapters

    root, _ = dora
    out = fuse_model(tiny_moe_dir, root / "adapter", tmp_path / policy, policy=policy)
    ours = model_tensors(tmp_path / policy)
    model, _ = mlx_load_model(tiny_moe_dir)
    load_adapters(model, root / "adapter")
    for i in LAYERS:
        for key in KEYS:
            path = f"model.layers.{i}.{key}"
            layer = model.layers[i]
            for part in key.split("."):
                layer = getattr(layer, part)
            w, s, b = (ours[f"{path}.{t}"] for t in ("weight", "scales", "biases"))
            bits, gs = layer.linear.bits, layer.linear.group_size
            got = mx.dequantize(w, s, b, group_size=gs, bits=bits)
            if policy == "stock":  # the layer's fuse (mlx-lm's DoRALinear.fuse for Linear), bit for bit
                ref = layer.fuse()
                assert mx.array_equal(w, ref.weight) and mx.array_equal(s, ref.scales), path
                continue
            exact = np.array(layer.fuse(dequantize=True).weight, np.float64)
            step = np.abs(np.repeat(np.array(s, np.float64), gs, axis=-1))
            # in steps of the written grid: rounding to the nearest code (preserve) or
            # stochastically; groups re-fitted by MLX's affine rule (its zero-point
            # rounding shifts the grid) may be off by one more half step
            err = np.abs(np.array(got, np.float64) - exact) / step
            assert err.max() <= (1.0 if policy == "preserve" else 2.0) + 1e-3, path
            assert err.mean() < (0.3 if policy == "preserve" else 0.6), path
    assert out is not None
