"""``pyfuse fuse`` on bad input and when things go wrong: one line on stderr,
exit 2 (143 / 130 when terminated / interrupted), nothing half-written at
the save path, inputs never modified, and a rerun that works."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import pyfuse.fuse.compute as compute
from pyfuse.errors import UserError
from pyfuse.fuse import fuse_model

from helpers import (DOWN, UP, differing, file_digests, file_mtimes, leftovers, make_adapter, mlx_fuse,
                     model_tensors, read_json, run_cli)


# -- bad input: exit 2, one line, nothing left behind ------------------------------------------

def _bad_cases(fuse_work: Path, moe: Path, llama: Path, adapter: Path):
    """name -> (model, adapter, expected message fragment)"""
    cases = {}
    cases["missing_model"] = (fuse_work / "nope", adapter, "model path")
    cases["missing_adapter"] = (moe, fuse_work / "nope_adapter", "adapter path")
    m = fuse_work / "bad_noconfig"
    if not m.exists():
        shutil.copytree(moe, m)
        (m / "config.json").unlink()
    cases["no_config"] = (m, adapter, "no config.json")
    m = fuse_work / "bad_notdir"
    m.write_text("x") if not m.exists() else None
    cases["model_is_file"] = (m, adapter, "is not a directory")
    a = fuse_work / "bad_noweights"
    if not a.exists():
        a.mkdir()
        shutil.copy(adapter / "adapter_config.json", a)
    cases["no_adapter_weights"] = (moe, a, "adapters.safetensors")
    # shapes that do not fit: lora_a with the wrong input size
    a = fuse_work / "bad_shape"
    if not a.exists():
        shutil.copytree(adapter, a)
        w = mx.load(str(a / "adapters.safetensors"))
        k = f"model.layers.3.{DOWN}.lora_a"
        w[k] = w[k][..., :32]
        mx.save_safetensors(str(a / "adapters.safetensors"), w)
    cases["adapter_shape"] = (moe, a, "adapter does not fit the model")
    # a dense adapter on the MoE model: modules it does not have
    a = fuse_work / "bad_llama_adapter"
    if not a.exists():
        make_adapter(llama, a, keys=["mlp.down_proj"], num_layers=1)
    cases["adapter_modules"] = (moe, a, "which the model does not have")
    m = fuse_work / "bad_truncated"
    if not m.exists():
        shutil.copytree(moe, m)
        f = m / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])
    cases["truncated"] = (m, adapter, "truncated")
    m = fuse_work / "bad_header"
    if not m.exists():
        shutil.copytree(moe, m)
        f = m / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:20] = b"#garbage####"
        f.write_bytes(bytes(data))
    cases["corrupt_header"] = (m, adapter, "corrupt safetensors header")
    m = fuse_work / "bad_mode"
    if not m.exists():
        shutil.copytree(moe, m)
        cfg = read_json(m / "config.json")
        cfg["quantization"]["mode"] = cfg["quantization_config"]["mode"] = "int3x"
        (m / "config.json").write_text(json.dumps(cfg))
    cases["quant_mode"] = (m, adapter, "unsupported quantization mode 'int3x'")
    m = fuse_work / "bad_awq"
    if not m.exists():
        shutil.copytree(moe, m)
        cfg = read_json(m / "config.json")
        del cfg["quantization"]
        cfg["quantization_config"] = {"quant_method": "awq", "w_bit": 4}
        (m / "config.json").write_text(json.dumps(cfg))
    cases["hf_quant"] = (m, adapter, "quant_method 'awq' is not an mlx-lm quantization")
    a = fuse_work / "bad_full"
    if not a.exists():
        shutil.copytree(adapter, a)
        cfg = read_json(a / "adapter_config.json")
        cfg["fine_tune_type"] = "full"
        (a / "adapter_config.json").write_text(json.dumps(cfg))
    cases["full_finetune"] = (moe, a, "fine_tune_type 'full'")
    return cases


BAD = ["missing_model", "missing_adapter", "no_config", "model_is_file", "no_adapter_weights",
       "adapter_shape", "adapter_modules", "truncated", "corrupt_header", "quant_mode", "hf_quant",
       "full_finetune"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_left(case, fuse_work, tiny_moe_dir, tiny_llama_dir, moe_adapter):
    model, adapter, fragment = _bad_cases(fuse_work, Path(tiny_moe_dir), Path(tiny_llama_dir), moe_adapter)[case]
    out_parent = fuse_work / f"out_{case}"
    out_parent.mkdir()
    before = (file_digests(model), file_mtimes(model)) if Path(model).is_dir() else None
    r = run_cli("fuse", "--model", model, "--adapter-path", adapter, "--save-path", out_parent / "fused")
    err = r.err.strip().splitlines()
    assert r.code == 2
    assert len(err) == 1 and err[0].startswith("pyfuse fuse: error: "), err
    assert fragment in err[0]
    assert list(out_parent.iterdir()) == []
    if before is not None:
        assert (file_digests(model), file_mtimes(model)) == before


def test_bad_input_exit_code_from_the_real_command(fuse_work, tiny_moe_dir, moe_adapter):
    truncated = _bad_cases(fuse_work, Path(tiny_moe_dir), Path(tiny_moe_dir), moe_adapter)["truncated"][0]
    out = fuse_work / "real_cmd_out"
    r = subprocess.run([sys.executable, "-m", "pyfuse", "fuse", "--model", str(truncated),
                        "--adapter-path", str(moe_adapter), "--save-path", str(out)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "truncated" in r.stderr
    assert not out.exists() and leftovers(fuse_work) == []


def test_options_that_cannot_work(fuse_work, tiny_moe_dir, moe_adapter, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    out = fuse_work / "opts_out"
    for args, fragment in (
        (["--requant-bits", "7"], "--requant-bits 7 is not supported"),
        (["--dequantize", "--requant-bits", "8"], "cannot be combined"),
        (["--only", "(("], "not a valid regular expression"),
    ):
        r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out, *args)
        assert r.code == 2
        assert fragment in r.err
        assert not out.exists()
    # grid-keeping policies do not apply to mxfp4: stock does (through MLX ops), preserve is refused
    mx4 = build_tiny_model(fuse_work / "mxfp4", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                           quantize={"group_size": 32, "bits": 4, "mode": "mxfp4"})
    adapter = make_adapter(mx4, fuse_work / "mxfp4_adapter", keys=[DOWN])
    r = run_cli("fuse", "--model", mx4, "--adapter-path", adapter, "--save-path", out, "--requant", "preserve")
    assert r.code == 2
    assert "works on affine quantization only" in r.err
    assert not out.exists()
    ref = mlx_fuse(mx4, adapter, fuse_work / "mxfp4_mlx")
    res = fuse_model(mx4, adapter, out)
    assert differing(model_tensors(ref), model_tensors(out)) == []
    assert {r["mode"] for r in res.report["tensors"]} == {"mxfp4"}
    # mxfp4 -> affine 8-bit: the fused modules gain biases (written next to their weight)
    from mlx_lm import load

    res8 = fuse_model(mx4, adapter, fuse_work / "mxfp4_to_8", requant_bits=8)
    index = read_json(res8.save_path / "model.safetensors.index.json")
    got = model_tensors(res8.save_path)
    assert set(index["weight_map"]) == set(got)
    assert f"model.layers.3.{DOWN}.biases" in got and f"model.layers.3.{UP}.biases" not in got
    model, _ = load(str(res8.save_path))
    layer = model.model.layers[3].mlp.switch_mlp
    assert (layer.down_proj.mode, layer.down_proj.bits, layer.up_proj.mode) == ("affine", 8, "mxfp4")
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, model.args.vocab_size)


def test_existing_save_path_needs_force(fuse_work, tiny_moe_dir, moe_adapter, moe_mlx):
    out = fuse_work / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out)
    assert r.code == 2
    assert "already exists; pass --force" in r.err
    assert (out / "keep.txt").read_text() == "old"
    assert run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out,
                   "--force").code == 0
    assert not (out / "keep.txt").exists()
    assert differing(model_tensors(moe_mlx), model_tensors(out)) == []
    assert leftovers(fuse_work) == []
    # never onto an input
    for target in (tiny_moe_dir, moe_adapter):
        r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", target,
                    "--force")
        assert r.code == 2
        assert "never writes over or into its inputs" in r.err


def test_user_error_type_from_the_api(fuse_work, tiny_moe_dir):
    with pytest.raises(UserError, match="adapter path"):
        fuse_model(tiny_moe_dir, fuse_work / "no_such_adapter", fuse_work / "never")


# -- interruption ------------------------------------------------------------------------------

def test_error_midway_leaves_nothing(fuse_work, tiny_moe_dir, moe_adapter, monkeypatch):
    calls = []
    real = compute.run_job

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compute, "run_job", failing)
    out = fuse_work / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        fuse_model(tiny_moe_dir, moe_adapter, out)
    assert len(calls) == 3
    assert not out.exists() and leftovers(fuse_work) == []


_SLOW_RUN = """
import sys, time, pathlib
import pyfuse.fuse.compute as F
real = F.run_job
def slow(*a, **k):
    r = real(*a, **k)
    pathlib.Path(sys.argv[1]).write_text("started")
    time.sleep(60)
    return r
F.run_job = slow
from pyfuse.cli import main
sys.exit(main(["fuse", "--model", sys.argv[2], "--adapter-path", sys.argv[3], "--save-path", sys.argv[4]]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_killed_run_leaves_no_output_and_rerun_works(sig, fuse_work, tiny_moe_dir, moe_adapter, moe_mlx):
    parent = fuse_work / f"kill_{sig.name}"
    parent.mkdir()
    flag, out = parent / "started.flag", parent / "fused"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(flag), str(tiny_moe_dir), str(moe_adapter),
                             str(out)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert leftovers(parent)  # it is writing into its temporary directory
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        assert leftovers(parent)  # nothing could clean up, but it is hidden and named as ours
    else:
        assert (rc, err.count("nothing was left half-written")) == (143 if sig == signal.SIGTERM else 130, 1)
        assert ("terminated" if sig == signal.SIGTERM else "interrupted") in err
        assert leftovers(parent) == []
    # a rerun works and removes a dead run's temporary directory
    assert run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out).code == 0
    assert leftovers(parent) == []
    assert differing(model_tensors(moe_mlx), model_tensors(out)) == []


def test_disk_full_is_one_line_and_leaves_nothing(fuse_work, tiny_moe_dir, moe_adapter, monkeypatch):
    import errno

    from pyfuse.io.safetensors import SafetensorsWriter

    def no_space(self, name, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SafetensorsWriter, "write", no_space)
    parent = fuse_work / "diskfull"
    parent.mkdir()
    r = run_cli("fuse", "--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", parent / "out")
    assert r.code == 2
    err = r.err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "nothing was written" in err[0]
    assert list(parent.iterdir()) == []
