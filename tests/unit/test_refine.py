"""``pyfuse.refine_grid`` against ``mx.dequantize`` (the oracle: every
dequantized weight bit-identical), its refusals, and ``pyfuse fuse
--requant-bits`` on a grid-keeping policy using it (a zero adapter leaves every
dequantized weight and the greedy output as they were)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import pyfuse
from pyfuse.fuse import fuse_model
from pyfuse.kernel.reference import unpack_codes
from pyfuse.kernel.refine import refinement_shift

from helpers import DOWN, GATE, identical, make_adapter, model_tensors, read_json

BITS = (2, 3, 4, 5, 6, 8)


def quantized(shape, dtype, group_size, bits, seed=0, std=0.02):
    w = np.random.default_rng(seed).normal(0, std, size=shape).astype(np.float32)
    return mx.quantize(mx.array(w).astype(dtype), group_size=group_size, bits=bits)


@pytest.mark.parametrize("dtype", (mx.bfloat16, mx.float16, mx.float32), ids=str)
@pytest.mark.parametrize("bits,to_bits", [(b, t) for b in BITS for t in BITS if t >= b])
def test_refined_grid_dequantizes_bit_for_bit(dtype, bits, to_bits):
    w, s, b = quantized((3, 8, 256), dtype, 64, bits, seed=bits)
    inputs = [mx.array(np.array(w))] + [mx.array(np.array(x.astype(mx.float32))) for x in (s, b)]
    w2, s2, b2 = pyfuse.refine_grid(w, s, b, group_size=64, bits=bits, to_bits=to_bits, headroom=True)
    kept_inputs = (w, s.astype(mx.float32), b.astype(mx.float32))
    assert all(mx.array_equal(x, y).item() for x, y in zip(kept_inputs, inputs))  # inputs never modified
    assert w2.shape == (3, 8, 256 * to_bits // 32) and s2.dtype == dtype and b2.dtype == dtype
    assert identical(mx.dequantize(w2, s2, b2, group_size=64, bits=to_bits),
                     mx.dequantize(w, s, b, group_size=64, bits=bits))
    m = refinement_shift(bits, to_bits, 64)
    assert ((1 << bits) - 1) << m <= (1 << to_bits) - 1 < ((1 << bits) - 1) << (m + 1)
    # the codes are the old ones times 2^m plus one shift k per group within
    # the spare codes; the bias is kept where k = 0
    spare = (1 << to_bits) - 1 - (((1 << bits) - 1) << m)
    k = (np.asarray(unpack_codes(w2, 64, to_bits)) - np.asarray(unpack_codes(w, 64, bits)) * (1 << m))
    k = k.reshape(*s.shape, 64)
    assert np.all(k == k[..., :1]) and k.min() >= 0 and k.max() <= spare
    kept = k[..., 0] == 0
    raw = lambda x: np.asarray(x.astype(mx.float32))  # noqa: E731  (exact for bf16/f16/f32)
    assert np.array_equal(raw(b2)[kept], raw(b)[kept])
    if spare >= 3:  # head-room is found for some groups, and none is found for no reason
        assert (~kept).any()
    # without head-room (the default): the codes times 2^m and the bias kept, exactly
    w3, s3, b3 = pyfuse.refine_grid(w, s, b, group_size=64, bits=bits, to_bits=to_bits)
    assert mx.array_equal(unpack_codes(w3, 64, to_bits), unpack_codes(w, 64, bits) * (1 << m)).item()
    assert identical(b3, b) and identical(s3, s2)
    assert identical(mx.dequantize(w3, s3, b3, group_size=64, bits=to_bits),
                     mx.dequantize(w, s, b, group_size=64, bits=bits))


@pytest.mark.parametrize("to_group_size", (32, 64))
def test_smaller_group_size_dividing_the_old_one(to_group_size):
    w, s, b = quantized((16, 256), mx.bfloat16, 128, 3)
    out = pyfuse.refine_grid(w, s, b, group_size=128, bits=3, to_bits=8, to_group_size=to_group_size)
    assert out[1].shape == (16, 256 // to_group_size)
    assert identical(mx.dequantize(*out, group_size=to_group_size, bits=8),
                     mx.dequantize(w, s, b, group_size=128, bits=3))


def test_refusals_say_why():
    w, s, b = quantized((4, 128), mx.float16, 64, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        pyfuse.refine_grid(w, s, b, group_size=64, bits=4, to_bits=3)
    with pytest.raises(ValueError, match="straddle"):
        pyfuse.refine_grid(w, s, b, group_size=64, bits=4, to_bits=8, to_group_size=128)
    with pytest.raises(ValueError, match="to_bits=7 is not supported"):
        pyfuse.refine_grid(w, s, b, group_size=64, bits=4, to_bits=7)
    # float16 scales so small that s / 16 is subnormal: inexact, refused
    tiny = quantized((4, 128), mx.float16, 64, 4, std=1e-4)
    with pytest.raises(ValueError, match="underflow"):
        pyfuse.refine_grid(*tiny, group_size=64, bits=4, to_bits=8)


def _greedy(model_dir, prompt=(1, 2, 3, 4), steps=8):
    from mlx_lm import load

    model, _ = load(str(model_dir))
    tokens = list(prompt)
    for _ in range(steps):
        logits = model(mx.array([tokens]))
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
    return tokens


@pytest.mark.parametrize("policy,headroom", (("preserve", False), ("stochastic", False), ("preserve", True)))
def test_requant_bits_zero_adapter_refines_exactly(fuse_work, tiny_moe_dir, policy, headroom):
    adapter = make_adapter(tiny_moe_dir, fuse_work / f"refine_zero_{policy}_{headroom}", keys=[DOWN, GATE],
                           b_std=0.0)
    res = fuse_model(tiny_moe_dir, adapter, fuse_work / f"refine_zero_{policy}_{headroom}_8", policy=policy,
                     requant_bits=8, refine_headroom=headroom)
    assert {r["base_grid"] for r in res.report["tensors"]} == {"refined"}
    base, got = model_tensors(tiny_moe_dir), model_tensors(res.save_path)
    cfg = read_json(res.save_path / "config.json")
    moved = []
    for path in res.fused:
        q = cfg["quantization"][path]
        assert q["bits"] == 8
        assert identical(mx.dequantize(got[f"{path}.weight"], got[f"{path}.scales"], got[f"{path}.biases"],
                                       group_size=q["group_size"], bits=8),
                         mx.dequantize(base[f"{path}.weight"], base[f"{path}.scales"], base[f"{path}.biases"],
                                       group_size=64, bits=3))
        moved.append(not identical(got[f"{path}.biases"], base[f"{path}.biases"]))
    assert any(moved) == headroom  # head-room moves biases (exactly), the plain refinement none
    assert _greedy(res.save_path) == _greedy(tiny_moe_dir)


def test_requant_bits_refined_keeps_a_small_delta(fuse_work, tiny_moe_dir):
    """A delta well under half a 3-bit step: preserve at 3 bits rounds it
    away; refined to 8 bits (32x finer steps) it survives."""
    adapter = make_adapter(tiny_moe_dir, fuse_work / "refine_small", keys=[DOWN], b_std=2e-4)
    same = fuse_model(tiny_moe_dir, adapter, fuse_work / "refine_small_3", policy="preserve").summary
    fine = fuse_model(tiny_moe_dir, adapter, fuse_work / "refine_small_8", policy="preserve",
                      requant_bits=8).summary
    assert same["retention"] < 0.5 < 0.9 < fine["retention"]
