"""Drop-in parity with adapters trained by mlx-lm's own trainer
(``mlx_lm.lora.run``, a few iterations on tiny models): LoRA, DoRA and full
fine-tunes, Linear and SwitchLinear, 3-, 4- and 8-bit and a mixed recipe.
Each is fused by ``mlx_lm fuse`` (its Python entry) and by ``pyfuse fuse
--policy stock`` (same bytes expected: the models here have float32 scales
and mlx-lm saves float32 adapters, so neither documented deviation applies),
loaded by ``mlx_lm.load(base, adapter_path=...)``, and, changed so that
mlx-lm's loader refuses it, refused by both."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import types
from pathlib import Path

import pytest

from helpers import differing, mlx_fuse, model_tensors, read_json, run_cli, write_jsonl


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity_data")
    rows = [{"text": f"The capital of country {i} is city {i * 7 % 13}; its river is river {i % 5}."}
            for i in range(16)]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "valid.jsonl", rows[:4])
    return root


def mlx_lm_train(model: Path, out: Path, data: Path, **settings) -> Path:
    """``mlx_lm lora --train`` through its Python entry: 3 iterations."""
    from mlx_lm.lora import CONFIG_DEFAULTS, run

    args = copy.deepcopy(CONFIG_DEFAULTS)
    args.update(model=str(model), train=True, data=str(data), iters=3, batch_size=2, val_batches=1,
                steps_per_report=100, steps_per_eval=1000, save_every=1000, adapter_path=str(out),
                learning_rate=2e-3, max_seq_length=64, num_layers=2)
    args.update(settings)
    with contextlib.redirect_stdout(io.StringIO()):
        run(types.SimpleNamespace(**args))
    return out


@pytest.fixture(scope="module")
def models(fuse_work, tiny_tokenizer_dir, tiny_moe_dir, tiny_llama_dir):
    """name -> model directory."""
    from mlx_lm.convert import convert

    from pyfuse.demo.tiny_model import build_tiny_model

    root = fuse_work / "parity_models"
    out = {"moe_3bit": tiny_moe_dir, "llama_4bit": tiny_llama_dir}
    out["llama_8bit"] = build_tiny_model(root / "llama_8bit", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                                         quantize={"group_size": 64, "bits": 8})
    out["llama_bf16_4bit"] = build_tiny_model(root / "llama_bf16", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                                              quantize={"group_size": 64, "bits": 4}, dtype="bfloat16")
    out["moe_float"] = build_tiny_model(root / "moe_float", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                                        quantize=None)
    llama_float = build_tiny_model(root / "llama_float", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                                   quantize=None)
    out["llama_mixed_3_6"] = root / "llama_mixed_3_6"
    if not out["llama_mixed_3_6"].exists():
        with contextlib.redirect_stdout(io.StringIO()):
            convert(str(llama_float), str(out["llama_mixed_3_6"]), quantize=True, quant_predicate="mixed_3_6")
    return out


# name -> (model, training settings, extra fuse flags, how to make mlx-lm's loader refuse it)
CASES = {
    "lora_moe_3bit_linear_and_switch": ("moe_3bit", {"fine_tune_type": "lora"}, (), {"num_layers": 1}),
    "lora_moe_keys_switch_only": ("moe_3bit", {"lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 10.0,
                                                                   "keys": ["mlp.switch_mlp.down_proj"]}},
                                  (), {"keys": ["self_attn.q_proj"]}),
    "dora_llama_4bit": ("llama_4bit", {"fine_tune_type": "dora"}, (), {"num_layers": 1}),
    "lora_llama_8bit": ("llama_8bit", {"fine_tune_type": "lora"}, (), {"num_layers": 1}),
    "lora_llama_mixed_3_6": ("llama_mixed_3_6", {"fine_tune_type": "lora"}, (), {"num_layers": 1}),
    "lora_moe_dequantize": ("moe_3bit", {"fine_tune_type": "lora"}, ("--dequantize",), None),
    "full_moe_float": ("moe_float", {"fine_tune_type": "full"}, (), None),
}


def _refused_variant(adapter: Path, change: dict) -> Path:
    bad = shutil.copytree(adapter, adapter.with_name(adapter.name + "_refused"))
    cfg = read_json(bad / "adapter_config.json")
    for k, v in change.items():
        if k == "keys":
            cfg["lora_parameters"]["keys"] = v
        else:
            cfg[k] = v
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_mlx_lm(case, models, text_data, fuse_work):
    from mlx_lm import load

    model_name, settings, flags, refusal = CASES[case]
    model = models[model_name]
    adapter = mlx_lm_train(model, fuse_work / f"parity_{case}", text_data, **settings)
    load(str(model), adapter_path=str(adapter))  # mlx-lm's loader takes it

    ref = mlx_fuse(model, adapter, fuse_work / f"parity_{case}_mlx", *flags)
    out = fuse_work / f"parity_{case}_pyfuse"
    r = run_cli("fuse", "--model", model, "--adapter-path", adapter, "--save-path", out, "--quiet", *flags)
    assert r.code == 0, r.err
    want, got = model_tensors(ref), model_tensors(out)
    assert differing(want, got) == []
    if "--dequantize" not in flags:  # the fuse did something
        assert differing(model_tensors(model), got)

    if refusal is not None:
        bad = _refused_variant(adapter, refusal)
        with pytest.raises(ValueError):
            load(str(model), adapter_path=str(bad))
        r = run_cli("fuse", "--model", model, "--adapter-path", bad, "--save-path", out.with_name(out.name + "_bad"))
        assert r.code == 2 and "mlx-lm's loader refuses" in r.err, r.err


def test_dora_on_bf16_differs_as_documented(models, text_data, fuse_work):
    """The documented deviation: mlx-lm writes a DoRA layer of a bf16 model
    with float32 scales and biases, pyfuse keeps bf16; nothing else differs."""
    import mlx.core as mx

    model = models["llama_bf16_4bit"]
    adapter = mlx_lm_train(model, fuse_work / "parity_dora_bf16", text_data, fine_tune_type="dora", num_layers=1)
    want = model_tensors(mlx_fuse(model, adapter, fuse_work / "parity_dora_bf16_mlx"))
    out = fuse_work / "parity_dora_bf16_pyfuse"
    assert run_cli("fuse", "--model", model, "--adapter-path", adapter, "--save-path", out, "--quiet").code == 0
    got = model_tensors(out)
    dora = {k.rsplit(".", 1)[0] for k in mx.load(str(adapter / "adapters.safetensors"))}
    assert len(dora) == 7  # every Linear of the last block
    for name in differing(want, got):
        assert name.rsplit(".", 1)[0] in dora, name
    for m in dora:
        assert want[f"{m}.scales"].dtype == mx.float32 and got[f"{m}.scales"].dtype == mx.bfloat16


def test_dora_on_switch_refused_at_training_like_at_fuse(models, text_data, fuse_work):
    """mlx-lm cannot train DoRA on SwitchLinear; an adapter that claims it
    (fine_tune_type dora, switch tensors without m) is refused by both loaders."""
    adapter = mlx_lm_train(models["moe_3bit"], fuse_work / "parity_dora_switch_src", text_data,
                           lora_parameters={"rank": 4, "dropout": 0.0, "scale": 10.0,
                                            "keys": ["mlp.switch_mlp.up_proj"]})
    with pytest.raises(ValueError, match="DoRA"):
        mlx_lm_train(models["moe_3bit"], fuse_work / "parity_dora_switch_train", text_data, fine_tune_type="dora",
                     lora_parameters={"rank": 4, "dropout": 0.0, "scale": 10.0, "keys": ["mlp.switch_mlp.up_proj"]})
    bad = _refused_variant(adapter, {"fine_tune_type": "dora"})
    from mlx_lm import load

    with pytest.raises(ValueError):
        load(str(models["moe_3bit"]), adapter_path=str(bad))
    r = run_cli("fuse", "--model", models["moe_3bit"], "--adapter-path", bad,
                "--save-path", fuse_work / "parity_dora_switch_out")
    assert r.code == 2 and "without its magnitude m" in r.err
