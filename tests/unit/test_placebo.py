"""The controls' adapters. Placebo: per module (per expert) the trained
delta's singular values (numpy's SVD of the full delta, the oracle) on
orthonormal directions that are random (Haar: E[Q Q^T] = (k/d) I, checked by
averaging) and unrelated to the trained ones; structure kept, deterministic
per seed and module. Dither: fusing the residual stochastically into the
stock fuse of a zero-delta adapter rounds every weight of the fused modules
onto the stock fuse's grid, to one of its two neighbouring codes, unbiased
over seeds (checked against the weights dequantized with MLX)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.adapters.dither import dither_residual
from pyfuse.adapters.placebo import placebo_adapter, random_frame
from pyfuse.adapters.zero import zero_adapter
from pyfuse.errors import UserError
from pyfuse.fuse import fuse_model
from pyfuse.io.safetensors import SafetensorsFile

from helpers import make_adapter, write_adapter_dir

KEYS = ["mlp.switch_mlp.down_proj", "self_attn.q_proj"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_moe_dir):
    """A random rank-3 LoRA (mlx-lm's layers) on every layer's experts' down_proj and q_proj of the tiny MoE."""
    root = tmp_path_factory.mktemp("placebo")
    path = make_adapter(tiny_moe_dir, root / "adapter", keys=KEYS, num_layers=4, rank=3, scale=2.0, b_std=0.1)
    return {"root": root, "path": path, "tensors": _load(path), "scale": 2.0}


def _deltas(tensors: dict, scale: float) -> dict[str, np.ndarray]:
    """Each module's delta in float64, mlx-lm's layouts: Linear (lora_b.T @ lora_a.T), Switch (b @ a)."""
    out = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            m = name[:-len(".lora_a")]
            a, b = tensors[name].astype(np.float64), tensors[m + ".lora_b"].astype(np.float64)
            out[m] = scale * (b @ a if a.ndim == 3 else b.T @ a.T)
    return out


def _load(path) -> dict:
    with SafetensorsFile(path / "adapters.safetensors") as f:
        return {n: np.asarray(f.read(n)) for n in f.tensors}


def test_placebo_keeps_the_spectrum_and_randomises_the_directions(trained, tmp_path):
    res = placebo_adapter(trained["path"], tmp_path / "p0", seed=0)
    got = _load(tmp_path / "p0")
    assert (tmp_path / "p0" / "adapter_config.json").read_bytes() == (trained["path"] / "adapter_config.json").read_bytes()
    assert list(got) == list(_load(trained["path"]))  # the same tensors in the same order
    assert all(got[k].shape == v.shape and got[k].dtype == v.dtype for k, v in trained["tensors"].items())
    before, after = _deltas(trained["tensors"], 2.0), _deltas(got, 2.0)
    for module, d in before.items():
        mats = [(d, after[module])] if d.ndim == 2 else list(zip(d, after[module]))
        for orig, plac in mats:
            s_orig = np.linalg.svd(orig, compute_uv=False)[:3]
            u, s_plac, vt = np.linalg.svd(plac)
            np.testing.assert_allclose(s_plac[:3], s_orig, rtol=2e-5, atol=1e-7)  # the same singular values
            assert s_plac[3:].max(initial=0) < 1e-5 * s_orig[0]  # and rank 3
            assert np.linalg.norm(plac) == pytest.approx(np.linalg.norm(orig), rel=1e-5)
            # the directions are not the trained ones: the cosines of the principal angles between the
            # column spaces of two random 3-dim subspaces are small, the trained ones' with themselves 1
            uo = np.linalg.svd(orig)[0][:, :3]
            overlap = np.linalg.svd(uo.T @ u[:, :3], compute_uv=False)
            assert overlap.max() < 0.99
    assert res.seed == 0 and set(res.singular_values) == set(before)
    # deterministic per seed, another seed gives other directions; a module's draw ignores the others
    placebo_adapter(trained["path"], tmp_path / "p0b", seed=0)
    assert (tmp_path / "p0" / "adapters.safetensors").read_bytes() == (tmp_path / "p0b" / "adapters.safetensors").read_bytes()
    other = _load(placebo_adapter(trained["path"], tmp_path / "p1", seed=1).out)
    assert all(not np.array_equal(other[k], got[k]) for k in got)
    one = {k: v for k, v in trained["tensors"].items() if ".layers.2." in k}
    alone = write_adapter_dir(tmp_path / "alone", {k: mx.array(v) for k, v in one.items()}, keys=KEYS, rank=3,
                              scale=2.0, num_layers=4)
    got_alone = _load(placebo_adapter(alone, tmp_path / "palone", seed=0).out)
    assert all(np.array_equal(got_alone[k], got[k]) for k in one)
    with pytest.raises(UserError, match="exists"):
        placebo_adapter(trained["path"], tmp_path / "p0", seed=0)
    with pytest.raises(UserError, match="is the adapter itself"):
        placebo_adapter(trained["path"], trained["path"], force=True)


def test_random_frames_are_haar_distributed():
    rng = np.random.default_rng(7)
    d, k, draws = 6, 2, 2000
    acc = np.zeros((d, d))
    for _ in range(draws):
        q = random_frame(rng, d, k)
        np.testing.assert_allclose(q.T @ q, np.eye(k), atol=1e-12)
        acc += q @ q.T
    # E[Q Q^T] = (k / d) I for a uniformly random k-frame (its projector is isotropic)
    np.testing.assert_allclose(acc / draws, (k / d) * np.eye(d), atol=0.03)


def test_placebo_refuses_dora(tiny_llama_dir, tmp_path):
    t = {"model.layers.0.self_attn.q_proj.lora_a": mx.zeros((64, 2)),
         "model.layers.0.self_attn.q_proj.lora_b": mx.zeros((2, 64)),
         "model.layers.0.self_attn.q_proj.m": mx.ones((64,))}
    path = write_adapter_dir(tmp_path / "dora", t, keys=["self_attn.q_proj"], rank=2, scale=1.0, num_layers=4,
                             fine_tune_type="dora")
    with pytest.raises(UserError, match="DoRA"):
        placebo_adapter(path, tmp_path / "out")


def _deq(model_dir, module):
    t = mx.load(str(model_dir / "model.safetensors"))
    w, s, b = t[f"{module}.weight"], t[f"{module}.scales"], t[f"{module}.biases"]
    return np.asarray(mx.dequantize(w, s, b, group_size=64, bits=3)).astype(np.float64), \
        np.repeat(np.asarray(s, np.float64), 64, axis=-1), np.repeat(np.asarray(b, np.float64), 64, axis=-1)


def test_dithered_fuse_is_stochastic_rounding_on_the_stock_grid(trained, tiny_moe_dir, tmp_path):
    zero = zero_adapter(trained["path"], tmp_path / "zero").out
    stock = tmp_path / "stock"
    fuse_model(tiny_moe_dir, zero, stock, policy="stock")
    res = dither_residual(tiny_moe_dir, stock, zero, tmp_path / "residual")
    assert res.residual_max <= 0.5 + 1e-4  # nearest rounding: at most half a step away
    seeds = 12
    for seed in range(seeds):
        fuse_model(stock, tmp_path / "residual", tmp_path / f"d{seed}", policy="stochastic", seed=seed)
    modules = sorted({k[:-len(".lora_a")] for k in trained["tensors"] if k.endswith(".lora_a")})
    total_bias, total_spread, codes_moved = 0.0, 0.0, 0
    for module in modules:
        w0 = _deq(tiny_moe_dir, module)[0]  # the weights before any fuse
        f, step, bias = _deq(stock, module)  # the stock fuse: the grid, nearest codes
        q = (w0 - bias) / step  # the original weight in codes of the stock grid
        draws = []
        for seed in range(seeds):
            d, step_d, bias_d = _deq(tmp_path / f"d{seed}", module)
            np.testing.assert_array_equal(step_d, step)  # the stock grid is kept ...
            np.testing.assert_array_equal(bias_d, bias)
            qd = np.rint((d - bias) / step)
            assert np.all((qd == np.floor(q + 1e-6)) | (qd == np.ceil(q - 1e-6)))  # ... and a neighbour chosen
            draws.append(qd)
        draws = np.array(draws)
        frac = q - np.floor(q + 1e-6)
        up = (draws > np.floor(q + 1e-6)).mean(axis=0)
        total_bias += float((up - frac).sum())  # unbiased: rounds up with probability = the fraction
        total_spread += float(frac.size)
        codes_moved += int((draws != np.rint((f - bias) / step)).sum())
    assert abs(total_bias) / total_spread < 0.01
    assert codes_moved > 0  # the draws differ from the nearest-rounding stock fuse
    a, b = (tmp_path / "d0" / "model.safetensors").read_bytes(), (tmp_path / "d1" / "model.safetensors").read_bytes()
    assert a != b
    fuse_model(stock, tmp_path / "residual", tmp_path / "d0b", policy="stochastic", seed=0)
    assert (tmp_path / "d0b" / "model.safetensors").read_bytes() == a
    with pytest.raises(UserError, match="not a zero-delta adapter"):
        dither_residual(tiny_moe_dir, stock, trained["path"], tmp_path / "bad")
