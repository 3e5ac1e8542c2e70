"""``pyfuse fuse --compare-policies``: every number of its table against the
same fuse run on its own (``pyfuse.fuse_model`` into a directory) and
measured independently: retention, output error / retention and the zero
twin's changes in NumPy from ``mx.dequantize``d weights, KL and top-1
agreement with scipy over plain mlx-lm forward passes, bytes from the
written tensors; no model directory left behind, inputs unchanged."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.calibration import collect_hessians
from pyfuse.fuse import fuse_model

from helpers import (DOWN, file_digests, make_adapter, mlx_lm_logits, model_tensors, run_cli, scipy_kl_top1,
                     write_jsonl)

WORDS = "the a cat dog runs over under big small red blue water fire city river model expert token".split()
PATHS = [f"model.layers.{i}.{DOWN}" for i in (2, 3)]
SCALE = 20.0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("compare")


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(5)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 50)))) for _ in range(24)]


@pytest.fixture(scope="module")
def calib(work, texts):
    return write_jsonl(work / "calib.jsonl", [{"text": t} for t in texts])


@pytest.fixture(scope="module")
def adapter(work, tiny_moe_dir):
    return make_adapter(tiny_moe_dir, work / "adapter", keys=[DOWN], b_std=5e-4, scale=SCALE)


def _compare(tmp_path, monkeypatch, *args):
    """The CLI's JSON, run in an empty directory with its own temporary
    directory; both must be empty after."""
    run_dir, tmp = tmp_path / "cwd", tmp_path / "tmp"
    run_dir.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    r = run_cli("fuse", *args, "--json")
    assert r.code == 0, r.err
    assert list(run_dir.iterdir()) == [] and list(tmp.iterdir()) == []
    return json.loads(r.out)


def _deq(t, path, bits):
    return np.asarray(mx.dequantize(t[f"{path}.weight"], t[f"{path}.scales"], t[f"{path}.biases"],
                                    group_size=64, bits=bits)).astype(np.float64)


def _numpy_figures(base, fused, ad, hessians, bits):
    """Retention over both modules; mean output error / retention on held-out X^T X."""
    cd = dd = 0.0
    errs, rets = [], []
    for p in PATHS:
        a, b = np.asarray(ad[f"{p}.lora_a"], np.float64), np.asarray(ad[f"{p}.lora_b"], np.float64)
        c = _deq(fused, p, bits) - _deq(base, p, 3)
        d = SCALE * b @ a
        cd, dd = cd + float((c * d).sum()), dd + float((d * d).sum())
        h = np.asarray(hessians[p].held_out, np.float64)
        e = c - d
        aa = sum(np.trace(e[x] @ h[x] @ e[x].T) for x in range(len(h)))
        hd = sum(np.trace(d[x] @ h[x] @ d[x].T) for x in range(len(h)))
        hc = sum(np.trace(c[x] @ h[x] @ d[x].T) for x in range(len(h)))
        errs.append(np.sqrt(aa / hd))
        rets.append(hc / hd)
    return cd / dd, float(np.mean(errs)), float(np.mean(rets))


@pytest.mark.slow
def test_table_matches_individual_fuses(work, tiny_moe_dir, adapter, calib, texts, tmp_path, monkeypatch):
    inputs = {p: file_digests(p) for p in (tiny_moe_dir, adapter, calib.parent)}
    got = _compare(tmp_path, monkeypatch, "--model", tiny_moe_dir, "--adapter-path", adapter,
                   "--compare-policies", "--calibration", calib)
    assert {p: file_digests(p) for p in inputs} == inputs
    rows = {(r["policy"], r["requant_bits"]): r for r in got["rows"]}
    assert list(rows) == [(p, rb) for p in ("stock", "preserve", "stochastic", "calibrated") for rb in (None, 8)]

    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_moe_dir)
    held = [list(tok.encode(t)) for i, t in enumerate(texts) if i % 4 == 3]
    reference = mlx_lm_logits(tiny_moe_dir, held, adapter)
    hessians = collect_hessians(tiny_moe_dir, calib, PATHS)
    base, ad = model_tensors(tiny_moe_dir), mx.load(str(adapter / "adapters.safetensors"))
    zero = make_adapter(tiny_moe_dir, work / "zero", keys=[DOWN], b_std=0.0, scale=SCALE)
    for (policy, rb), row in rows.items():
        calibration = {"calibration": calib} if policy == "calibrated" else {}
        out = work / f"{policy}_{rb}"
        fuse_model(tiny_moe_dir, adapter, out, policy=policy, requant_bits=rb, agreement=False, **calibration)
        fused, bits = model_tensors(out), rb or 3
        retention, err, ret = _numpy_figures(base, fused, ad, hessians, bits)
        assert row["weight_retention"] == pytest.approx(retention, rel=1e-4, abs=1e-6), (policy, rb)
        assert row["output_error"] == pytest.approx(err, rel=1e-3), (policy, rb)
        assert row["output_retention"] == pytest.approx(ret, rel=1e-3, abs=1e-4), (policy, rb)
        kl, agree = scipy_kl_top1(reference, mlx_lm_logits(out, held))
        assert row["kl_to_unfused"] == pytest.approx(kl.mean(), rel=1e-3), (policy, rb)
        assert row["top1_agreement"] == pytest.approx(agree.mean(), abs=1e-12)
        assert row["bytes_added"] == sum(v.nbytes for v in fused.values()) - sum(v.nbytes for v in base.values())
        fuse_model(tiny_moe_dir, zero, work / f"{policy}_{rb}_zero", policy=policy, requant_bits=rb,
                   agreement=False, **calibration)
        twin = model_tensors(work / f"{policy}_{rb}_zero")
        changed = [_deq(base, p, 3) != _deq(twin, p, bits) for p in PATHS]
        assert row["zero_twin_weights_changed"] == pytest.approx(
            sum(c.sum() for c in changed) / sum(c.size for c in changed), abs=1e-12), (policy, rb)
        assert (row["zero_twin_weights_changed"] == 0) == (policy != "stock")


def test_agreement_prompts_and_chosen_policies(tiny_moe_dir, adapter, calib, texts, tmp_path, monkeypatch):
    """Two policies, no calibration: no output figures, KL on every prompt."""
    got = _compare(tmp_path, monkeypatch, "--model", tiny_moe_dir, "--adapter-path", adapter,
                   "--compare-policies", "preserve,stock", "--agreement-prompts", calib, "--requant-bits", "6")
    assert [(r["policy"], r["requant_bits"]) for r in got["rows"]] == [
        ("preserve", None), ("preserve", 6), ("stock", None), ("stock", 6)]
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_moe_dir)
    seqs = [list(tok.encode(t)) for t in texts]
    reference = mlx_lm_logits(tiny_moe_dir, seqs, adapter)
    for r in got["rows"]:
        assert r["output_error"] is None and r["output_retention"] is None
    out = tmp_path / "preserve6"
    fuse_model(tiny_moe_dir, adapter, out, policy="preserve", requant_bits=6, agreement=False)
    kl, agree = scipy_kl_top1(reference, mlx_lm_logits(out, seqs))
    assert got["rows"][1]["kl_to_unfused"] == pytest.approx(kl.mean(), rel=1e-3)
    assert got["rows"][1]["top1_agreement"] == pytest.approx(agree.mean(), abs=1e-12)
    assert got["meta"]["agreement_tokens"] == sum(map(len, seqs))


def test_without_data_calibrated_is_left_out(tiny_moe_dir, adapter, tmp_path, monkeypatch):
    got = _compare(tmp_path, monkeypatch, "--model", tiny_moe_dir, "--adapter-path", adapter,
                   "--compare-policies", "stock")
    assert len(got["rows"]) == 2 and got["rows"][0]["kl_to_unfused"] is None
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--compare-policies", "preserve")
    assert r.code == 0, r.err
    assert "preserve" in r.out and "not measured" in r.out


@pytest.mark.parametrize("args, message", [
    (["--compare-policies", "nearest"], "not a policy"),
    (["--compare-policies", "calibrated"], "needs --calibration"),
    (["--compare-policies", "--requant-bits", "7"], "not supported"),
    (["--compare-policies", "--report", "r.json"], "writes no model"),
    (["--compare-policies", "--dequantize"], "writes no model"),
    (["--compare-policies", "--save-path", "out"], "--save-path cannot be combined"),
    (["--compare-policies", "--save-path", "fused_model"], "--save-path cannot be combined"),
    (["--compare-policies", "--policy", "stock"], "runs every policy"),
    (["--compare-policies", "preserve", "--requant", "preserve"], "--policy cannot be combined"),
    (["--compare-policies", "--calibration", "missing.jsonl"], "does not exist"),
    (["--json"], "--compare-policies"),
])
def test_bad_input_is_one_line(tiny_moe_dir, adapter, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, *args)
    assert r.code == 2
    assert len(r.err.strip().splitlines()) == 1 and message in r.err
    assert list(Path(tmp_path).iterdir()) == []


def test_help_explains():
    from pyfuse.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "fuse" in a.choices)
    text = " ".join(sub.choices["fuse"].format_help().split())
    assert "--compare-policies" in text and "zero-delta twin" in text and "no model is written" in text
