"""``pyfuse noise-floor --adapter-path --calibration``: the adapter fuse's
output figures per setting against independent oracles: the KL and top-1
agreement to the unfused adapter with scipy over plain mlx-lm forward
passes of the base with the adapter (``mlx_lm.load(adapter_path=...)``)
and of the model ``pyfuse fuse`` writes with the same policy; the output
error / retention against ``pyfuse fuse --calibration``'s per-module report
(itself checked against NumPy in test_compare_policies)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyfuse.fuse import fuse_model
from pyfuse.noise_floor.measure import measure_noise_floor

from helpers import DOWN, make_adapter, mlx_lm_logits, run_cli, scipy_kl_top1, write_jsonl

WORDS = "the a cat dog runs over under big small red blue water fire city river model expert token".split()
PROMPTS = ["the cat runs over the big red river", "a small dog and the blue water", "model expert token fire city"]
SCALE = 20.0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("nf_adapter_outputs")


@pytest.fixture(scope="module")
def calib(work):
    rng = np.random.default_rng(7)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 40)))) for _ in range(12)]
    return write_jsonl(work / "calib.jsonl", [{"text": t} for t in texts])


@pytest.fixture(scope="module")
def prompts(work):
    return write_jsonl(work / "prompts.jsonl", [{"text": t} for t in PROMPTS])


@pytest.fixture(scope="module")
def adapter(work, tiny_moe_dir):
    return make_adapter(tiny_moe_dir, work / "adapter", keys=[DOWN], b_std=5e-4, scale=SCALE)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stock", "preserve"])
def test_adapter_figures_match_fuse_and_mlx_lm(work, tiny_moe_dir, adapter, calib, prompts, policy):
    res = measure_noise_floor(tiny_moe_dir, group_sizes=[64], bits=[3], policies=[policy], adapter_path=adapter,
                              calibration=calib, prompts=prompts)
    row = res.row(64, 3, policy, source="model")

    out = work / f"fused_{policy}"
    fused = fuse_model(tiny_moe_dir, adapter, out, policy=policy, calibration=calib, agreement=False)
    records = [r for r in fused.report["tensors"] if r.get("output_error") is not None]
    assert len(records) == row["adapter_modules"] >= 1
    assert row["adapter_output_error"] == pytest.approx(np.mean([r["output_error"] for r in records]), rel=1e-4)
    assert row["adapter_output_retention"] == pytest.approx(
        np.mean([r["output_retention"] for r in records]), rel=1e-4, abs=1e-6)
    per_tensor = {t["module"]: t for t in res.tensors if t["policy"] == policy and t["output_error"] is not None}
    for r in records:
        assert per_tensor[r["module"]]["output_error"] == pytest.approx(
            r["output_error"], rel=1e-4)

    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_moe_dir)
    seqs = [list(tok.encode(t)) for t in PROMPTS]
    kl, agree = scipy_kl_top1(mlx_lm_logits(tiny_moe_dir, seqs, adapter), mlx_lm_logits(out, seqs))
    assert kl.mean() > 0
    assert row["adapter_kl_to_unfused"] == pytest.approx(kl.mean(), rel=1e-3)
    assert row["adapter_top1_agreement"] == pytest.approx(agree.mean(), abs=1e-12)
    # the zero-delta columns are still the zero twin's, not the adapter's
    assert row["kl_mean"] != row["adapter_kl_to_unfused"]


def test_calibration_needs_an_adapter(tiny_moe_dir, calib, tmp_path):
    r = run_cli("noise-floor", "--model", tiny_moe_dir, "--calibration", calib, "--bits", "3",
                "--group-sizes", "64", "--out", tmp_path / "nf")
    assert r.code != 0 and "adapter" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "nf").exists()


def test_missing_calibration_is_one_line(tiny_moe_dir, adapter, tmp_path):
    r = run_cli("noise-floor", "--model", tiny_moe_dir, "--adapter-path", adapter, "--calibration",
                tmp_path / "missing.jsonl", "--bits", "3", "--group-sizes", "64", "--out", tmp_path / "nf")
    assert r.code != 0 and "missing.jsonl" in r.err and "Traceback" not in r.err


@pytest.mark.slow
def test_cli_json_and_markdown_have_the_columns(tiny_moe_dir, adapter, calib, prompts, tmp_path):
    r = run_cli("noise-floor", "--model", tiny_moe_dir, "--adapter-path", adapter, "--calibration", calib,
                "--prompts", prompts, "--bits", "3", "--group-sizes", "64", "--policies", "preserve",
                "--out", tmp_path / "nf", "--quiet")
    assert r.code == 0, r.err
    data = json.loads((tmp_path / "nf" / "noise_floor.json").read_text())
    (row,) = data["rows"]
    for key in ("adapter_kl_to_unfused", "adapter_top1_agreement", "adapter_output_error",
                "adapter_output_retention"):
        assert isinstance(row[key], float), key
    assert data["meta"]["calibration"] == str(calib)
    md = (tmp_path / "nf" / "noise_floor.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| source"))
    cells = header.split("|")
    line = next(line for line in md.splitlines() if line.startswith("| model"))
    values = dict(zip([c.strip() for c in cells], [c.strip() for c in line.split("|")]))
    assert values["adapter output error"] == f"{row['adapter_output_error']:.3f}"
    assert values["adapter KL to unfused"] == f"{row['adapter_kl_to_unfused']:.2e}"


def test_help_names_the_calibration_flag():
    from pyfuse.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "noise-floor" in a.choices)
    text = " ".join(sub.choices["noise-floor"].format_help().split())
    assert "--calibration DATA" in text and "adapter applied unfused" in text and "held-out" in text
