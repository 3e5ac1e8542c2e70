"""pyfuse.kernel.fidelity's figures (native sums and the pure-MLX fallback) against
a direct numpy computation from the definitions."""

import mlx.core as mx
import numpy as np
import pytest

import pyfuse
from pyfuse.kernel import fidelity, native as _native
from pyfuse.kernel.reference import fuse_requant_reference, unpack_codes


def numpy_figures(old, new, a, b, scale, group_size, bits):
    def grid(w, s, bias):
        # The grid values in float32, as a model dequantizing with float32
        # scales sees them (q * s rounded, then + bias rounded).
        q = np.array(unpack_codes(w, group_size, bits), dtype=np.float32)
        rep = lambda x: np.repeat(np.array(x.astype(mx.float32)), group_size, -1)  # noqa: E731
        return q.astype(np.float64), ((q * rep(s)).astype(np.float32) + rep(bias)).astype(np.float64)

    q0, w0 = grid(*old)
    q1, w1 = grid(*new)
    change = w1 - w0
    delta = scale * np.einsum("...or,...ri->...oi", np.array(b, np.float64), np.array(a, np.float64))
    r = (change * delta).sum() / (delta * delta).sum()
    return dict(delta_norm=np.linalg.norm(delta), change_norm=np.linalg.norm(change), retention=r,
                noise=np.linalg.norm(change - r * delta) / np.linalg.norm(delta),
                weights_changed=(w0 != w1).mean(), codes_changed=(q0 != q1).mean(),
                rel_error=np.linalg.norm(change) / np.linalg.norm(w0), max_abs=np.abs(change).max(),
                groups_refit=int((np.array(old[1] != new[1]) | np.array(old[2] != new[2])).sum()))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("bits,group_size,dtype", [(3, 64, mx.bfloat16), (4, 32, mx.float16), (8, 128, mx.float32)])
def test_figures_match_numpy(native, bits, group_size, dtype, monkeypatch):
    if native and not pyfuse.native_available():
        pytest.skip("native extension unavailable")
    if not native:
        monkeypatch.setattr(_native, "ext", None)
    rng = np.random.default_rng(bits)
    w, s, b = mx.quantize(mx.array(rng.normal(0, 0.02, (3, 32, 256)).astype(np.float32)).astype(dtype),
                          group_size=group_size, bits=bits)
    a = mx.array(rng.normal(0, 0.01, (3, 2, 256)).astype(np.float32))
    bb = mx.array(rng.normal(0, 0.01, (3, 32, 2)).astype(np.float32))
    new = fuse_requant_reference(w, s, b, a, bb, scale=3.0, group_size=group_size, bits=bits)
    got = fidelity.tensor_fidelity((w, s, b), new, a, bb, scale=3.0, group_size=group_size, bits=bits,
                                   chunk_elements=2000)
    want = numpy_figures((w, s, b), new, a, bb, 3.0, group_size, bits)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-4, abs=1e-12), key
    # A zero delta has no retention: undefined, not a number.
    zero = fidelity.tensor_fidelity((w, s, b), new, group_size=group_size, bits=bits)
    assert zero.retention is None and zero.noise is None and zero.delta_norm == 0


def _dequant64(w, s, b, q):
    return np.array(mx.dequantize(w, s, b, group_size=q.group_size, bits=q.bits).astype(mx.float32),
                    dtype=np.float64)


@pytest.mark.parametrize("q_out_bits, q_out_group", [(3, 64), (8, 32), (None, None)],
                         ids=["same_grid", "requant_8bit_g32", "dequantized"])
def test_general_fidelity_matches_numpy_for_dora(q_out_bits, q_out_group):
    """The fuse report's figures for DoRA (target = the exact rescaled fused
    weight), other precisions and float outputs, from the definitions."""
    from pyfuse.fuse.compute import dequantize, dora_rescale, quantize
    from pyfuse.fuse.plan import Job
    from pyfuse.fuse.report import general_fidelity
    from pyfuse.io.model_dir import QParams

    rng = np.random.default_rng(0)
    q_in = QParams(3, 64)
    q_out = None if q_out_bits is None else QParams(q_out_bits, q_out_group)
    old = mx.quantize(mx.array(rng.normal(0, 0.02, (48, 128)).astype(np.float32)), group_size=64, bits=3)
    a = mx.array(rng.normal(0, 0.05, (2, 128)).astype(np.float32))
    b = mx.array(rng.normal(0, 0.05, (48, 2)).astype(np.float32))
    m = mx.array(rng.uniform(0.2, 0.3, (48,)).astype(np.float32))
    scale = 2.0
    fused = dora_rescale(dequantize(*old, q_in) + scale * (b @ a), m)
    new = (fused,) + (None, None) if q_out is None else quantize(fused, q_out)
    job = Job(path="layer", kind="linear", quantized=True, q_in=q_in, q_out=q_out, dtype="F32",
              a=a, b=b, in_dims=128)
    got = general_fidelity(job, scale, old, new, m)

    before = _dequant64(*old, q_in)
    after = np.array(new[0], np.float64) if q_out is None else _dequant64(*new, q_out)
    target = before + scale * np.array(b, np.float64) @ np.array(a, np.float64)
    target *= (np.array(m, np.float64) / np.linalg.norm(target, axis=-1))[:, None]
    d, change = target - before, after - before
    r = (change * d).sum() / (d * d).sum()
    want = dict(delta_norm=np.linalg.norm(d), change_norm=np.linalg.norm(change), retention=r,
                noise=np.linalg.norm(change - r * d) / np.linalg.norm(d),
                weights_changed=(before != after).mean(), rel_error=np.linalg.norm(change) / np.linalg.norm(before),
                max_abs=np.abs(change).max(),
                groups=None if q_out is None else 48 * 128 // q_out.group_size)
    if q_out == q_in:
        codes = lambda x: np.array(unpack_codes(x, 64, 3))  # noqa: E731
        want["codes_changed"] = (codes(old[0]) != codes(new[0])).mean()
        want["groups_refit"] = int((np.array(old[1] != new[1]) | np.array(old[2] != new[2])).sum())
    else:
        want["codes_changed"] = want["groups_refit"] = None
    assert set(got) == set(want)
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
            continue
        # noise comes from float32 sums, sqrt(cc/dd - r^2): ~1e-5 of the delta near r = 1
        tol = dict(abs=1e-4) if key == "noise" else dict(rel=1e-4, abs=1e-9)
        assert got[key] == pytest.approx(value, **tol), key
