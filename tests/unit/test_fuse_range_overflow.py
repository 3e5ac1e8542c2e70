"""preserve / stochastic when fused values leave a group's grid: the
decision (the reference's rule against a NumPy oracle), the three actions of
``--on-range-overflow`` (refit: the kernel; clip: codes clamped, grid kept;
error: refused), their fidelity against the exact fused weight, and what the
fuse reports per module and on screen."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import pyfuse
from pyfuse.fuse import fuse_model
from pyfuse.kernel.fidelity import tensor_fidelity
from pyfuse.kernel.reference import delta_f32, fuse_requant_reference, range_overflow_groups, unpack_codes

from helpers import DOWN, GATE, make_adapter, model_tensors, read_json, run_cli

GROUP, BITS = 64, 4


def _case(seed=0, std=0.05):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(0, 0.02, size=(3, 32, 256)).astype(np.float32)).astype(mx.bfloat16)
    w, s, b = mx.quantize(x, group_size=GROUP, bits=BITS)
    a = mx.array(rng.normal(0, std, size=(3, 2, 256)).astype(np.float32))
    bb = mx.array(rng.normal(0, std, size=(3, 32, 2)).astype(np.float32))
    return (w, s, b), a, bb


def _oracle_codes(w, s, a, b):
    """NumPy: each weight's code on its own group's grid, unclipped."""
    q = np.array(unpack_codes(w, GROUP, BITS))
    d = np.array(delta_f32(a, b, 1.0))
    sf = np.repeat(np.array(s.astype(mx.float32)), GROUP, axis=-1)
    return np.rint(q + d / sf)


def test_rule_and_clip_match_numpy_and_refit_is_the_kernel():
    (w, s, b), a, bb = _case()
    steps = _oracle_codes(w, s, a, bb)
    out = ((steps < 0) | (steps > 2**BITS - 1)).reshape(*steps.shape[:-1], -1, GROUP).any(-1)
    assert 0 < out.mean() < 1
    mask = range_overflow_groups(w, s, a, bb, scale=1.0, group_size=GROUP, bits=BITS, policy="preserve")
    assert (np.array(mask) == out).all()

    kw = dict(scale=1.0, group_size=GROUP, bits=BITS, policy="preserve")
    clip = fuse_requant_reference(w, s, b, a, bb, **kw, on_range_overflow="clip")
    assert mx.array_equal(clip[1], s).item() and mx.array_equal(clip[2], b).item()
    assert (np.array(unpack_codes(clip[0], GROUP, BITS)) == np.clip(steps, 0, 2**BITS - 1)).all()

    refit = pyfuse.fuse_requant(w, s, b, a, bb, **kw)
    ref = fuse_requant_reference(w, s, b, a, bb, **kw)
    assert all(mx.array_equal(x, y).item() for x, y in zip(refit, ref))
    # groups in range: the same codes and grid under both actions
    inside = np.repeat(~out, GROUP, axis=-1)
    assert (np.array(unpack_codes(refit[0], GROUP, BITS))[inside]
            == np.array(unpack_codes(clip[0], GROUP, BITS))[inside]).all()


def test_fidelity_of_each_action_against_the_exact_fused_weight():
    """On a delta that pushes ~half the groups out of range: refit keeps the
    delta (retention near 1, noise within rounding) but those groups lose
    their grid; clip keeps every grid and loses the saturated part."""
    (w, s, b), a, bb = _case(seed=1, std=0.06)
    kw = dict(scale=1.0, group_size=GROUP, bits=BITS)
    figures = {}
    for name, out in (("stock", pyfuse.fuse_requant(w, s, b, a, bb, **kw, policy="stock")),
                      ("refit", pyfuse.fuse_requant(w, s, b, a, bb, **kw, policy="preserve")),
                      ("clip", fuse_requant_reference(w, s, b, a, bb, **kw, policy="preserve",
                                                      on_range_overflow="clip"))):
        figures[name] = tensor_fidelity((w, s, b), out, a, bb, **kw)
    print({k: (round(f.retention, 3), round(f.noise, 3), f.groups_refit) for k, f in figures.items()})
    share = figures["refit"].groups_refit / figures["refit"].groups
    assert 0.2 < share < 0.9
    assert figures["clip"].groups_refit == 0
    assert abs(figures["refit"].retention - 1) < 0.1
    # clipping only ever shortens a change along the delta
    assert figures["clip"].retention < figures["refit"].retention


def test_fuse_reports_refit_groups_and_warns(fuse_work, tiny_moe_dir):
    adapter = make_adapter(tiny_moe_dir, fuse_work / "range_adapter", keys=[DOWN, GATE], b_std=4e-3)
    out = fuse_work / "range_refit"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", out,
                "--policy", "preserve", "--report", fuse_work / "range_refit.json")
    assert r.code == 0, r.err
    rep = read_json(fuse_work / "range_refit.json")
    base, got = model_tensors(tiny_moe_dir), model_tensors(out)
    total = 0
    for rec in rep["tensors"]:
        m = rec["module"]
        lost = int(np.array((base[f"{m}.scales"] != got[f"{m}.scales"])
                            | (base[f"{m}.biases"] != got[f"{m}.biases"])).sum())
        assert rec["groups_refit"] == rec["groups_out_of_range"] == lost
        assert rec["groups"] == base[f"{m}.scales"].size
        assert rec["out_of_range_share"] == pytest.approx(lost / rec["groups"])
        total += lost
    s = rep["summary"]
    assert 0 < total < s["groups_grid_kept"] and s["groups_out_of_range"] == total
    assert f"{total} of {s['groups_grid_kept']} groups" in r.err and "re-fitted" in r.err

    # clip: every fused module keeps its scales and biases, the clipped
    # groups are those the rule finds
    clip = fuse_model(tiny_moe_dir, adapter, fuse_work / "range_clip", policy="preserve",
                      on_range_overflow="clip")
    got = model_tensors(clip.save_path)
    for rec in clip.report["tensors"]:
        m = rec["module"]
        assert mx.array_equal(got[f"{m}.scales"], base[f"{m}.scales"]).item()
        a = mx.load(str(adapter / "adapters.safetensors"))
        mask = range_overflow_groups(base[f"{m}.weight"], base[f"{m}.scales"], a[f"{m}.lora_a"],
                                     a[f"{m}.lora_b"], scale=20.0, group_size=64, bits=3, policy="preserve")
        assert rec["groups_clipped"] == int(mask.sum().item()) and rec["groups_refit"] == 0

    # error: refused, one line naming a module, nothing written
    err_out = fuse_work / "range_error"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", err_out,
                "--policy", "preserve", "--on-range-overflow", "error")
    assert r.code == 2 and not err_out.exists()
    assert r.err.count("\n") == 1 and "model.layers." in r.err and "groups" in r.err
    # not with stock: it has no grid to keep
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", err_out,
                "--on-range-overflow", "clip")
    assert r.code == 2 and "--on-range-overflow" in r.err


def test_dora_groups_are_counted_against_the_kept_grid(fuse_work, tiny_llama_dir):
    """A DoRA rescale changes every group's scale without re-fitting it: a
    zero delta with new magnitudes re-fits no group (counting changed scales
    would say all of them); a real delta re-fits what the rule says."""
    adapter = make_adapter(tiny_llama_dir, fuse_work / "range_dora0", dora=True, keys=["mlp.down_proj"],
                           b_std=0.0, m_jitter=0.01)
    res = fuse_model(tiny_llama_dir, adapter, fuse_work / "range_dora0_out", policy="preserve")
    base, got = model_tensors(tiny_llama_dir), model_tensors(res.save_path)
    for rec in res.report["tensors"]:
        assert rec["groups_refit"] == 0
        assert not mx.array_equal(got[f"{rec['module']}.scales"], base[f"{rec['module']}.scales"]).item()
    assert res.summary["groups_out_of_range"] == 0

    adapter = make_adapter(tiny_llama_dir, fuse_work / "range_dora", dora=True, keys=["mlp.down_proj"],
                           b_std=4e-3)
    res = fuse_model(tiny_llama_dir, adapter, fuse_work / "range_dora_out", policy="preserve")
    a = mx.load(str(adapter / "adapters.safetensors"))
    for rec in res.report["tensors"]:
        m = rec["module"]
        mask = range_overflow_groups(base[f"{m}.weight"], base[f"{m}.scales"], a[f"{m}.lora_a"].T,
                                     a[f"{m}.lora_b"].T, scale=20.0, group_size=64, bits=4, policy="preserve")
        assert rec["groups_refit"] == int(mask.sum().item()) > 0
