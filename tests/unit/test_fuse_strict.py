"""Strict adapter matching: ``pyfuse fuse`` refuses what ``mlx_lm.load(base,
adapter_path=...)`` refuses (the oracle, run in each test), naming the first
offenders; ``--lenient`` fuses them anyway and warns."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from helpers import DOWN, GATE, make_adapter, model_tensors, read_json, run_cli


def _mlx_lm_refuses(model, adapter) -> bool:
    from mlx_lm import load

    try:
        load(str(model), adapter_path=str(adapter))
    except ValueError:
        return True
    return False


def _rewrite_config(adapter, **changes):
    cfg = read_json(adapter / "adapter_config.json")
    for k, v in changes.items():
        if k == "keys":
            cfg["lora_parameters"]["keys"] = v
        else:
            cfg[k] = v
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


@pytest.fixture(scope="module")
def refused(fuse_work, tiny_moe_dir):
    """name -> (adapter mlx-lm refuses, module pyfuse must name)."""
    cases = {}
    # weights for two layers, the config says the last one only
    a = make_adapter(tiny_moe_dir, fuse_work / "strict_layers", keys=[DOWN], num_layers=2)
    cases["outside_num_layers"] = (_rewrite_config(a, num_layers=1), f"model.layers.2.{DOWN}")
    # weights for gate_proj, the keys name down_proj only
    a = make_adapter(tiny_moe_dir, fuse_work / "strict_keys", keys=[DOWN, GATE], num_layers=1)
    cases["outside_keys"] = (_rewrite_config(a, keys=[DOWN]), f"model.layers.3.{GATE}")
    # fine_tune_type dora on a SwitchLinear without m
    a = make_adapter(tiny_moe_dir, fuse_work / "strict_dora_switch", keys=[DOWN], num_layers=1)
    cases["dora_switch_without_m"] = (_rewrite_config(a, fine_tune_type="dora"), f"model.layers.3.{DOWN}")
    return cases


@pytest.mark.parametrize("case", ["outside_num_layers", "outside_keys", "dora_switch_without_m"])
def test_refuses_what_mlx_lm_refuses_and_lenient_fuses(case, refused, fuse_work, tiny_moe_dir):
    adapter, offender = refused[case]
    assert _mlx_lm_refuses(tiny_moe_dir, adapter)
    out = fuse_work / f"strict_out_{case}"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", out)
    assert r.code == 2 and not out.exists()
    line = r.err.strip()
    assert "\n" not in line and offender in line and "--lenient" in line, line

    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path", out,
                "--lenient", "--report", fuse_work / f"strict_{case}.json")
    assert r.code == 0, r.err
    report = read_json(fuse_work / f"strict_{case}.json")
    assert offender in report["summary"]["incompatible"]
    assert "--lenient" in r.err and offender in r.err
    # the offender was fused
    base, got = model_tensors(tiny_moe_dir), model_tensors(out)
    assert not mx.array_equal(base[f"{offender}.weight"], got[f"{offender}.weight"])


def test_accepts_what_mlx_lm_accepts(fuse_work, tiny_moe_dir, tiny_llama_dir, moe_adapter):
    """Adapters mlx-lm loads (keys relative to the blocks and as full paths,
    num_layers <= 0 and beyond the model, a DoRA on Linear layers without
    every m) fuse without --lenient."""
    from mlx_lm import load

    dora = make_adapter(tiny_llama_dir, fuse_work / "strict_dora_ok", dora=True, keys=["self_attn.q_proj"],
                        num_layers=2, drop=("layers.2.self_attn.q_proj.m",))
    every = make_adapter(tiny_moe_dir, fuse_work / "strict_all_layers", keys=[DOWN], num_layers=4)
    many = _rewrite_config(shutil.copytree(every, fuse_work / "strict_many_layers"), num_layers=99)
    negative = _rewrite_config(shutil.copytree(every, fuse_work / "strict_negative"), num_layers=-1)
    full = _rewrite_config(shutil.copytree(every, fuse_work / "strict_full_paths"),
                           keys=[f"model.layers.{i}.{DOWN}" for i in range(4)], num_layers=0)
    for model, adapter in ((tiny_moe_dir, moe_adapter), (tiny_llama_dir, dora), (tiny_moe_dir, many),
                           (tiny_moe_dir, negative), (tiny_moe_dir, full)):
        load(str(model), adapter_path=str(adapter))  # the oracle accepts it
        out = fuse_work / f"strict_ok_{adapter.name}"
        r = run_cli("fuse", "--model", model, "--adapter-path", adapter, "--save-path", out, "--quiet")
        assert r.code == 0, (adapter, r.err)
        assert "--lenient" not in r.err
