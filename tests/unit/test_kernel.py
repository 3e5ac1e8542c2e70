"""The native FuseRequant kernel against independent oracles: the pure-MLX
reference, mlx-lm's own LoRA/DoRA fuse, numpy ports of MLX's quantizers,
and the Metal kernel source run over a simulated grid."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

import pyfuse
from pyfuse.kernel import native as _native
from pyfuse.kernel.reference import fuse_requant_reference, unpack_codes

pytestmark = pytest.mark.skipif(not pyfuse.native_available(),
                                reason=f"native extension unavailable: {_native.unavailable_reason}")

# Every CPU kernel build this processor runs (baseline, AVX2, AVX-512 on
# x86-64): each test below runs once per build, so that the builds the
# automatic choice would skip here are checked too.
CPU_BUILDS = _native.ext.cpu_kernels()["available"] if pyfuse.native_available() else ["none"]


@pytest.fixture(autouse=True, params=CPU_BUILDS)
def cpu_build(request):
    if request.param != "none":
        _native.ext.set_cpu_kernels(request.param)
    yield request.param
    if request.param != "none":
        _native.ext.set_cpu_kernels("auto")


def test_cpu_kernel_builds_are_selectable(cpu_build):
    kernels = _native.ext.cpu_kernels()
    assert kernels["available"][0] == "baseline"
    assert kernels["active"] == cpu_build
    with pytest.raises(ValueError, match="supported: auto, baseline"):
        _native.ext.set_cpu_kernels("no-such-build")
    assert _native.ext.cpu_kernels()["active"] == cpu_build  # a refused name changes nothing
    _native.ext.set_cpu_kernels("auto")
    assert _native.ext.cpu_kernels()["active"] == kernels["available"][-1]


BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = (mx.bfloat16, mx.float16, mx.float32)
POLICIES = ("stock", "preserve", "stochastic")


def realistic(shape, dtype, seed, std=0.02, heavy_tail=False):
    """Normal(0, std) weights (or Student-t for heavy tails) in `dtype`:
    uniform or tiny weights would hide re-quantization drift."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=shape) * std / np.sqrt(2) if heavy_tail else rng.normal(0, std, size=shape)
    return mx.array(w.astype(np.float32)).astype(dtype)


def quantized(shape, dtype, group_size, bits, seed=0, heavy_tail=False):
    return mx.quantize(realistic(shape, dtype, seed, heavy_tail=heavy_tail), group_size=group_size, bits=bits)


def lora(lead, out_dims, in_dims, rank, seed, std=0.01):
    rng = np.random.default_rng(seed + 1000)
    a = mx.array(rng.normal(0, std, size=(*lead, rank, in_dims)).astype(np.float32))
    b = mx.array(rng.normal(0, std, size=(*lead, out_dims, rank)).astype(np.float32))
    return a, b


def same(x, y):
    return all(mx.array_equal(p, q).item() and p.dtype == q.dtype for p, q in zip(x, y))


# Shapes: Linear (no leading dim), odd expert counts, non-square, ranks 1..64.
SHAPES = [((), 48, 256, 1), ((3,), 40, 128, 2), ((5,), 24, 384, 7), ((1,), 16, 512, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_stock_matches_mlx_reference_bit_for_bit(dtype, bits, group_size):
    for i, (lead, out_dims, in_dims, rank) in enumerate(SHAPES):
        if in_dims % group_size:
            continue
        w, s, b = quantized((*lead, out_dims, in_dims), dtype, group_size, bits, seed=i, heavy_tail=i % 2 == 1)
        a, bb = lora(lead, out_dims, in_dims, rank, seed=i)
        kw = dict(scale=2.0, group_size=group_size, bits=bits, policy="stock")
        got = pyfuse.fuse_requant(w, s, b, a, bb, **kw)
        want = fuse_requant_reference(w, s, b, a, bb, **kw)
        assert same(got, want), (lead, out_dims, in_dims, rank)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_preserve_and_stochastic_match_reference(dtype, bits, group_size):
    w, s, b = quantized((3, 32, 256), dtype, group_size, bits, seed=bits)
    # A delta large enough to push some groups out of range (re-fits).
    a, bb = lora((3,), 32, 256, 4, seed=bits, std=0.05)
    for policy in ("preserve", "stochastic"):
        kw = dict(scale=1.5, group_size=group_size, bits=bits, policy=policy, seed=7)
        assert same(pyfuse.fuse_requant(w, s, b, a, bb, **kw), fuse_requant_reference(w, s, b, a, bb, **kw))


def mlx_lm_fuse(linear, a, b, scale):
    """mlx-lm's own fuse of a LoRA on `linear` (QuantizedLinear or
    QuantizedSwitchLinear), with pyfuse's kernel-layout factors."""
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    if a.ndim == 2:
        layer = LoRALinear.from_base(linear, r=a.shape[0], scale=scale)
        layer.lora_a, layer.lora_b = a.T, b.T  # mlx-lm: lora_a [in, r], lora_b [r, out]
    else:
        layer = LoRASwitchLinear.from_base(linear, r=a.shape[1], scale=scale)
        layer.lora_a, layer.lora_b = a, b  # [E, r, in], [E, out, r]
    fused = layer.fuse()
    return fused.weight, fused.scales, fused.biases


@pytest.mark.parametrize("bits,group_size", [(3, 64), (4, 32), (8, 128), (2, 64), (6, 32)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stock_matches_mlx_lm_fuse(bits, group_size, dtype):
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    # SwitchLinear: every expert in one call.
    sw = SwitchLinear(256, 48, 5, bias=False)
    sw.weight = realistic((5, 48, 256), dtype, seed=1)
    qsw = QuantizedSwitchLinear.from_switch_linear(sw, group_size, bits) if hasattr(
        QuantizedSwitchLinear, "from_switch_linear") else sw.to_quantized(group_size=group_size, bits=bits)
    a, b = lora((5,), 48, 256, 2, seed=2)
    want = mlx_lm_fuse(qsw, a, b, scale=10.0)
    got = pyfuse.fuse_requant(qsw.weight, qsw.scales, qsw.biases, a, b, scale=10.0,
                              group_size=group_size, bits=bits)
    assert same(got, want)

    # Linear.
    lin = nn.Linear(256, 48, bias=False)
    lin.weight = realistic((48, 256), dtype, seed=3)
    qlin = nn.QuantizedLinear.from_linear(lin, group_size, bits)
    a, b = lora((), 48, 256, 8, seed=4)
    want = mlx_lm_fuse(qlin, a, b, scale=2.0)
    got = pyfuse.fuse_requant(qlin.weight, qlin.scales, qlin.biases, a, b, scale=2.0,
                              group_size=group_size, bits=bits)
    assert same(got, want)


def test_dora_stock_matches_mlx_lm_dora_fuse():
    import mlx.nn as nn
    from mlx_lm.tuner.dora import DoRALinear

    lin = nn.Linear(256, 32, bias=False)
    lin.weight = realistic((32, 256), mx.float32, seed=5)
    qlin = nn.QuantizedLinear.from_linear(lin, 64, 4)
    layer = DoRALinear.from_base(qlin, r=4, scale=2.0)
    a, b = lora((), 32, 256, 4, seed=6)
    layer.lora_a, layer.lora_b = a.T, b.T
    layer.m = layer.m * mx.array(np.linspace(0.9, 1.1, 32).astype(np.float32))
    fused = layer.fuse()
    got = pyfuse.fuse_requant(qlin.weight, qlin.scales, qlin.biases, a, b, scale=2.0, group_size=64,
                              bits=4, magnitude=layer.m)
    # The row norms are float32 sums in different orders (mlx-lm:
    # mx.linalg.norm), so a code may differ where a value sits on a rounding
    # boundary; the grids must agree to float32 precision.
    assert mx.array_equal(got[0], fused.weight).item() or \
        (got[0] != fused.weight).sum().item() <= 2
    np.testing.assert_allclose(np.array(got[1]), np.array(fused.scales), rtol=1e-5)
    np.testing.assert_allclose(np.array(got[2]), np.array(fused.biases), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("poison", ["nan-payloads", "inf-minus-inf"])
def test_stock_matches_reference_with_nan_and_inf_in_the_lora(dtype, poison):
    """NaNs in the delta reach the roundings: NaNs with payloads in `a` (the
    kernels then check every rounding; the check-free rounding would turn
    such a NaN into a number), and default NaNs from inf - inf (which the
    check-free rounding keeps NaN): the bytes equal MLX's either way."""
    w, s, b = quantized((3, 64, 256), dtype, 64, 3, seed=5)
    a, bb = (np.array(x) for x in lora((3,), 64, 256, 4, seed=5))
    if poison == "nan-payloads":
        a.view(np.uint32)[0, 1, 5] = 0x7FFFFFFF  # +NaN, every payload bit set
        a.view(np.uint32)[1, 2, 7] = 0xFF800001  # -NaN, signalling, low payload
    else:
        a[0, 0, 9], a[0, 1, 9] = np.inf, -np.inf
        bb[0, :, :2] = 1.0
    args = (w, s, b, mx.array(a), mx.array(bb))
    kw = dict(group_size=64, bits=3, policy="stock")
    out = pyfuse.fuse_requant(*args, **kw)
    assert not mx.all(mx.isfinite((mx.array(bb) @ mx.array(a))[:2])).item()  # the poison reaches the delta
    assert same(out, fuse_requant_reference(*args, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_zero_delta_preserve_and_stochastic_return_inputs_bit_for_bit(dtype, bits):
    for group_size in GROUP_SIZES:
        w, s, b = quantized((3, 16, 256), dtype, group_size, bits, seed=bits, heavy_tail=True)
        a, bb = lora((3,), 16, 256, 2, seed=0)
        for policy in ("preserve", "stochastic"):
            out = pyfuse.fuse_requant(w, s, b, a, bb * 0, group_size=group_size, bits=bits, policy=policy)
            assert same(out, (w, s, b)), (group_size, policy)
        # DoRA with the magnitudes the model already has: still exact.
        m = mx.linalg.norm(mx.dequantize(w, s, b, group_size=group_size, bits=bits).astype(mx.float32), axis=-1)
        out = pyfuse.fuse_requant(w, s, b, a, bb * 0, group_size=group_size, bits=bits, policy="preserve",
                                  magnitude=m)
        assert same(out, (w, s, b)), ("dora", group_size)


def test_zero_delta_stochastic_exact_at_scale():
    # floor(q + u) in float32 would round up for u within float spacing of
    # 1 (a few codes per million at 8 bits): 2M weights at 8 bits must still
    # come back bit for bit, in the kernel and in the reference.
    w, s, b = quantized((8, 512, 512), mx.bfloat16, 64, 8, seed=21)
    a, bb = lora((8,), 512, 512, 1, seed=21)
    kw = dict(group_size=64, bits=8, policy="stochastic", seed=123)
    assert same(pyfuse.fuse_requant(w, s, b, a, bb * 0, **kw), (w, s, b))
    assert same(fuse_requant_reference(w, s, b, a, bb * 0, **kw), (w, s, b))


def test_stock_zero_delta_is_not_idempotent_like_mlx():
    # The reason `preserve` exists: MLX's own round trip changes weights.
    w, s, b = quantized((4, 64, 512), mx.bfloat16, 64, 4, seed=3)
    a, bb = lora((4,), 64, 512, 2, seed=3)
    out = pyfuse.fuse_requant(w, s, b, a, bb * 0, group_size=64, bits=4)
    roundtrip = mx.quantize(mx.dequantize(w, s, b, group_size=64, bits=4), group_size=64, bits=4)
    assert same(out, roundtrip)
    assert not mx.array_equal(out[0], w).item()


def _grid_numpy(w, s, b, group_size, bits):
    codes = np.array(unpack_codes(w, group_size, bits), dtype=np.float64)
    sf = np.repeat(np.array(s.astype(mx.float32), dtype=np.float64), group_size, axis=-1)
    bf = np.repeat(np.array(b.astype(mx.float32), dtype=np.float64), group_size, axis=-1)
    return codes, sf, bf


@pytest.mark.parametrize("bits", BITS)
def test_preserve_error_within_half_step_and_refits_counted(bits):
    group_size = 32
    w, s, b = quantized((2, 32, 256), mx.bfloat16, group_size, bits, seed=bits)
    a, bb = lora((2,), 32, 256, 3, seed=bits, std=0.04)  # some groups leave the range
    new = pyfuse.fuse_requant(w, s, b, a, bb, group_size=group_size, bits=bits, policy="preserve")
    q0, s0, b0 = _grid_numpy(w, s, b, group_size, bits)
    q1, s1, b1 = _grid_numpy(*new, group_size, bits)
    delta = np.array(a.transpose(0, 2, 1) @ bb.transpose(0, 2, 1)).transpose(0, 2, 1).astype(np.float64)
    target = q0 * s0 + b0 + delta
    got = q1 * s1 + b1
    # Independent refit prediction: a group re-fits iff a rounded code leaves [0, 2^bits - 1].
    steps = np.rint(q0 + delta / s0)
    out_of_range = ((steps < 0) | (steps > 2**bits - 1)).reshape(*steps.shape[:-1], -1, group_size).any(-1)
    grid_changed = (np.array(new[1] != s) | np.array(new[2] != b))
    assert out_of_range.sum() > 0
    # Groups in range keep their grid; re-fitted ones get MLX's fit of the
    # new values (which may, rarely, land on the same grid).
    assert not (grid_changed & ~out_of_range).any()
    assert grid_changed[out_of_range].mean() > 0.5
    keep = ~np.repeat(out_of_range, group_size, axis=-1)
    err = np.abs(got - target)[keep] / np.abs(s0[keep])
    assert err.max() <= 0.5 + 1e-4


def test_stochastic_deterministic_per_seed_and_unbiased():
    group_size, bits = 64, 3
    w, s, b = quantized((2, 16, 128), mx.float32, group_size, bits, seed=11)
    a, bb = lora((2,), 16, 128, 2, seed=11, std=0.01)
    kw = dict(scale=1.0, group_size=group_size, bits=bits, policy="stochastic")
    first = pyfuse.fuse_requant(w, s, b, a, bb, seed=1, **kw)
    assert same(first, pyfuse.fuse_requant(w, s, b, a, bb, seed=1, **kw))
    assert not mx.array_equal(first[0], pyfuse.fuse_requant(w, s, b, a, bb, seed=2, **kw)[0]).item()

    q0, s0, b0 = _grid_numpy(w, s, b, group_size, bits)
    delta = np.array((bb @ a)).astype(np.float64)
    seeds = 400
    total = np.zeros_like(q0)
    for seed in range(seeds):
        q1, s1, b1 = _grid_numpy(*pyfuse.fuse_requant(w, s, b, a, bb, seed=seed, **kw), group_size, bits)
        total += (q1 * s1 + b1) - (q0 * s0 + b0)
    mean_change = total / seeds
    # Unbiased: the mean change is the delta, up to the sampling error of a
    # Bernoulli step (<= step / 2 / sqrt(seeds)) on each weight...
    step = np.abs(s0)
    z = (mean_change - delta) / (0.5 * step / np.sqrt(seeds))
    assert np.abs(z).mean() < 1.0
    # ...while nearest rounding (preserve) keeps almost nothing of it.
    qp, sp, bp = _grid_numpy(*pyfuse.fuse_requant(w, s, b, a, bb, group_size=group_size, bits=bits,
                                                  policy="preserve"), group_size, bits)
    kept_preserve = ((qp * sp + bp) - (q0 * s0 + b0)).ravel() @ delta.ravel() / (delta.ravel() @ delta.ravel())
    kept_stochastic = mean_change.ravel() @ delta.ravel() / (delta.ravel() @ delta.ravel())
    assert abs(kept_stochastic - 1) < 0.1
    assert kept_preserve < 0.5


def test_bad_arguments_raise_value_error_not_crash():
    w, s, b = quantized((2, 16, 128), mx.bfloat16, 64, 4)
    a, bb = lora((2,), 16, 128, 2, seed=0)
    bad_calls = [
        (dict(bits=7), "bits=7"),
        (dict(group_size=48), "group_size=48"),
        (dict(policy="nearest"), "policy"),
        (dict(a=a[:, :1]), "rank mismatch"),
        (dict(b=bb[:, :8]), "b "),
        (dict(w=w.astype(mx.int32)), "uint32"),
        (dict(scales=s.astype(mx.float32)), "biases dtype"),
        (dict(a=a[0]), "dims"),
        (dict(bits=8), "cover"),
        (dict(bits=3), "whole number"),
        (dict(magnitude=mx.ones((2, 3))), "magnitude"),
    ]
    for change, message in bad_calls:
        args = dict(w=w, scales=s, biases=b, a=a, b=bb, group_size=64, bits=4, policy="stock")
        args.update(change)
        with pytest.raises(ValueError, match=message):
            pyfuse.fuse_requant(args.pop("w"), args.pop("scales"), args.pop("biases"), args.pop("a"),
                                args.pop("b"), **args)
    # The native op checks on its own too (callers may reach it directly).
    with pytest.raises(ValueError, match=r"\[pyfuse.fuse_requant\].*supported: 2, 3, 4, 5, 6, 8"):
        _native.ext.fuse_requant(w, s, b, a, bb, bits=7)
    with pytest.raises(ValueError, match="rank mismatch"):
        _native.ext.fuse_requant(w, s, b, a[:, :1], bb, group_size=64, bits=4)
    with pytest.raises(ValueError, match="supported: stock, preserve, stochastic"):
        _native.ext.fuse_requant(w, s, b, a, bb, group_size=64, bits=4, policy="x")


# ----------------------------------------------------------------- Metal

def metal_affine_quantize_numpy(values, group_size, bits, dtype):
    """numpy port of MLX's Metal `affine_quantize` rule (kernels/quantized.h):
    max starts at 0, min at T's max, rounding half away from zero."""
    tmax = {mx.float32: np.finfo(np.float32).max, mx.float16: 65504.0, mx.bfloat16: 3.38953139e38}[dtype]
    v = values.reshape(-1, group_size).astype(np.float32)
    w_min = np.minimum(v.min(-1), np.float32(tmax))
    w_max = np.maximum(v.max(-1), np.float32(0))
    n_bins = np.float32(2**bits - 1)
    scale = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7)).astype(np.float32)
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.where(side, scale, -scale).astype(np.float32)
    edge = np.where(side, w_min, w_max).astype(np.float32)
    q0 = np.trunc(edge / scale + np.copysign(np.float32(0.5), edge / scale))  # round half away
    q0 = np.where(np.abs(edge / scale - np.trunc(edge / scale)) == 0.5, q0,
                  np.round(edge / scale)).astype(np.float32)
    scale = np.where(q0 == 0, scale, edge / q0).astype(np.float32)
    bias = np.where(q0 == 0, np.float32(0), edge).astype(np.float32)
    t = ((v - bias[:, None]) / scale[:, None]).astype(np.float32)
    codes = np.where(np.abs(t - np.trunc(t)) == 0.5, np.trunc(t) + np.sign(t), np.round(t))
    codes = np.clip(codes, 0, n_bins)
    return codes.reshape(values.shape), scale, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_metal_kernel_source_simulated_matches_cpu(dtype, bits, group_size):
    """The Metal kernel body, compiled as C++ through metal/metal_shim.h and
    run over a simulated grid, gives the CPU primitive's bytes: for stock
    with MLX's Metal quantizer rules, for preserve/stochastic exactly the
    CPU result (those policies are the same on every backend)."""
    w, s, b = quantized((3, 24, 256), dtype, group_size, bits, seed=bits + group_size)
    a, bb = lora((3,), 24, 256, 3, seed=bits, std=0.03)
    m = mx.linalg.norm(mx.dequantize(w, s, b, group_size=group_size, bits=bits).astype(mx.float32), axis=-1)
    for policy_id, policy in enumerate(POLICIES):
        for magnitude in (None, m * 1.05):
            inputs = [w, s, b, a, bb] + ([] if magnitude is None else [magnitude])
            sim = _native.ext.simulate_metal_fuse_requant(inputs, 1.5, group_size, bits, policy_id, 3)
            cpu_metal_rules = _native.ext.fuse_requant(
                w, s, b, a, bb, scale=1.5, group_size=group_size, bits=bits, policy=policy, seed=3,
                magnitude=magnitude, metal_rules=True)
            assert same(sim, cpu_metal_rules), (policy, magnitude is None)
            if policy != "stock":
                native = pyfuse.fuse_requant(w, s, b, a, bb, scale=1.5, group_size=group_size, bits=bits,
                                             policy=policy, seed=3, magnitude=magnitude)
                assert same(sim, native), policy


@pytest.mark.parametrize("bits,group_size", list(itertools.product((3, 4, 8), (32, 128))))
def test_metal_rules_match_numpy_port_of_mlx_metal_quantizer(bits, group_size):
    """Stock under Metal rules re-quantizes the stock fused values exactly as
    a numpy port of MLX's Metal affine_quantize does."""
    dtype = mx.float32  # float32 scales: the port needs no T rounding of the outputs
    w, s, b = quantized((2, 16, 256), dtype, group_size, bits, seed=5)
    a, bb = lora((2,), 16, 256, 2, seed=5)
    fused_values = np.array(mx.dequantize(w, s, b, group_size=group_size, bits=bits) + (bb @ a))
    codes, scale, bias = metal_affine_quantize_numpy(fused_values, group_size, bits, dtype)
    got = _native.ext.fuse_requant(w, s, b, a, bb, group_size=group_size, bits=bits, metal_rules=True)
    assert np.array_equal(np.array(unpack_codes(got[0], group_size, bits)), codes)
    assert np.array_equal(np.array(got[1]).ravel(), scale)
    assert np.array_equal(np.array(got[2]).ravel(), bias)
