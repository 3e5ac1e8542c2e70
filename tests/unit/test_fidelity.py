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
