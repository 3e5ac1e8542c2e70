"""``pyfuse fuse``'s whole-model figures (``kl_to_unfused``,
``top1_agreement``): against scipy's ``rel_entr`` over plain mlx-lm forward
passes of the base model with the adapter applied unfused and of the fused
model, on the held-out calibration sequences (every 4th, chosen here by
position) or on ``--agreement-prompts``."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import DOWN, make_adapter, mlx_lm_logits, read_json, run_cli, scipy_kl_top1, write_jsonl

WORDS = "the a cat dog runs over under big small red blue water fire city river model expert".split()


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(3)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) for _ in range(12)]


@pytest.fixture(scope="module")
def data(tmp_path_factory, texts):
    return write_jsonl(tmp_path_factory.mktemp("agree") / "calib.jsonl", [{"text": t} for t in texts])


@pytest.fixture(scope="module")
def down_adapter(fuse_work, tiny_moe_dir):
    return make_adapter(tiny_moe_dir, fuse_work / "agree_down", keys=[DOWN], b_std=2e-3)


def _seqs(model_dir, texts):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model_dir)
    return [list(tok.encode(t)) for t in texts]


def _check(summary, kl, agree):
    assert summary["kl_to_unfused"] == pytest.approx(kl.mean(), rel=1e-3)
    assert summary["top1_agreement"] == pytest.approx(agree.mean(), abs=1e-12)
    a = summary["agreement"]
    assert a["tokens"] == kl.size
    assert a["kl_p99"] == pytest.approx(np.percentile(kl, 99), rel=1e-3)


def test_calibrated_fuse_reports_held_out_agreement(fuse_work, tiny_moe_dir, down_adapter, data, texts):
    out, rep = fuse_work / "agree_calib", fuse_work / "agree_calib.json"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", down_adapter, "--save-path", out,
                "--policy", "calibrated", "--calibration", data, "--report", rep)
    assert r.code == 0, r.err
    held = [s for i, s in enumerate(_seqs(tiny_moe_dir, texts)) if i % 4 == 3]
    kl, agree = scipy_kl_top1(mlx_lm_logits(tiny_moe_dir, held, down_adapter), mlx_lm_logits(out, held))
    s = read_json(rep)["summary"]
    _check(s, kl, agree)
    assert s["agreement"]["sequences"] == 3
    assert "KL(unfused || fused)" in r.out and "top-1 agreement" in r.out


def test_agreement_prompts_with_stock(fuse_work, tiny_moe_dir, down_adapter, data, texts):
    out, rep = fuse_work / "agree_stock", fuse_work / "agree_stock.json"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", down_adapter, "--save-path", out,
                "--agreement-prompts", data, "--report", rep)
    assert r.code == 0, r.err
    seqs = _seqs(tiny_moe_dir, texts)
    kl, agree = scipy_kl_top1(mlx_lm_logits(tiny_moe_dir, seqs, down_adapter), mlx_lm_logits(out, seqs))
    assert kl.mean() > 0
    _check(read_json(rep)["summary"], kl, agree)


def test_no_agreement_without_data_or_when_switched_off(fuse_work, tiny_moe_dir, down_adapter, data):
    for name, extra in (("agree_none", []), ("agree_off", ["--agreement-prompts", data, "--no-agreement"])):
        rep = fuse_work / f"{name}.json"
        r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", down_adapter, "--save-path",
                    fuse_work / name, "--report", rep, *extra)
        assert r.code == 0, r.err
        assert "kl_to_unfused" not in read_json(rep)["summary"]
        assert "top-1 agreement" not in r.out


def test_bad_agreement_prompts_are_refused_before_writing(fuse_work, tiny_moe_dir, down_adapter, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"nothing": 1}])
    for prompts in (tmp_path / "missing.jsonl", bad):
        out = tmp_path / "out"
        r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", down_adapter, "--save-path", out,
                    "--agreement-prompts", prompts)
        assert r.code == 2
        assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
        assert not out.exists()


def test_lenient_and_no_held_out_sequences_are_said(fuse_work, tiny_moe_dir, down_adapter, data, tmp_path):
    import json
    import shutil

    lenient = tmp_path / "lenient"
    shutil.copytree(down_adapter, lenient)
    cfg = json.loads((lenient / "adapter_config.json").read_text())
    cfg["num_layers"] = 1  # mlx-lm's loader leaves layer 2's LoRA out
    (lenient / "adapter_config.json").write_text(json.dumps(cfg))
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", lenient, "--save-path", tmp_path / "a",
                "--lenient", "--agreement-prompts", data)
    assert r.code == 0, r.err
    assert "as mlx-lm's loader applies it, without the 1 module(s)" in r.err
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a single calibration sequence"}])
    rep = tmp_path / "one.json"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", down_adapter, "--save-path", tmp_path / "b",
                "--policy", "calibrated", "--calibration", one, "--report", rep)
    assert r.code == 0, r.err
    assert "no sequences to compare" in r.err
    s = read_json(rep)["summary"]
    assert s["kl_to_unfused"] is None and s["top1_agreement"] is None
