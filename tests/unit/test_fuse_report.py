"""The fidelity report of ``pyfuse fuse``: every figure (retention, noise,
codes changed, ...) recomputed in float64 numpy from the written tensors and
the adapter; the warning when re-quantization erases a delta; the sampled
report against the exact one."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import pyfuse
from pyfuse.fuse import fuse_model

from helpers import DOWN, differing, make_adapter, model_tensors, read_json, run_cli


def test_report_figures_are_right(fuse_work, tiny_moe_dir, moe_adapter, moe_pyfuse):
    rep = read_json(fuse_work / "moe_report.json")
    assert set(rep) == {"tensors", "summary"}
    base, got = model_tensors(tiny_moe_dir), model_tensors(moe_pyfuse)
    ad = mx.load(str(moe_adapter / "adapters.safetensors"))
    assert len(rep["tensors"]) == 6
    for r in rep["tensors"]:
        p = r["module"]
        for key in ("name", "shape", "bits", "group_size", "delta_norm", "change_norm", "retention",
                    "noise", "codes_changed", "groups_refit"):
            assert key in r
        deq = lambda t: np.array(mx.dequantize(t[f"{p}.weight"], t[f"{p}.scales"], t[f"{p}.biases"],  # noqa: E731
                                              group_size=64, bits=3), dtype=np.float64)
        change = deq(got) - deq(base)
        la, lb = np.array(ad[f"{p}.lora_a"], np.float64), np.array(ad[f"{p}.lora_b"], np.float64)
        delta = 20.0 * (lb @ la if la.ndim == 3 else (la @ lb).T)
        ret = (change * delta).sum() / (delta * delta).sum()
        noise = np.linalg.norm(change - ret * delta) / np.linalg.norm(delta)
        assert r["shape"] == list(delta.shape)
        assert r["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-4)
        assert r["change_norm"] == pytest.approx(np.linalg.norm(change), rel=1e-4)
        assert r["retention"] == pytest.approx(ret, rel=1e-3)
        assert r["noise"] == pytest.approx(noise, rel=1e-3)
        codes = lambda t: np.array(mx.dequantize(t[f"{p}.weight"], mx.ones_like(t[f"{p}.scales"]),  # noqa: E731
                                                mx.zeros_like(t[f"{p}.biases"]), group_size=64, bits=3))
        assert r["codes_changed"] == pytest.approx((codes(got) != codes(base)).mean())
    s = rep["summary"]
    assert s["policy"] == "stock" and s["modules_fused"] == 6
    dd = sum(r["delta_norm"] ** 2 for r in rep["tensors"])
    assert s["retention"] == pytest.approx(sum(r["retention"] * r["delta_norm"] ** 2
                                               for r in rep["tensors"]) / dd)


def test_low_retention_warning_on_the_terminal(fuse_work, tiny_moe_dir):
    adapter = make_adapter(tiny_moe_dir, fuse_work / "tiny_delta", keys=[DOWN], b_std=3e-5)
    cap = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path",
                  fuse_work / "tiny_delta_out")
    assert cap.code == 0
    assert "retention" in cap.out and f"model.layers.3.{DOWN}.weight" in cap.out  # the table
    warning = [line for line in cap.err.splitlines() if "mostly erased" in line]
    assert len(warning) == 1
    assert "by 3-bit re-quantization: retention 0." in warning[0]
    assert "consider --policy stochastic, --requant-bits 8, --dequantize" in warning[0]


def test_sampled_report_estimates_the_exact_one(fuse_work, tiny_moe_dir, moe_adapter, monkeypatch):
    exact = fuse_model(tiny_moe_dir, moe_adapter, fuse_work / "exact_rep", report_sample=None).report
    if pyfuse.native_available():
        # The native sums are exact at memory speed: nothing is sampled.
        native = fuse_model(tiny_moe_dir, moe_adapter, fuse_work / "native_rep", report_sample=4096).report
        assert all(t["sampled"] == 1.0 for t in native["tensors"])
        for e, n in zip(exact["tensors"], native["tensors"]):
            assert n["retention"] == pytest.approx(e["retention"], rel=1e-6)
        # Sampling is the pure-MLX path's way to stay fast.
        monkeypatch.setattr("pyfuse.fuse.report.native_available", lambda: False)
    sampled = fuse_model(tiny_moe_dir, moe_adapter, fuse_work / "sampled_rep", report_sample=4096).report
    assert differing(model_tensors(fuse_work / "exact_rep"), model_tensors(fuse_work / "sampled_rep")) == []
    for e, s in zip(exact["tensors"], sampled["tensors"]):
        assert e["name"] == s["name"] and e["sampled"] == 1.0
        if "switch_mlp" in e["name"]:  # 8 x 64 x 64: 8 of 64 rows of every expert
            assert s["sampled"] == pytest.approx(8 / 64)
        else:  # q_proj, 64 x 64 = 4096 weights: small enough to be measured whole
            assert s["sampled"] == 1.0
        assert s["retention"] == pytest.approx(e["retention"], abs=0.1)
        assert s["codes_changed"] == pytest.approx(e["codes_changed"], abs=0.05)
        assert s["delta_norm"] == pytest.approx(e["delta_norm"], rel=0.25)
        assert s["groups"] == e["groups"]
    assert sampled["summary"]["sampled_tensors"] == 4 and exact["summary"]["sampled_tensors"] == 0
