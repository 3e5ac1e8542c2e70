"""`pyfuse zero-adapter`: the zero-delta twin keeps the adapter's structure,
its delta is exactly zero (mlx-lm's own LoRA layers give the base model's
logits), a `preserve` fuse of it leaves the model byte-identical, a `stock`
fuse is exactly MLX's re-quantization round trip of the fused modules, and
DoRA magnitudes equal the base rows' norms (recomputed in numpy from the
packed codes)."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.adapters.zero import is_zero_adapter, zero_adapter
from pyfuse.errors import UserError
from pyfuse.fuse import fuse_model
from pyfuse.io.safetensors import SafetensorsFile

from helpers import read_json, run_cli, write_adapter_dir

MOE_KEYS = ["mlp.switch_mlp.down_proj", "self_attn.q_proj"]
DORA_KEYS = ["self_attn.q_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def lora_case(tmp_path_factory, tiny_moe_dir):
    """A random LoRA adapter (every layer's experts' down_proj and q_proj) on the tiny MoE."""
    root = tmp_path_factory.mktemp("zero_lora")
    cfg = read_json(tiny_moe_dir / "config.json")
    E, H, I, r = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"], 4
    q_out = cfg["num_attention_heads"] * cfg.get("head_dim", H // cfg["num_attention_heads"])
    rng = np.random.default_rng(0)
    t = {}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t[f"{p}.mlp.switch_mlp.down_proj.lora_a"] = mx.array(rng.normal(0, 0.1, (E, r, I)).astype(np.float32))
        t[f"{p}.mlp.switch_mlp.down_proj.lora_b"] = mx.array(rng.normal(0, 0.1, (E, H, r)).astype(np.float32))
        t[f"{p}.self_attn.q_proj.lora_a"] = mx.array(rng.normal(0, 0.1, (H, r)).astype(np.float32))
        t[f"{p}.self_attn.q_proj.lora_b"] = mx.array(rng.normal(0, 0.1, (r, q_out)).astype(np.float32))
    adapter = write_adapter_dir(root / "adapter", t, keys=MOE_KEYS, rank=r, scale=2.0,
                                num_layers=cfg["num_hidden_layers"])
    twin = root / "zero"
    assert run_cli("zero-adapter", "--adapter-path", adapter, "--out", twin).code == 0
    return {"root": root, "adapter": adapter, "twin": twin, "tensors": t}


def test_lora_twin_has_the_parents_structure_and_a_zero_delta(lora_case):
    adapter, twin = lora_case["adapter"], lora_case["twin"]
    assert (twin / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    with SafetensorsFile(adapter / "adapters.safetensors") as a, SafetensorsFile(twin / "adapters.safetensors") as z:
        assert [(i.name, i.dtype, i.shape) for i in a.tensors.values()] == \
            [(i.name, i.dtype, i.shape) for i in z.tensors.values()]
        assert z.metadata == a.metadata == {"format": "mlx"}
        for name in a.tensors:
            before, after = np.asarray(a.read(name)), np.asarray(z.read(name))
            if name.endswith(".lora_b"):
                assert before.any()
                assert not after.any()
            else:
                assert np.array_equal(before, after)
    prov = read_json(twin / "zero_adapter.json")
    assert prov["zero_delta_of"] == str(adapter.resolve()) and prov["modules"] == 8
    assert is_zero_adapter(twin) and not is_zero_adapter(adapter)


def test_mlx_lm_runs_the_twin_exactly_like_the_base_model(lora_case, tiny_moe_dir):
    from mlx_lm.utils import load

    ids = mx.array([[5, 17, 300, 42, 9, 600, 7, 81]])
    base, _ = load(str(tiny_moe_dir))
    with_twin, _ = load(str(tiny_moe_dir), adapter_path=str(lora_case["twin"]))
    with_parent, _ = load(str(tiny_moe_dir), adapter_path=str(lora_case["adapter"]))
    lb, lt, lp = base(ids), with_twin(ids), with_parent(ids)
    assert mx.array_equal(lb, lt).item()  # the LoRA branch adds exactly zero
    assert not mx.allclose(lb, lp, atol=1e-4).item()  # while the parent's delta is felt


def test_preserve_fuse_of_the_twin_is_byte_identical(lora_case, tiny_moe_dir, tmp_path):
    res = fuse_model(tiny_moe_dir, lora_case["twin"], tmp_path / "fused", policy="preserve")
    assert res.summary["modules_fused"] == 8  # the twin really goes through the fuse
    for f in sorted(p.name for p in tiny_moe_dir.iterdir()):
        assert (tmp_path / "fused" / f).read_bytes() == (tiny_moe_dir / f).read_bytes(), f


def test_stock_fuse_of_the_twin_is_the_requantization_round_trip(lora_case, tiny_moe_dir, tmp_path):
    fuse_model(tiny_moe_dir, lora_case["twin"], tmp_path / "fused", policy="stock")
    base = mx.load(str(tiny_moe_dir / "model.safetensors"))
    fused = mx.load(str(tmp_path / "fused" / "model.safetensors"))
    assert base.keys() == fused.keys()
    fused_modules = {k.rsplit(".", 1)[0] for k in lora_case["tensors"]}
    changed = 0
    for name in base:
        module = name.rsplit(".", 1)[0]
        if module not in fused_modules:
            assert mx.array_equal(base[name], fused[name]).item(), name
            continue
        if not name.endswith(".weight"):
            continue
        w, s, b = base[f"{module}.weight"], base[f"{module}.scales"], base[f"{module}.biases"]
        # mlx_lm fuse with a zero delta: dequantize, add nothing, quantize again (3-bit g64)
        deq = mx.dequantize(w, s, b, group_size=64, bits=3)
        rw, rs, rb = mx.quantize(deq + mx.zeros_like(deq), group_size=64, bits=3)
        assert mx.array_equal(fused[f"{module}.weight"], rw).item()
        assert mx.array_equal(fused[f"{module}.scales"], rs).item()
        assert mx.array_equal(fused[f"{module}.biases"], rb).item()
        changed += int((fused[f"{module}.weight"] != w).sum().item())
    assert changed > 0  # realistic weights: the round trip is not idempotent


def _np_dequantize_4bit(w, s, b, group_size=64):
    w = np.asarray(w).astype(np.uint64)
    codes = np.stack([(w >> (4 * k)) & 0xF for k in range(8)], axis=-1).reshape(w.shape[0], -1)
    s, b = np.asarray(s, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return codes * np.repeat(s, group_size, axis=-1) + np.repeat(b, group_size, axis=-1)


def test_dora_twin_sets_magnitudes_to_the_base_rows_norms(tiny_llama_dir, tmp_path):
    cfg = read_json(tiny_llama_dir / "config.json")
    H, inter, r = cfg["hidden_size"], cfg["intermediate_size"], 4
    rng = np.random.default_rng(1)
    t = {}
    for layer in (2, 3):
        for key, (n_in, n_out) in (("self_attn.q_proj", (H, H)), ("mlp.down_proj", (inter, H))):
            p = f"model.layers.{layer}.{key}"
            t[f"{p}.lora_a"] = mx.array(rng.normal(0, 0.1, (n_in, r)).astype(np.float32))
            t[f"{p}.lora_b"] = mx.array(rng.normal(0, 0.1, (r, n_out)).astype(np.float32))
            t[f"{p}.m"] = mx.array(rng.uniform(0.5, 2.0, (n_out,)).astype(np.float32))
    adapter = write_adapter_dir(tmp_path / "dora", t, keys=DORA_KEYS, rank=r, scale=1.0, num_layers=2,
                                fine_tune_type="dora")

    with pytest.raises(UserError, match="DoRA adapter.*--model"):
        zero_adapter(adapter, tmp_path / "nomodel")
    r = run_cli("zero-adapter", "--adapter-path", adapter, "--out", tmp_path / "x")
    assert r.code == 2
    assert "needs the base model (--model)" in r.err
    assert not (tmp_path / "x").exists() and not (tmp_path / "nomodel").exists()

    res = zero_adapter(adapter, tmp_path / "zero", model=tiny_llama_dir)
    assert sorted(res.magnitudes) == sorted({k.rsplit(".", 1)[0] for k in t})
    base = mx.load(str(tiny_llama_dir / "model.safetensors"))
    twin = mx.load(str(tmp_path / "zero" / "adapters.safetensors"))
    for module in res.magnitudes:
        rows = _np_dequantize_4bit(base[f"{module}.weight"], base[f"{module}.scales"], base[f"{module}.biases"])
        np.testing.assert_allclose(np.asarray(twin[f"{module}.m"]), np.linalg.norm(rows, axis=-1), rtol=1e-6)
        assert not np.asarray(twin[f"{module}.lora_b"]).any()
        assert np.array_equal(np.asarray(twin[f"{module}.lora_a"]), np.asarray(t[f"{module}.lora_a"]))

    # preserve: byte-identical; mlx-lm's DoRA layers: the base model's outputs
    fuse_model(tiny_llama_dir, tmp_path / "zero", tmp_path / "fused", policy="preserve")
    for f in sorted(p.name for p in tiny_llama_dir.iterdir()):
        assert (tmp_path / "fused" / f).read_bytes() == (tiny_llama_dir / f).read_bytes(), f
    from mlx_lm.utils import load

    ids = mx.array([[3, 99, 512, 7, 250, 11]])
    lb = load(str(tiny_llama_dir))[0](ids)
    lt = load(str(tiny_llama_dir), adapter_path=str(tmp_path / "zero"))[0](ids)
    lp = load(str(tiny_llama_dir), adapter_path=str(adapter))[0](ids)
    assert mx.allclose(lb, lt, atol=1e-4, rtol=1e-4).item()
    assert not mx.allclose(lb, lp, atol=1e-2).item()


def test_bad_input_is_one_line_and_leaves_nothing(lora_case, tmp_path):
    adapter, twin = lora_case["adapter"], lora_case["twin"]
    r = run_cli("zero-adapter", "--adapter-path", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.code == 2
    assert "does not exist" in r.err
    # --out exists: refused without --force, replaced with it
    r = run_cli("zero-adapter", "--adapter-path", adapter, "--out", twin)
    assert r.code == 2
    assert "exists" in r.err
    copy = tmp_path / "twin"
    shutil.copytree(twin, copy)
    (copy / "stale.txt").write_text("x")
    r = run_cli("zero-adapter", "--adapter-path", adapter, "--out", copy, "--force")
    assert r.code == 0
    assert "lora_b zeroed in 8 module(s)" in r.out
    assert not (copy / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twin"]  # no temporary directories left
    # a corrupt adapter file: a clear error, nothing written
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    (bad / "adapters.safetensors").write_bytes(b"\x00" * 4)
    r = run_cli("zero-adapter", "--adapter-path", bad, "--out", tmp_path / "o")
    assert r.code == 2
    assert "adapters.safetensors" in r.err
    assert not (tmp_path / "o").exists()
