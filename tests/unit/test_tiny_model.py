"""pyfuse.demo.tiny_model: tokenizer, chat template, the tiny mlx-lm models the
other tests use (layout, realism, reproducibility, sharding)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.errors import UserError
from pyfuse.demo.tiny_model import (build_tiny_model, build_tokenizer, chat_corpus,
                                    pretrain_tiny_model, quantize_tiny_model, synthetic_corpus)

from helpers import file_digests, model_tensors, read_json

MESSAGES = [{"role": "user", "content": "Question: What is 2+2?\nOptions:\nA. 3\nB. 4"}]


def _load(path):
    import mlx_lm

    return mlx_lm.load(str(path))


def _load_tokenizer(path):
    from mlx_lm.tokenizer_utils import load

    return load(Path(path))


def _greedy(model, tokenizer, max_tokens=12):
    import mlx_lm

    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                           enable_thinking=False, tokenize=False)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)


def _config(path):
    return read_json(Path(path) / "config.json")


def _dequantized(model):
    """{module path: dequantized float32 weight} for every quantized module."""
    out = {}
    for name, m in model.named_modules():
        if "scales" in m and hasattr(m, "bits"):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
            out[name] = np.array(w.astype(mx.float32))
    return out


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_offline_and_round_trips(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert len(tok) == 1024
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.convert_tokens_to_ids("<think>") == 1022
    texts = synthetic_corpus(n_docs=8) + ["héllo wörld 日本語 \\boxed{42} 3.14159", "  two  spaces\n\n"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Trained merges compress the domain text well beyond bytes.
    doc = synthetic_corpus(n_docs=1)[0]
    assert len(tok.encode(doc)) < 0.5 * len(doc.encode())
    # Digits are split one by one (Qwen pre-tokenizer).
    assert [tok.decode([i]) for i in tok.encode("2024", add_special_tokens=False)] == list("2024")


def test_tokenizer_build_is_deterministic(tmp_path, tiny_tokenizer_dir):
    again = build_tokenizer(tmp_path / "tok")
    assert file_digests(again) == file_digests(tiny_tokenizer_dir)


def test_chat_template_qwen3_thinking_switch(tiny_tokenizer_dir):
    tok = _load_tokenizer(tiny_tokenizer_dir)
    assert tok.has_chat_template and tok.has_thinking
    user = "<|im_start|>user\n" + MESSAGES[0]["content"] + "<|im_end|>\n"
    off = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=False,
                                  tokenize=False)
    assert off == user + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    on = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=True,
                                 tokenize=False)
    assert on == user + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == user
    # Tokenized: the special tokens are single ids.
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.convert_tokens_to_ids("</think>")) == 1
    # Multi-turn: earlier assistant turns drop their reasoning, the last keeps
    # an (empty) think block, as Qwen3 renders them.
    convo = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello"},
             {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Goodbye"}]
    text = tok.apply_chat_template(convo, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\nGoodbye<|im_end|>\n")


def test_mlx_lm_chat_dataset_pipeline(tiny_llama_dir):
    """mlx-lm's LoRA data path (ChatDataset -> CacheDataset -> iterate_batches
    -> default_loss) runs on the tiny tokenizer and model."""
    from types import SimpleNamespace

    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset, create_dataset
    from mlx_lm.tuner.trainer import default_loss, iterate_batches

    model, tok = _load(tiny_llama_dir)
    data = chat_corpus(8)
    ds = create_dataset(data, tok, SimpleNamespace(mask_prompt=True))
    assert isinstance(ds, ChatDataset)
    tokens, offset = ds.process(data[0])
    completion = tok.decode(tokens[offset:])
    assert completion.startswith("<think>\n\n</think>\n\n")
    assert completion.endswith(data[0]["messages"][-1]["content"] + "<|im_end|>\n")
    batch, lengths = next(iterate_batches(CacheDataset(ds), batch_size=4, max_seq_length=256,
                                          seed=0))
    loss, ntoks = default_loss(model, batch, lengths)
    assert np.isfinite(loss.item()) and ntoks.item() > 0
    # An untrained model is close to uniform over the 1024 ids.
    assert abs(loss.item() - np.log(1024)) < 0.5


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("fixture", ["tiny_moe_dir", "tiny_moe_mixed_dir", "tiny_llama_dir"])
def test_models_load_and_generate_deterministically(request, fixture):
    path = request.getfixturevalue(fixture)
    model, tok = _load(path)
    first = _greedy(model, tok)
    assert isinstance(first, str) and first
    model2, tok2 = _load(path)
    assert _greedy(model2, tok2) == first
    size = sum(f.stat().st_size for f in Path(path).glob("model*.safetensors"))
    assert 100_000 < size < 1_000_000


def test_moe_layout_and_config(tiny_moe_dir):
    cfg = _config(tiny_moe_dir)
    assert cfg["model_type"] == "qwen3_moe" and cfg["torch_dtype"] == "float32"
    q = cfg["quantization"]
    assert cfg["quantization_config"] == q
    assert (q["group_size"], q["bits"], q["mode"]) == (64, 3, "affine")
    # Per-module entries: only the routers, at 8 bits (mlx-lm's quant_predicate).
    per_module = {k: v for k, v in q.items() if isinstance(v, dict)}
    assert set(per_module) == {f"model.layers.{i}.mlp.gate" for i in range(4)}
    assert all(v == {"group_size": 64, "bits": 8} for v in per_module.values())

    w = model_tensors(tiny_moe_dir)
    p = "model.layers.0.mlp.switch_mlp"
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert w[f"{p}.{proj}.weight"].shape == (8, 64, 64 * 3 // 32)
        assert w[f"{p}.{proj}.weight"].dtype == mx.uint32
        for part in ("scales", "biases"):
            assert w[f"{p}.{proj}.{part}"].shape == (8, 64, 1)
            assert w[f"{p}.{proj}.{part}"].dtype == mx.float32
    assert w["model.layers.0.mlp.gate.weight"].shape == (8, 64 * 8 // 32)
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (64, 6)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (32, 6)
    assert w["model.embed_tokens.weight"].shape == (1024, 6)
    assert w["lm_head.weight"].shape == (1024, 6)
    assert w["model.norm.weight"].dtype == mx.float32
    assert np.all(np.array(w["model.layers.0.input_layernorm.weight"]) == 1.0)
    index = json.loads((tiny_moe_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(w)
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def test_mixed_override_config_and_shapes(tiny_moe_mixed_dir):
    q = _config(tiny_moe_mixed_dir)["quantization"]
    for i in range(4):
        assert q[f"model.layers.{i}.mlp.switch_mlp.down_proj"] == {
            "group_size": 64, "bits": 6, "mode": "affine"}
        assert q[f"model.layers.{i}.mlp.gate"] == {"group_size": 64, "bits": 8}
        assert f"model.layers.{i}.mlp.switch_mlp.up_proj" not in q
    w = model_tensors(tiny_moe_mixed_dir)
    assert w["model.layers.2.mlp.switch_mlp.down_proj.weight"].shape == (8, 64, 64 * 6 // 32)
    assert w["model.layers.2.mlp.switch_mlp.up_proj.weight"].shape == (8, 64, 64 * 3 // 32)
    model, _ = _load(tiny_moe_mixed_dir)
    down = model.model.layers[2].mlp.switch_mlp.down_proj
    assert (down.bits, down.group_size) == (6, 64)


def test_llama_layout(tiny_llama_dir):
    cfg = _config(tiny_llama_dir)
    assert cfg["model_type"] == "llama"
    assert {k: v for k, v in cfg["quantization"].items()} == {
        "group_size": 64, "bits": 4, "mode": "affine"}
    w = model_tensors(tiny_llama_dir)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (64, 128 * 4 // 32)
    assert w["model.layers.0.mlp.gate_proj.weight"].shape == (128, 64 * 4 // 32)
    assert w["model.layers.0.mlp.down_proj.scales"].shape == (64, 2)


@pytest.mark.parametrize("fixture", ["tiny_moe_dir", "tiny_moe_mixed_dir", "tiny_llama_dir"])
def test_dequantized_weights_are_realistic(request, fixture):
    """Normal(0, 0.02) weights survive quantization with std ~0.02 (a 3-bit
    grid adds ~4% variance), and are not the default uniform init."""
    model, _ = _load(request.getfixturevalue(fixture))
    weights = _dequantized(model)
    assert len(weights) > 20
    for name, w in weights.items():
        assert abs(w.mean()) < 0.004, name
        assert 0.017 < w.std() < 0.024, (name, w.std())


def test_full_precision_weights_are_gaussian(tmp_path, tiny_tokenizer_dir):
    path = build_tiny_model(tmp_path / "fp", quantize=None, tokenizer_dir=tiny_tokenizer_dir,
                            weight_std=0.05)
    cfg = _config(path)
    assert "quantization" not in cfg and "quantization_config" not in cfg
    w = model_tensors(path)
    experts = np.array(w["model.layers.1.mlp.switch_mlp.up_proj.weight"]).ravel()
    assert experts.size == 8 * 64 * 64
    assert abs(experts.std() - 0.05) < 0.002
    kurtosis = ((experts - experts.mean()) ** 4).mean() / experts.var() ** 2
    assert 2.7 < kurtosis < 3.3  # Normal: 3; uniform: 1.8
    assert abs(np.array(w["model.embed_tokens.weight"]).std() - 0.02) < 0.001
    for k, v in w.items():
        if k.endswith("norm.weight"):
            assert np.all(np.array(v) == 1.0), k
    # Different seeds give different weights; same tensor for an unrelated size change.
    other = model_tensors(build_tiny_model(tmp_path / "fp2", quantize=None, seed=1, weight_std=0.05,
                                      tokenizer_dir=tiny_tokenizer_dir))
    assert not np.array_equal(np.array(other["lm_head.weight"]), np.array(w["lm_head.weight"]))
    deeper = model_tensors(build_tiny_model(tmp_path / "fp3", quantize=None, num_layers=5,
                                       weight_std=0.05, tokenizer_dir=tiny_tokenizer_dir))
    key = "model.layers.1.mlp.switch_mlp.up_proj.weight"
    assert np.array_equal(np.array(deeper[key]), np.array(w[key]))


def test_build_is_byte_identical(tmp_path, tiny_moe_mixed_dir):
    kwargs = dict(quantize={"group_size": 64, "bits": 3},
                  quant_overrides={"down_proj": {"group_size": 64, "bits": 6}})
    a = build_tiny_model(tmp_path / "a", **kwargs)  # tokenizer trained afresh
    b = build_tiny_model(tmp_path / "b", **kwargs)
    assert file_digests(a) == file_digests(b)
    assert file_digests(a) == file_digests(tiny_moe_mixed_dir)


def test_sharded_build_has_valid_index(tmp_path, tiny_moe_dir, tiny_tokenizer_dir):
    path = build_tiny_model(tmp_path / "sharded", shards=3, tokenizer_dir=tiny_tokenizer_dir)
    names = sorted(p.name for p in path.glob("model*.safetensors"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    seen = {}
    for name in names:
        for key, value in mx.load(str(path / name)).items():
            assert key not in seen
            seen[key] = value
    assert index["weight_map"] == {k: index["weight_map"][k] for k in sorted(index["weight_map"])}
    assert set(index["weight_map"]) == set(seen)
    for key, name in index["weight_map"].items():
        assert key in mx.load(str(path / name))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in seen.values())
    # Same tensors as the single-file build; loads and generates the same.
    single = model_tensors(tiny_moe_dir)
    assert set(single) == set(seen)
    assert all(mx.array_equal(single[k], seen[k]).item() for k in seen)
    assert _greedy(*_load(path)) == _greedy(*_load(tiny_moe_dir))


def test_bfloat16_build(tmp_path, tiny_tokenizer_dir):
    path = build_tiny_model(tmp_path / "bf16", dtype="bfloat16", tokenizer_dir=tiny_tokenizer_dir,
                            num_layers=2)
    w = model_tensors(path)
    assert w["model.layers.0.mlp.switch_mlp.down_proj.scales"].dtype == mx.bfloat16
    assert w["model.norm.weight"].dtype == mx.bfloat16
    assert _config(path)["torch_dtype"] == "bfloat16"
    model, tok = _load(path)
    logits = model(mx.array([tok.encode("Hello world")]))
    assert logits.shape[-1] == 1024 and bool(mx.all(mx.isfinite(logits)).item())


def test_qwen3_5_moe_builds_and_runs(tmp_path, tiny_tokenizer_dir):
    path = build_tiny_model(tmp_path / "q35", arch="qwen3_5_moe", tokenizer_dir=tiny_tokenizer_dir)
    cfg = _config(path)
    assert cfg["model_type"] == "qwen3_5_moe" and "text_config" in cfg
    assert cfg["quantization"]["language_model.model.layers.0.mlp.shared_expert_gate"]["bits"] == 8
    w = model_tensors(path)
    assert w["language_model.model.layers.0.mlp.switch_mlp.down_proj.weight"].shape == (8, 64, 6)
    assert w["language_model.model.layers.0.linear_attn.conv1d.weight"].dtype == mx.float32
    model, tok = _load(path)
    ids = mx.array([tok.encode("Question: 1+1? Answer: \\boxed{2}")])
    full, part = model(ids), model(ids[:, :5])
    assert mx.allclose(full[:, :5], part, atol=1e-5).item()  # causal, incl. the linear attention


def test_vocab_padding_and_override_errors(tmp_path, tiny_tokenizer_dir):
    path = build_tiny_model(tmp_path / "pad", arch="llama", vocab_size=1088, num_layers=1,
                            tokenizer_dir=tiny_tokenizer_dir)
    assert model_tensors(path)["model.embed_tokens.weight"].shape[0] == 1088
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        build_tiny_model(tmp_path / "x", vocab_size=512, tokenizer_dir=tiny_tokenizer_dir)
    with pytest.raises(UserError, match="match no quantizable module"):
        build_tiny_model(tmp_path / "x", quant_overrides={"nonexistent_proj": {"bits": 4}},
                         tokenizer_dir=tiny_tokenizer_dir)
    with pytest.raises(UserError, match="arch"):
        build_tiny_model(tmp_path / "x", arch="gpt2", tokenizer_dir=tiny_tokenizer_dir)
    # False keeps a module in full precision; mlx_lm.load still works.
    keep = build_tiny_model(tmp_path / "keep", num_layers=1, tokenizer_dir=tiny_tokenizer_dir,
                            quant_overrides={"mlp.gate": False, "lm_head": {"bits": 8}})
    w = model_tensors(keep)
    assert w["model.layers.0.mlp.gate.weight"].dtype == mx.float32
    assert "model.layers.0.mlp.gate.scales" not in w
    assert w["lm_head.weight"].shape == (1024, 16)
    _load(keep)


def test_pretrain_hook_then_quantize(tmp_path, tiny_tokenizer_dir):
    losses = []

    def pretrain(model, tokenizer):
        losses.extend(pretrain_tiny_model(model, tokenizer, iters=6, lr=1e-2, batch_size=2,
                                          seq_len=32))

    fp = build_tiny_model(tmp_path / "fp", arch="llama", num_layers=1, quantize=None,
                          tokenizer_dir=tiny_tokenizer_dir, pretrain=pretrain)
    assert len(losses) == 6 and losses[-1] < losses[0]
    q = quantize_tiny_model(fp, tmp_path / "q4", quantize={"group_size": 64, "bits": 4},
                            quant_overrides={"down_proj": {"bits": 8}})
    cfg = _config(q)
    assert cfg["quantization"]["bits"] == 4
    assert cfg["quantization"]["model.layers.0.mlp.down_proj"]["bits"] == 8
    _greedy(*_load(q), max_tokens=4)
    # Deterministic: the same pretraining gives the same weights.
    fp2 = build_tiny_model(tmp_path / "fp2", arch="llama", num_layers=1, quantize=None,
                           tokenizer_dir=tiny_tokenizer_dir,
                           pretrain=partial(pretrain_tiny_model, iters=6, lr=1e-2, batch_size=2,
                                            seq_len=32))
    assert file_digests(fp) == file_digests(fp2)
