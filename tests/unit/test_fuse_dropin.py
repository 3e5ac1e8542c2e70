"""``pyfuse fuse`` takes every flag of ``mlx_lm fuse`` with the same meaning
(GGUF export and Hub upload through mlx-lm's functions, --trust-remote-code,
Hub repo ids from the local cache), full fine-tunes and mlx-lm-lora's DoRA
format; each checked against mlx-lm itself."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from pyfuse.fuse import fuse_model

from helpers import (DOWN, differing, make_adapter, mlx_fuse, model_tensors, read_json, run_cli,
                     write_adapter_dir)


def _mlx_lm_fuse_flags() -> list[str]:
    """The option strings of ``mlx_lm fuse``'s own parser."""
    import mlx_lm.fuse

    class Caught(Exception):
        pass

    def capture(self, *a, **k):
        raise Caught(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        mlx_lm.fuse.parse_arguments()
    except Caught as c:
        parser = c.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def test_every_mlx_lm_fuse_flag_is_accepted():
    flags = _mlx_lm_fuse_flags()
    assert {"--export-gguf", "--gguf-path", "--upload-repo", "--trust-remote-code"} <= set(flags)
    from pyfuse.commands import fuse as fuse_command

    ours = argparse.ArgumentParser()
    fuse_command.add_arguments(ours)
    accepted = {s for a in ours._actions for s in a.option_strings}
    assert [f for f in flags if f not in accepted] == []


@pytest.fixture(scope="module")
def float_llama(fuse_work, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(fuse_work / "dropin_llama_f", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                            quantize=None)


def test_export_gguf_writes_mlx_lm_s_file(fuse_work, float_llama, tiny_llama_dir):
    adapter = make_adapter(float_llama, fuse_work / "gguf_adapter", keys=["self_attn.q_proj"], num_layers=1)
    ref = mlx_fuse(float_llama, adapter, fuse_work / "gguf_mlx", "--export-gguf")
    out = fuse_work / "gguf_pyfuse"
    r = run_cli("fuse", "--model", float_llama, "--adapter-path", adapter, "--save-path", out, "--export-gguf")
    assert r.code == 0, r.err
    # the same tensors (names, dtypes, bytes) and metadata; only their order in
    # the file differs (mlx-lm writes its graph's order, pyfuse the shards')
    want, want_meta = mx.load(str(ref / "ggml-model-f16.gguf"), return_metadata=True)
    got, got_meta = mx.load(str(out / "ggml-model-f16.gguf"), return_metadata=True)
    assert differing(want, got) == []
    assert {k: str(v) for k, v in want_meta.items()} == {k: str(v) for k, v in got_meta.items()}
    # a quantized model needs --dequantize (mlx-lm fails after writing); refused before anything
    q_adapter = make_adapter(tiny_llama_dir, fuse_work / "gguf_q_adapter", keys=["self_attn.q_proj"], num_layers=1)
    bad = fuse_work / "gguf_refused"
    r = run_cli("fuse", "--model", tiny_llama_dir, "--adapter-path", q_adapter, "--save-path", bad, "--export-gguf")
    assert r.code == 2 and "--dequantize" in r.err and not bad.exists()
    r = run_cli("fuse", "--model", tiny_llama_dir, "--adapter-path", q_adapter, "--save-path", bad, "--export-gguf",
                "--dequantize", "--gguf-path", "m.gguf")
    assert r.code == 0 and (bad / "m.gguf").stat().st_size > 0


def test_upload_repo_calls_mlx_lm_and_fails_offline_in_one_line(fuse_work, tiny_moe_dir, moe_adapter, monkeypatch):
    import mlx_lm.utils

    calls = []
    monkeypatch.setattr(mlx_lm.utils, "upload_to_hub", lambda path, repo: calls.append((path, repo)))
    out = fuse_work / "upload_ok"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out,
                "--upload-repo", "someone/fused", "--quiet")
    assert r.code == 0 and calls == [(str(out), "someone/fused")]
    assert (out / "README.md").exists()  # mlx-lm's model card, which its upload reads
    monkeypatch.undo()
    out = fuse_work / "upload_offline"
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out,
                "--upload-repo", "someone/fused", "--quiet")
    assert r.code == 2 and r.err.count("\n") == 1 and "--upload-repo someone/fused" in r.err, r.err
    assert (out / "config.json").exists()  # the fused model stays


def test_trust_remote_code_as_mlx_lm(fuse_work, tiny_moe_dir, moe_adapter):
    from mlx_lm import load

    model = shutil.copytree(tiny_moe_dir, fuse_work / "remote_code_model")
    cfg = read_json(model / "config.json")
    cfg["model_file"] = "custom_arch.py"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load(str(model))
    out = fuse_work / "remote_code_out"
    r = run_cli("fuse", "--model", model, "--adapter-path", moe_adapter, "--save-path", out)
    assert r.code == 2 and "--trust-remote-code" in r.err and not out.exists()
    r = run_cli("fuse", "--model", model, "--adapter-path", moe_adapter, "--save-path", out, "--trust-remote-code")
    assert r.code == 0, r.err


def test_hub_repo_id_resolved_from_the_local_cache(fuse_work, tiny_moe_dir, moe_adapter, moe_pyfuse):
    """A fake HF_HOME holding the model as a cached snapshot; offline."""
    home = fuse_work / "hf_home"
    repo = home / "hub" / "models--tiny--moe"
    shutil.copytree(tiny_moe_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYFUSE_PROGRESS": "0"}
    out = fuse_work / "hub_out"
    cmd = [sys.executable, "-m", "pyfuse", "fuse", "--adapter-path", str(moe_adapter), "--quiet"]
    p = subprocess.run(cmd + ["--model", "tiny/moe", "--save-path", str(out)], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert differing(model_tensors(moe_pyfuse), model_tensors(out)) == []
    p = subprocess.run(cmd + ["--model", "tiny/absent", "--save-path", str(fuse_work / "hub_absent")], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "local cache" in p.stderr, p.stderr


def test_full_fine_tune_replaces_and_quantizes(fuse_work, float_llama, tiny_llama_dir):
    """Trained tensors replace the base's byte for byte (as mlx_lm fuse on the
    float model); on the quantized model, stock quantizes them with MLX."""
    base = model_tensors(float_llama)
    names = ["model.layers.3.self_attn.o_proj.weight", "model.layers.3.mlp.down_proj.weight",
             "model.layers.3.input_layernorm.weight"]
    trained = {n: base[n] * 1.05 + 0.001 for n in names}
    adapter = write_adapter_dir(fuse_work / "full_adapter", trained, keys=None, rank=0, scale=0.0, num_layers=1,
                                fine_tune_type="full")
    ref = mlx_fuse(float_llama, adapter, fuse_work / "full_mlx")
    res = fuse_model(float_llama, adapter, fuse_work / "full_pyfuse")
    assert differing(model_tensors(ref), model_tensors(res.save_path)) == []
    assert sorted(res.summary["replaced"]) == sorted(names)

    qbase = model_tensors(tiny_llama_dir)
    got = model_tensors(fuse_model(tiny_llama_dir, adapter, fuse_work / "full_q").save_path)
    for n in names[:2]:
        m = n.rsplit(".", 1)[0]
        want = mx.quantize(trained[n].astype(qbase[f"{m}.scales"].dtype), group_size=64, bits=4)
        assert all(mx.array_equal(got[f"{m}.{leaf}"], x).item() for leaf, x in zip(("weight", "scales", "biases"), want))
    assert mx.array_equal(got[names[2]], trained[names[2]]).item()
    # a tensor the model does not have: refused like mlx-lm's loader
    bad = write_adapter_dir(fuse_work / "full_bad", {"model.layers.9.mlp.down_proj.weight": trained[names[1]]},
                            keys=None, rank=0, scale=0.0, num_layers=1, fine_tune_type="full")
    r = run_cli("fuse", "--model", float_llama, "--adapter-path", bad, "--save-path", fuse_work / "full_bad_out")
    assert r.code == 2 and "model.layers.9.mlp.down_proj.weight" in r.err


def test_mlx_lm_lora_use_dora_format(fuse_work, tiny_llama_dir):
    dora = make_adapter(tiny_llama_dir, fuse_work / "uds_dora", dora=True, keys=["mlp.down_proj"], num_layers=1)
    ref = mlx_fuse(tiny_llama_dir, dora, fuse_work / "uds_mlx")
    alt = shutil.copytree(dora, fuse_work / "uds_mlx_lm_lora")
    cfg = read_json(alt / "adapter_config.json")
    cfg["fine_tune_type"] = "lora"
    cfg["lora_parameters"]["use_dora"] = True
    (alt / "adapter_config.json").write_text(json.dumps(cfg))
    got = fuse_model(tiny_llama_dir, alt, fuse_work / "uds_pyfuse")
    assert differing(model_tensors(ref), model_tensors(got.save_path)) == []


def test_full_fine_tune_under_preserve_keeps_the_grid(fuse_work, float_llama, tiny_llama_dir):
    """preserve moves the base's codes towards the trained weight on the
    base's grid (the reference's rule against a NumPy oracle); a weight far
    off the grid is refused under --on-range-overflow error."""
    import numpy as np

    from pyfuse.kernel.reference import unpack_codes

    qbase, base = model_tensors(tiny_llama_dir), model_tensors(float_llama)
    n, m = "model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.down_proj"
    trained = {n: base[n] + 0.002}
    adapter = write_adapter_dir(fuse_work / "full_small", trained, keys=None, rank=0, scale=0.0, num_layers=1,
                                fine_tune_type="full")
    got = model_tensors(fuse_model(tiny_llama_dir, adapter, fuse_work / "full_small_preserve",
                                   policy="preserve").save_path)
    s = np.repeat(np.array(qbase[f"{m}.scales"]), 64, axis=-1)
    b = np.repeat(np.array(qbase[f"{m}.biases"]), 64, axis=-1)
    q = np.array(unpack_codes(qbase[n], 64, 4))
    steps = np.rint(q + (np.array(trained[n]) - (q * s + b)) / s)
    inside = ~((steps < 0) | (steps > 15)).reshape(*steps.shape[:-1], -1, 64).any(-1)
    assert inside.mean() > 0.5
    keep = np.repeat(inside, 64, axis=-1)
    assert (np.array(unpack_codes(got[n], 64, 4))[keep] == steps[keep]).all()
    assert (np.array(got[f"{m}.scales"])[inside] == np.array(qbase[f"{m}.scales"])[inside]).all()
    far = write_adapter_dir(fuse_work / "full_far", {n: base[n] * 3}, keys=None, rank=0, scale=0.0, num_layers=1,
                            fine_tune_type="full")
    r = run_cli("fuse", "--model", tiny_llama_dir, "--adapter-path", far, "--save-path", fuse_work / "full_far_out",
                "--policy", "preserve", "--on-range-overflow", "error")
    assert r.code == 2 and m in r.err
