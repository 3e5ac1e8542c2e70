"""Calibration for the ``calibrated`` policy on the tiny qwen3_moe:
``collect_hessians`` against X^T X rebuilt in NumPy from the MoE block's
own inputs and routing (an independent oracle), the plain-rounding fallback,
and ``pyfuse fuse --policy calibrated --calibration`` end to end."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.calibration import collect_hessians
from pyfuse.calibration.collect import recording
from pyfuse.calibration.texts import calibration_sequences
from pyfuse.fuse import fuse_model

from helpers import DOWN, GATE, make_adapter, model_tensors, run_cli, write_jsonl

LAYER = 1
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
         "Two plus two is four, and four plus four is eight.", "Water boils at one hundred degrees.",
         "A tiny model reads tiny sentences.", "Calibration data shows the layer what inputs look like.",
         "Mixture of experts models route each token to a few experts.", "The end."]


@pytest.fixture(scope="module")
def calib_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", [{"text": t} for t in TEXTS])


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _oracle(model_dir, data):
    """Per expert X^T X of gate_proj's and down_proj's inputs in layer LAYER,
    from the MoE block's input (recorded by wrapping the block, not the
    projections), its router (top-k of the gate logits) and the dequantized
    expert weights, in NumPy float64; every 4th sequence held out."""
    from pyfuse.lm.load import load_for_inference

    loaded = load_for_inference(model_dir)
    block = loaded.model.model.layers[LAYER].mlp
    k = block.top_k
    sw = block.switch_mlp
    up, gate = (np.asarray(mx.dequantize(p.weight, p.scales, p.biases, group_size=p.group_size, bits=p.bits))
                .astype(np.float64) for p in (sw.up_proj, sw.gate_proj))
    seen = []

    class Spy:
        def __call__(self, x):
            seen.append(np.asarray(x.reshape(-1, x.shape[-1]).astype(mx.float32)).astype(np.float64))

    experts, hidden, inter = up.shape[0], up.shape[2], up.shape[1]
    h_gate = np.zeros((2, experts, hidden, hidden))
    h_down = np.zeros((2, experts, inter, inter))
    seqs = calibration_sequences(loaded.tokenizer, data, max_seq_len=2048)
    original = type(block).__call__
    try:
        type(block).__call__ = lambda self, x: (Spy()(x), original(self, x))[1]
        for i, seq in enumerate(seqs):
            seen.clear()
            loaded.model(mx.array([seq]))
            x = seen[LAYER]  # the patch is on the class: every layer's block records
            logits = np.asarray(block.gate(mx.array(x.astype(np.float32)))).astype(np.float64)
            top = np.argsort(-logits, axis=-1)[:, :k]
            part = 1 if i % 4 == 3 else 0
            for t in range(x.shape[0]):
                for e in top[t]:
                    h_gate[part, e] += np.outer(x[t], x[t])
                    act = _silu(gate[e] @ x[t]) * (up[e] @ x[t])
                    h_down[part, e] += np.outer(act, act)
    finally:
        type(block).__call__ = original
    return h_gate, h_down, sum(len(s) for s in seqs) * k


def test_hessians_match_numpy_oracle(tiny_moe_dir, calib_jsonl):
    paths = [f"model.layers.{LAYER}.{GATE}", f"model.layers.{LAYER}.{DOWN}"]
    got = collect_hessians(tiny_moe_dir, calib_jsonl, paths, min_tokens=0)
    h_gate, h_down, routed = _oracle(tiny_moe_dir, calib_jsonl)
    for path, want in zip(paths, (h_gate, h_down)):
        mh = got[path]
        assert sum(mh.tokens) + sum(mh.held_out_tokens) == routed
        for part, arr in ((0, mh.fit), (1, mh.held_out)):
            np.testing.assert_allclose(np.asarray(arr), want[part], rtol=2e-3, atol=2e-3 * np.abs(want[part]).max())
        assert mh.fallback == []


def test_recording_restores_the_model(tiny_moe_dir):
    from pyfuse.lm.load import load_for_inference

    model = load_for_inference(tiny_moe_dir).model
    before = model.model.layers[0].mlp.switch_mlp.down_proj
    with recording(model, [f"model.layers.0.{DOWN}"]) as recs:
        assert model.model.layers[0].mlp.switch_mlp.down_proj is recs[f"model.layers.0.{DOWN}"]
    assert model.model.layers[0].mlp.switch_mlp.down_proj is before


def test_few_tokens_fall_back_to_plain_rounding(tiny_moe_dir, calib_jsonl):
    path = f"model.layers.{LAYER}.{DOWN}"
    mh = collect_hessians(tiny_moe_dir, calib_jsonl, [path], min_tokens=10**6)[path]
    assert mh.fallback == list(range(len(mh.tokens)))
    assert not np.any(np.asarray(mh.fit))
    assert mh.summary()["experts_fallback"] == len(mh.tokens)


def test_calibrated_zero_adapter_is_byte_identical(fuse_work, tiny_moe_dir, calib_jsonl):
    adapter = make_adapter(tiny_moe_dir, fuse_work / "calib_zero", keys=[DOWN, GATE], b_std=0.0)
    out = fuse_work / "calib_zero_out"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", out,
                "--policy", "calibrated", "--calibration", calib_jsonl)
    assert r.code == 0, r.err
    for p in Path(tiny_moe_dir).iterdir():
        assert filecmp.cmp(p, out / p.name, shallow=False), p.name


def test_calibration_under_other_policies_only_measures(fuse_work, tiny_moe_dir, calib_jsonl):
    """--calibration with preserve: the same model bytes as without it; the
    report gains each module's output error (the figures themselves are
    checked against their definition in tests/e2e/test_calibration_e2e.py)."""
    adapter = make_adapter(tiny_moe_dir, fuse_work / "calib_pres", keys=[DOWN], b_std=1e-3)
    outs = {}
    for name, extra in (("plain", []), ("measured", ["--calibration", calib_jsonl])):
        outs[name] = fuse_work / f"calib_pres_{name}"
        r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", outs[name],
                    "--policy", "preserve", "--report", fuse_work / f"calib_pres_{name}.json", *extra)
        assert r.code == 0, r.err
    for p in outs["plain"].iterdir():
        assert filecmp.cmp(p, outs["measured"] / p.name, shallow=False), p.name
    reports = {n: json.loads((fuse_work / f"calib_pres_{n}.json").read_text())["tensors"] for n in outs}
    assert all("output_error" not in r for r in reports["plain"])
    assert all(r["output_error"] > 0 and r["calibration"]["tokens"] > 0 for r in reports["measured"])


def test_calibration_errors(fuse_work, tiny_moe_dir, calib_jsonl):
    adapter = make_adapter(tiny_moe_dir, fuse_work / "calib_err", keys=[DOWN], b_std=1e-3)
    base = ["fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", fuse_work / "never"]
    r = run_cli(*base, "--policy", "calibrated")
    assert r.code == 2 and "needs --calibration" in r.err
    r = run_cli(*base, "--policy", "calibrated", "--calibration", fuse_work / "missing.jsonl")
    assert r.code == 2 and "does not exist" in r.err
    assert not (fuse_work / "never").exists()


def test_layer_by_layer_equals_whole_model(tiny_moe_dir, calib_jsonl, monkeypatch):
    """The streamed pass (layers 0..last fused one, each over every sequence)
    gives the sums of the whole-model pass, and does not fall back to it."""
    from pyfuse.calibration import collect

    paths = [f"model.layers.0.{DOWN}", f"model.layers.{LAYER}.{GATE}", f"model.layers.{LAYER}.{DOWN}"]
    whole = collect_hessians(tiny_moe_dir, calib_jsonl, paths, min_tokens=0, layer_by_layer=False)

    def refuse(*_a, **_k):
        raise AssertionError("the layer-wise pass fell back to the whole model")

    monkeypatch.setattr(collect, "_whole_model", refuse)
    streamed = collect_hessians(tiny_moe_dir, calib_jsonl, paths, min_tokens=0)
    for p in paths:
        a, b = streamed[p], whole[p]
        assert (a.tokens, a.held_out_tokens) == (b.tokens, b.held_out_tokens)
        for x, y in ((a.fit, b.fit), (a.held_out, b.held_out)):
            y = np.asarray(y)
            np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


def test_layer_by_layer_stops_at_the_last_fused_layer(tiny_moe_dir, calib_jsonl, monkeypatch):
    """Layers after the last fused one never run (nor are read)."""
    from pyfuse.calibration import collect

    ran = []
    original = collect._Capture.__call__
    monkeypatch.setattr(collect._Capture, "__call__", lambda self, *a, **k: (ran.append(self.index),
                                                                             original(self, *a, **k))[1])
    collect_hessians(tiny_moe_dir, calib_jsonl, [f"model.layers.0.{DOWN}"], min_tokens=0)
    assert ran and set(ran) == {0}


def test_calibrated_refits_groups_the_delta_leaves_on_the_refined_grid(fuse_work, tiny_moe_dir, calib_jsonl):
    """Refined to 8 bits, a delta that lowers code-0 weights: the groups whose
    nearest codes leave [0, 255] on the refined grid (the reference's rule)
    are re-fitted and counted; every other group keeps the refined base's
    scale and bias (pyfuse.refine_grid, the oracle); clip keeps them all;
    error refuses."""
    from pyfuse.kernel.reference import range_overflow_groups
    from pyfuse.kernel.refine import refine_grid

    adapter = make_adapter(tiny_moe_dir, fuse_work / "calib_refit", keys=[DOWN], b_std=5e-4)
    ad = mx.load(str(adapter / "adapters.safetensors"))
    base = model_tensors(tiny_moe_dir)
    common = dict(policy="calibrated", calibration=calib_jsonl, requant_bits=8)
    refit = fuse_model(tiny_moe_dir, adapter, fuse_work / "calib_refit_out", **common)
    clip = fuse_model(tiny_moe_dir, adapter, fuse_work / "calib_clip_out", on_range_overflow="clip", **common)
    for res, action in ((refit, "refit"), (clip, "clip")):
        got = model_tensors(res.save_path)
        for rec in res.report["tensors"]:
            m = rec["module"]
            w8, s8, b8 = refine_grid(*(base[f"{m}.{n}"] for n in ("weight", "scales", "biases")), group_size=64,
                                     bits=3, to_bits=8)
            mask = np.asarray(range_overflow_groups(w8, s8, ad[f"{m}.lora_a"], ad[f"{m}.lora_b"], scale=20.0,
                                                    group_size=64, bits=8, policy="calibrated"))
            lost = np.asarray((got[f"{m}.scales"] != s8) | (got[f"{m}.biases"] != b8))
            assert mask.any() and rec["groups_out_of_range"] == int(mask.sum())
            if action == "refit":
                assert np.array_equal(lost, mask) and rec["groups_refit"] == int(mask.sum())
            else:
                assert not lost.any() and rec["groups_clipped"] == int(mask.sum())
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", fuse_work / "never2",
                "--policy", "calibrated", "--calibration", calib_jsonl, "--requant-bits", "8",
                "--on-range-overflow", "error")
    assert r.code == 2 and "groups" in r.err and not (fuse_work / "never2").exists()
