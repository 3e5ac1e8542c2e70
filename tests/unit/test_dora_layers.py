"""pyfuse's DoRA layers: DoRASwitchLinear against a per-expert NumPy DoRA
(every bits and group size), its fuse against its own forward, DoRALinear
against mlx-lm's where mlx-lm sizes right (and sized right where mlx-lm
does not), and mlx-lm-style insertion and loading."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from pyfuse.adapters.dora import DoRALinear, DoRASwitchLinear
from pyfuse.options import SUPPORTED_BITS as BITS, SUPPORTED_GROUP_SIZES as GROUP_SIZES

E, OUT, IN, R = 4, 16, 128, 3


def _switch(bits, group_size, seed=0):
    mx.random.seed(seed)
    lin = SwitchLinear(IN, OUT, E, bias=True)
    lin.weight = mx.random.normal((E, OUT, IN)) * 0.05
    lin.bias = mx.random.normal((E, OUT)) * 0.1
    if bits is None:
        return lin
    return lin.to_quantized(group_size=group_size, bits=bits)


def _trained(layer, seed=1):
    """Non-zero factors and a moved magnitude, as after training."""
    mx.random.seed(seed)
    layer.lora_a = mx.random.normal(layer.lora_a.shape) * 0.1
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
    return layer


def _numpy_dora(layer, x, idx):
    """y[t, k] = m_e / ||W_e + s B_e A_e||_row * ((W_e + s B_e A_e) x_t) + bias_e, e = idx[t, k]."""
    lin = layer.linear
    w = np.array(lin.weight if "scales" not in lin else
                 mx.dequantize(lin.weight, lin.scales, lin.biases, group_size=lin.group_size, bits=lin.bits),
                 dtype=np.float64)
    adapted = w + layer.scale * np.array(layer.lora_b, np.float64) @ np.array(layer.lora_a, np.float64)
    k = np.array(layer.m, np.float64) / np.linalg.norm(adapted, axis=-1)
    xs, ids, bias = np.array(x, np.float64), np.array(idx), np.array(lin.bias, np.float64)
    out = np.zeros(ids.shape + (1, OUT))
    for t in np.ndindex(ids.shape):
        e = ids[t]
        out[t][0] = k[e] * (adapted[e] @ xs[t[:-1]][0, 0]) + bias[e]
    return out


@pytest.mark.parametrize("bits", [None, *BITS])
def test_switch_dora_forward_is_per_expert_dora(bits):
    for group_size in (GROUP_SIZES if bits else [None]):
        layer = _trained(DoRASwitchLinear.from_base(_switch(bits, group_size), r=R, scale=2.0))
        mx.random.seed(3)
        x = mx.random.normal((2, 5, 1, 1, IN))  # as SwitchGLU calls it: [B, L, 1, 1, in]
        idx = mx.random.randint(0, E, (2, 5, 2))
        got = np.array(layer(x, idx))
        np.testing.assert_allclose(got, _numpy_dora(layer, x, idx), rtol=2e-4, atol=2e-5)
        # the norm without dequantizing equals the dequantized one
        w = np.array(mx.dequantize(layer.linear.weight, layer.linear.scales, layer.linear.biases,
                                   group_size=group_size, bits=bits) if bits else layer.linear.weight, np.float64)
        direct = np.linalg.norm(w + 2.0 * np.array(layer.lora_b, np.float64) @ np.array(layer.lora_a, np.float64),
                                axis=-1)
        np.testing.assert_allclose(np.array(layer.adapted_norm()), direct, rtol=1e-4)


def test_switch_dora_starts_as_its_base_and_fuses_to_its_forward():
    base = _switch(3, 64)
    layer = DoRASwitchLinear.from_base(base, r=R, scale=2.0)
    assert layer.m.shape == (E, OUT) and layer.lora_a.shape == (E, R, IN) and layer.lora_b.shape == (E, OUT, R)
    x = mx.random.normal((3, 1, 1, IN))
    idx = mx.random.randint(0, E, (3, 2))
    np.testing.assert_allclose(np.array(layer(x, idx)), np.array(base(x, idx)), rtol=1e-5, atol=1e-6)
    _trained(layer)
    fused = layer.fuse(dequantize=True)
    assert isinstance(fused, SwitchLinear)
    np.testing.assert_allclose(np.array(fused(x, idx)), np.array(layer(x, idx)), rtol=1e-4, atol=1e-5)
    assert isinstance(layer.fuse(), QuantizedSwitchLinear)


@pytest.mark.parametrize("bits", BITS)
def test_dora_linear_sized_right_at_every_bits(bits):
    from mlx_lm.tuner.dora import DoRALinear as MlxDoRALinear

    lin = nn.QuantizedLinear(IN, OUT, bias=False, group_size=64, bits=bits)
    ours = DoRALinear.from_base(lin, r=R, scale=2.0)
    assert ours.lora_a.shape == (IN, R)
    theirs = MlxDoRALinear.from_base(lin, r=R, scale=2.0)
    if 32 % bits:  # mlx-lm's packed_width * (32 // bits) is short
        assert theirs.lora_a.shape[0] < IN
        return
    ours.lora_a, ours.lora_b = mx.random.normal((IN, R)), mx.random.normal((R, OUT)) * 0.1
    theirs.lora_a, theirs.lora_b, theirs.m = ours.lora_a, ours.lora_b, ours.m
    x = mx.random.normal((2, IN))
    assert mx.array_equal(ours(x), theirs(x))


def test_insertion_and_loading_like_mlx_lm(tiny_moe_dir, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from pyfuse.adapters.layers import load_adapters, to_adapter_layers

    model, _ = load_model(tiny_moe_dir)
    model.freeze()
    cfg = {"rank": 2, "scale": 1.0, "dropout": 0.0, "keys": ["mlp.switch_mlp.up_proj", "self_attn.q_proj"]}
    to_adapter_layers(model, 2, cfg, use_dora=True)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__.startswith("DoRA")}
    assert kinds == {f"model.layers.{i}.{k}": c for i in (2, 3)
                     for k, c in (("mlp.switch_mlp.up_proj", "DoRASwitchLinear"), ("self_attn.q_proj", "DoRALinear"))}
    weights = dict(tree_flatten(model.trainable_parameters()))
    assert {k.rsplit(".", 1)[1] for k in weights} == {"lora_a", "lora_b", "m"}  # the base stays frozen
    up = model.layers[2].mlp.switch_mlp.up_proj
    assert weights["model.layers.2.mlp.switch_mlp.up_proj.m"].shape == (up.num_experts, up.linear.output_dims)
    weights = {k: v + 0.01 for k, v in weights.items()}
    (tmp_path / "ad").mkdir()
    mx.save_safetensors(str(tmp_path / "ad" / "adapters.safetensors"), weights)
    import json

    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": cfg}))
    again, _ = load_model(tiny_moe_dir)
    load_adapters(again, tmp_path / "ad")
    loaded = dict(tree_flatten(again.parameters()))
    assert all(mx.array_equal(loaded[k], v) for k, v in weights.items())
