"""Models made by mlx-lm's own ``convert`` with ``--quant-predicate mixed_*``
(per-module entries with ``"group_size": null``) read correctly everywhere:
the model reader (against what ``mlx_lm.load`` builds), the fuse and
``--dequantize`` (against the pure-MLX reference), the noise floor and the
evaluation."""

from __future__ import annotations

import contextlib
import io

import mlx.core as mx
import pytest

from pyfuse.fuse import fuse_model
from pyfuse.io.model_dir import ModelDir, QParams
from pyfuse.kernel.reference import delta_f32, fuse_requant_reference

from helpers import DOWN, make_adapter, mmlu_row, model_tensors, read_json, run_cli, write_jsonl

RECIPES = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")


@pytest.fixture(scope="module")
def float_moe(fuse_work, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(fuse_work / "recipe_float", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                            quantize=None)


@pytest.fixture(scope="module")
def recipe_models(fuse_work, float_moe):
    """recipe -> the model ``mlx_lm.convert(..., quantize=True, quant_predicate=recipe)`` writes."""
    from mlx_lm.convert import convert

    out = {}
    for recipe in RECIPES:
        path = fuse_work / f"recipe_{recipe}"
        if not path.exists():
            with contextlib.redirect_stdout(io.StringIO()):
                convert(str(float_moe), str(path), quantize=True, quant_predicate=recipe)
        out[recipe] = path
    return out


def _mlx_lm_quantization(model_dir) -> dict:
    """{module: QParams} of mlx-lm's loaded graph; the group size from the
    loaded arrays (mlx-lm keeps QuantizedSwitchLinear's null group size)."""
    from mlx_lm import load

    model, _ = load(str(model_dir))
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "scales"):
            in_dims = m.weight.shape[-1] * 32 // m.bits
            out[name] = QParams(m.bits, in_dims // m.scales.shape[-1])
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_read_as_mlx_lm_loads_them(recipe, recipe_models):
    path = recipe_models[recipe]
    block = read_json(path / "config.json")["quantization"]
    assert any(isinstance(v, dict) and v.get("group_size") is None for v in block.values())
    with ModelDir(path) as md:
        got = md.module_quantization()
    want = _mlx_lm_quantization(path)
    assert got == want
    assert len({q.bits for q in got.values()}) == 2  # the recipe's two widths


@pytest.mark.parametrize("recipe", ["mixed_2_6", "mixed_3_6"])
def test_fuse_and_dequantize_mixed_recipes(recipe, recipe_models, float_moe, fuse_work):
    path = recipe_models[recipe]
    # the adapter's names and shapes do not depend on the base's quantization;
    # mlx-lm cannot wrap a QuantizedSwitchLinear with a null group size
    adapter = make_adapter(float_moe, fuse_work / f"recipe_adapter_{recipe}", keys=[DOWN, "self_attn.v_proj"],
                           num_layers=4, b_std=5e-3) if not (fuse_work / f"recipe_adapter_{recipe}").exists() \
        else fuse_work / f"recipe_adapter_{recipe}"
    ad = mx.load(str(adapter / "adapters.safetensors"))
    quant = _mlx_lm_quantization(path)
    base = model_tensors(path)

    res = fuse_model(path, adapter, fuse_work / f"recipe_fused_{recipe}")
    got = model_tensors(res.save_path)
    assert len(res.fused) == 8
    for m in res.fused:
        a, b = ad[f"{m}.lora_a"], ad[f"{m}.lora_b"]
        a, b = (a, b) if a.ndim == 3 else (a.T, b.T)
        q = quant[m]
        want = fuse_requant_reference(base[f"{m}.weight"], base[f"{m}.scales"], base[f"{m}.biases"], a, b,
                                      scale=20.0, group_size=q.group_size, bits=q.bits, policy="stock")
        for leaf, x in zip(("weight", "scales", "biases"), want):
            assert mx.array_equal(got[f"{m}.{leaf}"], x).item(), (m, leaf)

    res = fuse_model(path, adapter, fuse_work / f"recipe_dq_{recipe}", dequantize=True)
    got = model_tensors(res.save_path)
    assert not any(k.endswith(".scales") for k in got)
    for m, q in quant.items():
        w = mx.dequantize(base[f"{m}.weight"], base[f"{m}.scales"], base[f"{m}.biases"], group_size=q.group_size,
                          bits=q.bits)
        if m in res.fused:
            a, b = ad[f"{m}.lora_a"], ad[f"{m}.lora_b"]
            w = w + delta_f32(*((a, b) if a.ndim == 3 else (a.T, b.T)), 20.0).astype(w.dtype)
        assert mx.array_equal(got[f"{m}.weight"], w).item(), m
    cfg = read_json(res.save_path / "config.json")
    assert "quantization" not in cfg and "quantization_config" not in cfg


def test_noise_floor_and_eval_on_a_mixed_recipe(recipe_models, tmp_path):
    from pyfuse.noise_floor.measure import measure_noise_floor

    path = recipe_models["mixed_3_6"]
    res = measure_noise_floor(path, group_sizes=[64], bits=[3], policies=["stock"], outputs=False)
    measured = {t["module"]: QParams(t["bits"], t["group_size"]) for t in res.tensors}
    assert measured == _mlx_lm_quantization(path)

    data = write_jsonl(tmp_path / "mc.jsonl", [mmlu_row(i) for i in range(3)])
    r = run_cli("eval", "mc", "--model", path, "--data", data, "--method", "logprob", "--json")
    assert r.code == 0, r.err
