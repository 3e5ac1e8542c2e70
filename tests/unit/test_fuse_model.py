"""``pyfuse fuse`` / ``pyfuse.fuse_model`` against ``mlx_lm fuse`` run in the
same test (the oracle), ``mlx_lm.load`` / ``mlx_lm.generate``, and MLX ops.

Adapters are made with mlx-lm's own ``linear_to_lora_layers`` (so their key
names and shapes are what ``mlx_lm lora`` writes) and saved like its trainer
(``tree_flatten(model.trainable_parameters())``), with random ``lora_b``.
"""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import pyfuse
import pyfuse.fuse.compute as compute
from pyfuse.cli import main as pyfuse_main
from pyfuse.errors import UserError
from pyfuse.fuse import fuse_model
from pyfuse.io.files import TMP_MARK
from pyfuse.io.model_dir import ModelDir

DOWN = "mlp.switch_mlp.down_proj"
UP = "mlp.switch_mlp.up_proj"
GATE = "mlp.switch_mlp.gate_proj"


# -- helpers ----------------------------------------------------------------------


def make_adapter(model_dir, out, *, keys=None, num_layers=2, rank=4, scale=20.0, dora=False,
                 b_std=2e-3, seed=0, drop=(), m_jitter=0.01):
    """An adapter directory as ``mlx_lm lora`` writes it, with random lora_b."""
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(model_dir))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = list(keys)
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    mx.random.seed(seed)
    model.update(tree_map_with_path(
        lambda p, v: mx.random.normal(v.shape) * b_std if p.endswith("lora_b") else v,
        model.trainable_parameters()))
    weights = dict(tree_flatten(model.trainable_parameters()))
    for k in weights:
        if k.endswith(".m"):
            weights[k] = weights[k] * (1 + m_jitter * mx.random.normal(weights[k].shape))
    weights = {k: v for k, v in weights.items() if not any(d in k for d in drop)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers,
         "lora_parameters": params}, indent=4))
    return out


def mlx_fuse(model, adapter, out, *extra):
    """``mlx_lm fuse`` (its own main, in process)."""
    import mlx_lm.fuse

    argv = sys.argv
    sys.argv = ["mlx_lm.fuse", "--model", str(model), "--adapter-path", str(adapter),
                "--save-path", str(out), *extra]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mlx_lm.fuse.main()
    finally:
        sys.argv = argv
    return Path(out)


def pyfuse_cli(*args) -> int:
    return pyfuse_main(["fuse", *map(str, args)])


def tensors(model_dir) -> dict[str, mx.array]:
    out = {}
    for f in sorted(Path(model_dir).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def raw(x: mx.array) -> bytes:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.asarray(x).tobytes()


def identical(x: mx.array, y: mx.array) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and raw(x) == raw(y)


def differing(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b), set(a) ^ set(b)
    return sorted(k for k in a if not identical(a[k], b[k]))


def module_tensors(names, module):
    return {n for n in names if n.rsplit(".", 1)[0] == module}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if TMP_MARK in p.name]


def snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(d.rglob("*")) if p.is_file()}


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuse")


@pytest.fixture(scope="module")
def moe_adapter(work, tiny_moe_dir):
    return make_adapter(tiny_moe_dir, work / "moe_adapter", keys=[DOWN, GATE, "self_attn.q_proj"])


@pytest.fixture(scope="module")
def moe_mlx(work, tiny_moe_dir, moe_adapter):
    return mlx_fuse(tiny_moe_dir, moe_adapter, work / "moe_mlx")


@pytest.fixture(scope="module")
def moe_pyfuse(work, tiny_moe_dir, moe_adapter):
    out = work / "moe_pyfuse"
    assert pyfuse_cli("--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out,
                      "--report", work / "moe_report.json") == 0
    return out


# -- stock parity -------------------------------------------------------------------------


def test_stock_matches_mlx_lm_fuse_on_moe(tiny_moe_dir, moe_mlx, moe_pyfuse):
    base, ref, got = tensors(tiny_moe_dir), tensors(moe_mlx), tensors(moe_pyfuse)
    assert differing(ref, got) == []
    # and the fuse did something: 2 layers x 3 modules x (weight, scales, biases)
    changed = differing(base, got)
    assert len(changed) == 18
    assert {".".join(n.split(".")[:3]) for n in changed} == {"model.layers.2", "model.layers.3"}


def test_stock_matches_when_processed_in_chunks(work, tiny_moe_dir, moe_adapter, moe_mlx, monkeypatch):
    """The fuse runs a few experts / rows at a time: results must not depend on it."""
    monkeypatch.setattr(compute, "CHUNK_ELEMENTS", 64 * 64 * 3)  # 3 experts or 192 rows a chunk
    monkeypatch.setattr(compute, "_kernel_is_native", lambda: False)  # chunk the kernel calls too
    out = fuse_model(tiny_moe_dir, moe_adapter, work / "moe_chunked").save_path
    assert differing(tensors(moe_mlx), tensors(out)) == []


def test_output_loads_and_generates_like_mlx_lm(tiny_moe_dir, moe_mlx, moe_pyfuse):
    from mlx_lm import generate, load

    m_ref, tok = load(str(moe_mlx))
    m_got, tok_got = load(str(moe_pyfuse))
    m_base, _ = load(str(tiny_moe_dir))
    ids = mx.array([tok.encode("The quick brown fox jumps over the lazy dog")])
    ref_logits, got_logits, base_logits = m_ref(ids), m_got(ids), m_base(ids)
    assert mx.array_equal(ref_logits, got_logits).item()
    assert not mx.array_equal(base_logits, got_logits).item()  # the adapter is in there
    prompt = "Question: what is two plus two?"
    out_ref = generate(m_ref, tok, prompt=prompt, max_tokens=12, verbose=False)
    out_got = generate(m_got, tok_got, prompt=prompt, max_tokens=12, verbose=False)
    assert out_ref == out_got and len(out_ref) > 0
    # the chat template came along unchanged
    assert tok_got.chat_template == tok.chat_template


def test_everything_but_the_weights_is_copied_unchanged(tiny_moe_dir, moe_pyfuse):
    src = {p.name for p in Path(tiny_moe_dir).iterdir()}
    assert {p.name for p in Path(moe_pyfuse).iterdir()} == src
    for name in src:
        if not name.endswith(".safetensors"):
            assert filecmp.cmp(Path(tiny_moe_dir) / name, Path(moe_pyfuse) / name, shallow=False), name


def test_mixed_precision_model(work, tiny_moe_mixed_dir):
    """6-bit down_proj in a 3-bit model: per-module precision is kept and the
    fused tensors match mlx-lm's."""
    from mlx_lm import load

    adapter = make_adapter(tiny_moe_mixed_dir, work / "mixed_adapter", keys=[DOWN, UP])
    ref = mlx_fuse(tiny_moe_mixed_dir, adapter, work / "mixed_mlx")
    out = fuse_model(tiny_moe_mixed_dir, adapter, work / "mixed_pyfuse")
    assert differing(tensors(ref), tensors(out.save_path)) == []
    cfg_in = json.loads((Path(tiny_moe_mixed_dir) / "config.json").read_text())
    cfg_out = json.loads((out.save_path / "config.json").read_text())
    assert cfg_out == cfg_in
    assert cfg_out["quantization"][f"model.layers.3.{DOWN}"]["bits"] == 6
    by_name = {r["module"]: r for r in out.report["tensors"]}
    assert by_name[f"model.layers.3.{DOWN}"]["bits"] == 6
    assert by_name[f"model.layers.3.{UP}"]["bits"] == 3
    model, _ = load(str(out.save_path))
    assert model.model.layers[3].mlp.switch_mlp.down_proj.bits == 6
    assert model.model.layers[3].mlp.switch_mlp.up_proj.bits == 3


def test_configured_layers_without_weights_are_left_alone(work, tiny_moe_dir):
    """mlx_lm fuse re-quantizes configured layers that have no adapter weights
    (with a zero lora_b); pyfuse leaves them byte-identical and says so."""
    missing = f"model.layers.2.{DOWN}"
    adapter = make_adapter(tiny_moe_dir, work / "partial_adapter", keys=[DOWN, GATE], drop=(missing,))
    ref = tensors(mlx_fuse(tiny_moe_dir, adapter, work / "partial_mlx"))
    res = fuse_model(tiny_moe_dir, adapter, work / "partial_pyfuse")
    got, base = tensors(res.save_path), tensors(tiny_moe_dir)
    names = set(base)
    untouched = module_tensors(names, missing)
    fused = set().union(*(module_tensors(names, f"model.layers.{i}.{k}")
                          for i, k in ((3, DOWN), (2, GATE), (3, GATE))))
    assert differing({k: ref[k] for k in fused}, {k: got[k] for k in fused}) == []
    assert differing({k: base[k] for k in names - fused}, {k: got[k] for k in names - fused}) == []
    # mlx-lm did change the weightless module (its zero-delta re-quantization)
    assert differing({k: base[k] for k in untouched}, {k: ref[k] for k in untouched})
    assert res.summary["configured_without_weights"] == [missing]
    assert any("have no adapter weights" in w for w in res.warnings)


@pytest.fixture(scope="module")
def qwen35_dir(work, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(work / "qwen35", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_5_moe",
                            quantize={"group_size": 64, "bits": 3})


def test_stock_matches_mlx_lm_on_qwen3_5_moe_every_layer_type(work, qwen35_dir):
    """No keys: every Linear / SwitchLinear of the last two blocks (linear
    attention, full attention, routed and shared experts, router gates)."""
    adapter = make_adapter(qwen35_dir, work / "q35_adapter", keys=None, num_layers=2)
    ref = tensors(mlx_fuse(qwen35_dir, adapter, work / "q35_mlx"))
    res = fuse_model(qwen35_dir, adapter, work / "q35_pyfuse")
    assert differing(ref, tensors(res.save_path)) == []
    assert len(res.fused) > 20 and res.summary["configured_without_weights"] == []
    assert {r["kind"] for r in res.report["tensors"]} == {"linear", "switch"}


def test_configured_modules_match_mlx_lm_graph(work, tiny_moe_dir, tiny_llama_dir, qwen35_dir):
    """The name-based list of modules an adapter config covers equals the
    LoRA layers mlx-lm's linear_to_lora_layers creates."""
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from pyfuse.fuse.mapping import configured_modules
    from pyfuse.io.adapter_dir import Adapter

    for model_dir, num_layers, keys in ((tiny_moe_dir, 2, None), (tiny_llama_dir, 3, None),
                                        (tiny_moe_dir, 1, [DOWN, "self_attn.o_proj"]),
                                        (tiny_llama_dir, -1, ["mlp.up_proj", "lm_head"]),
                                        (qwen35_dir, 3, None),
                                        (qwen35_dir, 0, ["linear_attn.out_proj", "mlp.switch_mlp.up_proj"])):
        model, _ = load(str(model_dir))
        params = {"rank": 2, "scale": 1.0, "dropout": 0.0}
        if keys:
            params["keys"] = keys
        linear_to_lora_layers(model, num_layers, params)
        expected = sorted(n for n, m in model.named_modules()
                          if isinstance(m, (LoRALinear, LoRASwitchLinear, LoRAEmbedding)))
        md = ModelDir(model_dir)
        adapter = Adapter(path=Path("."), config={}, fine_tune_type="lora", scale=1.0, rank=2,
                          num_layers=num_layers, keys=keys)
        layers = md.config.get("num_hidden_layers") or md.config["text_config"]["num_hidden_layers"]
        assert sorted(configured_modules(adapter, md.tensors, layers)) == expected, model_dir
        md.close()


# -- preserve / zero adapter ---------------------------------------------------------------


def test_zero_adapter_preserve_is_byte_identical(work, tiny_moe_mixed_dir):
    adapter = make_adapter(tiny_moe_mixed_dir, work / "zero_adapter", keys=[DOWN, GATE, "self_attn.v_proj"],
                           b_std=0.0)
    out = work / "zero_preserve"
    assert pyfuse_cli("--model", tiny_moe_mixed_dir, "--adapter-path", adapter, "--save-path", out,
                      "--policy", "preserve") == 0
    src = Path(tiny_moe_mixed_dir)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert filecmp.cmp(p, out / p.name, shallow=False), p.name
    # whereas stock (mlx-lm's algorithm) changes the same model with the same zero adapter
    ref = tensors(mlx_fuse(tiny_moe_mixed_dir, adapter, work / "zero_mlx"))
    stock = fuse_model(tiny_moe_mixed_dir, adapter, work / "zero_stock")
    assert differing(ref, tensors(stock.save_path)) == []
    assert differing(tensors(src), ref)
    assert stock.summary["retention"] is None and stock.summary["codes_changed"] > 0


def test_stochastic_keeps_the_delta_on_average(work, tiny_moe_dir):
    """A realistic small delta (~1 % of a 3-bit step): stock erases most of it,
    stochastic keeps it in expectation."""
    adapter = make_adapter(tiny_moe_dir, work / "small_adapter", keys=[DOWN, UP, GATE], num_layers=4,
                           b_std=1e-4)
    stock = fuse_model(tiny_moe_dir, adapter, work / "small_stock").summary
    sto = fuse_model(tiny_moe_dir, adapter, work / "small_sto", policy="stochastic", seed=1).summary
    assert stock["retention"] < 0.5
    assert abs(sto["retention"] - 1.0) < 0.35
    assert sto["kernel"] == stock["kernel"]


# -- other layer types, dequantize, precision -------------------------------------------------


def test_dora_and_embedding_match_mlx_lm(work, tiny_llama_dir):
    dora = make_adapter(tiny_llama_dir, work / "dora_adapter", dora=True,
                        keys=["self_attn.q_proj", "mlp.down_proj"])
    ref = mlx_fuse(tiny_llama_dir, dora, work / "dora_mlx")
    got = fuse_model(tiny_llama_dir, dora, work / "dora_pyfuse")
    assert differing(tensors(ref), tensors(got.save_path)) == []
    assert len(got.fused) == 4 and all("dora" in r["kind"] for r in got.report["tensors"])

    emb = make_adapter(tiny_llama_dir, work / "emb_adapter", num_layers=1,
                       keys=["model.embed_tokens", "lm_head", "self_attn.k_proj"])
    ref = mlx_fuse(tiny_llama_dir, emb, work / "emb_mlx")
    got = fuse_model(tiny_llama_dir, emb, work / "emb_pyfuse")
    assert differing(tensors(ref), tensors(got.save_path)) == []
    kinds = {r["module"]: r["kind"] for r in got.report["tensors"]}
    assert kinds == {"model.embed_tokens": "embedding", "lm_head": "linear",
                     "model.layers.3.self_attn.k_proj": "linear"}


def test_dequantize_matches_mlx_lm(work, tiny_moe_mixed_dir, moe_adapter):
    adapter = make_adapter(tiny_moe_mixed_dir, work / "dq_adapter", keys=[DOWN, "self_attn.q_proj"])
    ref = mlx_fuse(tiny_moe_mixed_dir, adapter, work / "dq_mlx", "--dequantize")
    out = work / "dq_pyfuse"
    assert pyfuse_cli("--model", tiny_moe_mixed_dir, "--adapter-path", adapter, "--save-path", out,
                      "--dequantize") == 0
    assert differing(tensors(ref), tensors(out)) == []
    cfg_ref = json.loads((ref / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert cfg == {k: v for k, v in cfg_ref.items() if k in cfg}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(out))
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in out.glob("*.safetensors")) \
        - sum(_header_size(p) for p in out.glob("*.safetensors"))


def _header_size(p: Path) -> int:
    import struct

    with open(p, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_requant_bits_records_precision_per_module(work, tiny_moe_dir):
    from mlx_lm import load

    adapter = make_adapter(tiny_moe_dir, work / "rb_adapter", keys=[DOWN], b_std=1e-3)
    res = fuse_model(tiny_moe_dir, adapter, work / "rb8", requant_bits=8, requant_group_size=32)
    out = res.save_path
    cfg = json.loads((out / "config.json").read_text())
    for layer in (2, 3):
        entry = {"group_size": 32, "bits": 8, "mode": "affine"}
        assert cfg["quantization"][f"model.layers.{layer}.{DOWN}"] == entry
        assert cfg["quantization_config"][f"model.layers.{layer}.{DOWN}"] == entry
    # the fused tensors are quantize_8(dequantize_3(W) + delta), computed here with MLX ops
    base, got = tensors(tiny_moe_dir), tensors(out)
    ad = mx.load(str(adapter / "adapters.safetensors"))
    p = f"model.layers.3.{DOWN}"
    w = mx.dequantize(base[f"{p}.weight"], base[f"{p}.scales"], base[f"{p}.biases"], group_size=64, bits=3)
    w = w + ((20.0 * ad[f"{p}.lora_b"]) @ ad[f"{p}.lora_a"]).astype(w.dtype)
    expect = mx.quantize(w, group_size=32, bits=8)
    for name, x in zip(("weight", "scales", "biases"), expect):
        assert identical(got[f"{p}.{name}"], x)
    untouched = set(base) - module_tensors(base, p) - module_tensors(base, f"model.layers.2.{DOWN}")
    assert differing({k: base[k] for k in untouched}, {k: got[k] for k in untouched}) == []
    model, tok = load(str(out))
    assert model.model.layers[3].mlp.switch_mlp.down_proj.bits == 8
    assert model.model.layers[3].mlp.switch_mlp.gate_proj.bits == 3
    model(mx.array([[1, 2, 3]]))
    # 8 bits keep the delta far better than the stock 3-bit fuse of the same adapter
    stock = fuse_model(tiny_moe_dir, adapter, work / "rb_stock")
    assert res.summary["retention"] > 0.95 > stock.summary["retention"]
    assert {r["from_bits"] for r in res.report["tensors"]} == {3}


def test_only_and_link_unchanged(work, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    model_dir = build_tiny_model(work / "sharded", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                                 quantize={"group_size": 64, "bits": 3}, shards=4)
    adapter = make_adapter(model_dir, work / "sharded_adapter", keys=[DOWN, GATE], num_layers=4)
    ref = tensors(mlx_fuse(model_dir, adapter, work / "sharded_mlx"))
    res = fuse_model(model_dir, adapter, work / "sharded_only", only=r"layers\.1\.mlp\.switch_mlp\.down",
                     link_unchanged=True)
    out = res.save_path
    target = f"model.layers.1.{DOWN}"
    assert res.fused == [target]
    assert len(res.summary["excluded_by_only"]) == 7
    base, got = tensors(model_dir), tensors(out)
    mine = module_tensors(base, target)
    assert differing({k: ref[k] for k in mine}, {k: got[k] for k in mine}) == []
    assert differing({k: base[k] for k in set(base) - mine}, {k: got[k] for k in set(base) - mine}) == []
    index = json.loads((Path(model_dir) / "model.safetensors.index.json").read_text())
    touched_shards = {index["weight_map"][k] for k in mine}
    shards = sorted(p.name for p in Path(model_dir).glob("model-*.safetensors"))
    assert len(shards) == 4 and len(touched_shards) < 4
    for name in shards:
        same_inode = os.stat(out / name).st_ino == os.stat(Path(model_dir) / name).st_ino
        assert same_inode == (name not in touched_shards), name
        assert res.summary["shards"][name] == ("written" if name in touched_shards else "linked")
    assert filecmp.cmp(Path(model_dir) / "model.safetensors.index.json",
                       out / "model.safetensors.index.json", shallow=False)


# -- the report -----------------------------------------------------------------------------


def test_report_figures_are_right(work, tiny_moe_dir, moe_adapter, moe_pyfuse):
    rep = json.loads((work / "moe_report.json").read_text())
    assert set(rep) == {"tensors", "summary"}
    base, got = tensors(tiny_moe_dir), tensors(moe_pyfuse)
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


def test_low_retention_warning_on_the_terminal(work, tiny_moe_dir, capsys):
    adapter = make_adapter(tiny_moe_dir, work / "tiny_delta", keys=[DOWN], b_std=3e-5)
    assert pyfuse_cli("--model", tiny_moe_dir, "--adapter-path", adapter, "--save-path",
                      work / "tiny_delta_out") == 0
    cap = capsys.readouterr()
    assert "retention" in cap.out and f"model.layers.3.{DOWN}.weight" in cap.out  # the table
    warning = [line for line in cap.err.splitlines() if "mostly erased" in line]
    assert len(warning) == 1
    assert "by 3-bit re-quantization: retention 0." in warning[0]
    assert "consider --policy stochastic, --requant-bits 8, --dequantize" in warning[0]


# -- bad input: exit 2, one line, nothing left behind ---------------------------------------------


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def _bad_cases(work: Path, moe: Path, llama: Path, adapter: Path):
    """name -> (model, adapter, expected message fragment)"""
    cases = {}
    cases["missing_model"] = (work / "nope", adapter, "model path")
    cases["missing_adapter"] = (moe, work / "nope_adapter", "adapter path")
    m = work / "bad_noconfig"
    if not m.exists():
        _copy_model(moe, m)
        (m / "config.json").unlink()
    cases["no_config"] = (m, adapter, "no config.json")
    m = work / "bad_notdir"
    m.write_text("x") if not m.exists() else None
    cases["model_is_file"] = (m, adapter, "is not a directory")
    a = work / "bad_noweights"
    if not a.exists():
        a.mkdir()
        shutil.copy(adapter / "adapter_config.json", a)
    cases["no_adapter_weights"] = (moe, a, "adapters.safetensors")
    # shapes that do not fit: lora_a with the wrong input size
    a = work / "bad_shape"
    if not a.exists():
        shutil.copytree(adapter, a)
        w = mx.load(str(a / "adapters.safetensors"))
        k = f"model.layers.3.{DOWN}.lora_a"
        w[k] = w[k][..., :32]
        mx.save_safetensors(str(a / "adapters.safetensors"), w)
    cases["adapter_shape"] = (moe, a, "adapter does not fit the model")
    # a dense adapter on the MoE model: modules it does not have
    a = work / "bad_llama_adapter"
    if not a.exists():
        make_adapter(llama, a, keys=["mlp.down_proj"], num_layers=1)
    cases["adapter_modules"] = (moe, a, "which the model does not have")
    m = work / "bad_truncated"
    if not m.exists():
        _copy_model(moe, m)
        f = m / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size - 1000])
    cases["truncated"] = (m, adapter, "truncated")
    m = work / "bad_header"
    if not m.exists():
        _copy_model(moe, m)
        f = m / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:20] = b"#garbage####"
        f.write_bytes(bytes(data))
    cases["corrupt_header"] = (m, adapter, "corrupt safetensors header")
    m = work / "bad_mode"
    if not m.exists():
        _copy_model(moe, m)
        cfg = json.loads((m / "config.json").read_text())
        cfg["quantization"]["mode"] = cfg["quantization_config"]["mode"] = "int3x"
        (m / "config.json").write_text(json.dumps(cfg))
    cases["quant_mode"] = (m, adapter, "unsupported quantization mode 'int3x'")
    m = work / "bad_awq"
    if not m.exists():
        _copy_model(moe, m)
        cfg = json.loads((m / "config.json").read_text())
        del cfg["quantization"]
        cfg["quantization_config"] = {"quant_method": "awq", "w_bit": 4}
        (m / "config.json").write_text(json.dumps(cfg))
    cases["hf_quant"] = (m, adapter, "quant_method 'awq' is not an mlx-lm quantization")
    a = work / "bad_full"
    if not a.exists():
        shutil.copytree(adapter, a)
        cfg = json.loads((a / "adapter_config.json").read_text())
        cfg["fine_tune_type"] = "full"
        (a / "adapter_config.json").write_text(json.dumps(cfg))
    cases["full_finetune"] = (moe, a, "fine_tune_type 'full'")
    return cases


BAD = ["missing_model", "missing_adapter", "no_config", "model_is_file", "no_adapter_weights",
       "adapter_shape", "adapter_modules", "truncated", "corrupt_header", "quant_mode", "hf_quant",
       "full_finetune"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_left(case, work, tiny_moe_dir, tiny_llama_dir, moe_adapter, capsys):
    model, adapter, fragment = _bad_cases(work, Path(tiny_moe_dir), Path(tiny_llama_dir), moe_adapter)[case]
    out_parent = work / f"out_{case}"
    out_parent.mkdir()
    before = snapshot(Path(model)) if Path(model).is_dir() else None
    rc = pyfuse_cli("--model", model, "--adapter-path", adapter, "--save-path", out_parent / "fused")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("pyfuse fuse: error: "), err
    assert fragment in err[0]
    assert list(out_parent.iterdir()) == []
    if before is not None:
        assert snapshot(Path(model)) == before


def test_bad_input_exit_code_from_the_real_command(work, tiny_moe_dir, moe_adapter):
    truncated = _bad_cases(work, Path(tiny_moe_dir), Path(tiny_moe_dir), moe_adapter)["truncated"][0]
    out = work / "real_cmd_out"
    r = subprocess.run([sys.executable, "-m", "pyfuse", "fuse", "--model", str(truncated),
                        "--adapter-path", str(moe_adapter), "--save-path", str(out)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "truncated" in r.stderr
    assert not out.exists() and leftovers(work) == []


def test_options_that_cannot_work(work, tiny_moe_dir, moe_adapter, capsys, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    out = work / "opts_out"
    for args, fragment in (
        (["--requant-bits", "7"], "--requant-bits 7 is not supported"),
        (["--dequantize", "--requant-bits", "8"], "cannot be combined"),
        (["--only", "(("], "not a valid regular expression"),
    ):
        assert pyfuse_cli("--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out, *args) == 2
        assert fragment in capsys.readouterr().err
        assert not out.exists()
    # grid-keeping policies do not apply to mxfp4: stock does (through MLX ops), preserve is refused
    mx4 = build_tiny_model(work / "mxfp4", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                           quantize={"group_size": 32, "bits": 4, "mode": "mxfp4"})
    adapter = make_adapter(mx4, work / "mxfp4_adapter", keys=[DOWN])
    assert pyfuse_cli("--model", mx4, "--adapter-path", adapter, "--save-path", out, "--requant", "preserve") == 2
    assert "works on affine quantization only" in capsys.readouterr().err
    assert not out.exists()
    ref = mlx_fuse(mx4, adapter, work / "mxfp4_mlx")
    res = fuse_model(mx4, adapter, out)
    assert differing(tensors(ref), tensors(out)) == []
    assert {r["mode"] for r in res.report["tensors"]} == {"mxfp4"}
    # mxfp4 -> affine 8-bit: the fused modules gain biases (written next to their weight)
    from mlx_lm import load

    res8 = fuse_model(mx4, adapter, work / "mxfp4_to_8", requant_bits=8)
    index = json.loads((res8.save_path / "model.safetensors.index.json").read_text())
    got = tensors(res8.save_path)
    assert set(index["weight_map"]) == set(got)
    assert f"model.layers.3.{DOWN}.biases" in got and f"model.layers.3.{UP}.biases" not in got
    model, _ = load(str(res8.save_path))
    layer = model.model.layers[3].mlp.switch_mlp
    assert (layer.down_proj.mode, layer.down_proj.bits, layer.up_proj.mode) == ("affine", 8, "mxfp4")
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, model.args.vocab_size)


def test_existing_save_path_needs_force(work, tiny_moe_dir, moe_adapter, moe_mlx, capsys):
    out = work / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert pyfuse_cli("--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "old"
    assert pyfuse_cli("--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out, "--force") == 0
    assert not (out / "keep.txt").exists()
    assert differing(tensors(moe_mlx), tensors(out)) == []
    assert leftovers(work) == []
    # never onto an input
    for target in (tiny_moe_dir, moe_adapter):
        assert pyfuse_cli("--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", target,
                          "--force") == 2
        assert "would overwrite the" in capsys.readouterr().err


# -- interruption -------------------------------------------------------------------------------


def test_error_midway_leaves_nothing(work, tiny_moe_dir, moe_adapter, monkeypatch):
    calls = []
    real = compute.run_job

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compute, "run_job", failing)
    out = work / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        fuse_model(tiny_moe_dir, moe_adapter, out)
    assert len(calls) == 3
    assert not out.exists() and leftovers(work) == []


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
def test_killed_run_leaves_no_output_and_rerun_works(sig, work, tiny_moe_dir, moe_adapter, moe_mlx):
    parent = work / f"kill_{sig.name}"
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
    assert pyfuse_cli("--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", out) == 0
    assert leftovers(parent) == []
    assert differing(tensors(moe_mlx), tensors(out)) == []


def test_user_error_type_from_the_api(work, tiny_moe_dir):
    with pytest.raises(UserError, match="adapter path"):
        fuse_model(tiny_moe_dir, work / "no_such_adapter", work / "never")


def test_sampled_report_estimates_the_exact_one(work, tiny_moe_dir, moe_adapter, monkeypatch):
    exact = fuse_model(tiny_moe_dir, moe_adapter, work / "exact_rep", report_sample=None).report
    if pyfuse.native_available():
        # The native sums are exact at memory speed: nothing is sampled.
        native = fuse_model(tiny_moe_dir, moe_adapter, work / "native_rep", report_sample=4096).report
        assert all(t["sampled"] == 1.0 for t in native["tensors"])
        for e, n in zip(exact["tensors"], native["tensors"]):
            assert n["retention"] == pytest.approx(e["retention"], rel=1e-6)
        # Sampling is the pure-MLX path's way to stay fast.
        monkeypatch.setattr("pyfuse.fuse.report.native_available", lambda: False)
    sampled = fuse_model(tiny_moe_dir, moe_adapter, work / "sampled_rep", report_sample=4096).report
    assert differing(tensors(work / "exact_rep"), tensors(work / "sampled_rep")) == []
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


def test_disk_full_is_one_line_and_leaves_nothing(work, tiny_moe_dir, moe_adapter, monkeypatch, capsys):
    import errno

    from pyfuse.io.safetensors import SafetensorsWriter

    def no_space(self, name, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SafetensorsWriter, "write", no_space)
    parent = work / "diskfull"
    parent.mkdir()
    assert pyfuse_cli("--model", tiny_moe_dir, "--adapter-path", moe_adapter, "--save-path", parent / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "nothing was written" in err[0]
    assert list(parent.iterdir()) == []
