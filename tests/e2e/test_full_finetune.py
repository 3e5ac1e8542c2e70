"""Full fine-tuning (``fine_tune_type: full``) against mlx-lm's own
``train_model``: on a float model the trained layers are mlx-lm's bit for
bit; on a quantized one the trained float weights are mlx-lm's on the same
layers dequantized by mlx-lm's ``dequantize_model``, the untouched tensors
are the base's bytes and the re-quantized ones are ``mx.quantize``'s (stock)
or on the base's grid (preserve); an existing destination is refused."""

from __future__ import annotations

import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.train import train_adapter

from helpers import differing, file_digests, identical, leftovers, model_tensors, read_json, run_cli, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
SETTINGS = {"iters": 6, "batch_size": 2, "grad_accumulation_steps": 2, "learning_rate": 1e-3,
            "steps_per_report": 2, "mask_prompt": True, "seed": 0}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"say {w} {i}"},
                          {"role": "assistant", "content": f"{w} {w[::-1]} {i % 3}"}]}
            for i, w in enumerate(WORDS)]
    return write_jsonl(tmp_path_factory.mktemp("full_data") / "train.jsonl", rows[:10])


@pytest.fixture(scope="module")
def float_llama_dir(tiny_models_root, tiny_tokenizer_dir):
    """The tiny llama in float32, not quantized."""
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(tiny_models_root / "llama_f32", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                            quantize=None)


def mlx_lm_full(model_dir: Path, data: Path, out: Path, num_layers: int, dequantize_layers: bool) -> dict:
    """``mlx_lm lora --fine-tune-type full``'s ``train_model`` (after its
    ``run``'s NumPy seed), on mlx-lm's datasets; with ``dequantize_layers``
    the last ``num_layers`` blocks are first dequantized by mlx-lm's
    ``dequantize_model``. Returns the written ``adapters.safetensors``."""
    from mlx_lm.lora import CONFIG_DEFAULTS, train_model
    from mlx_lm.tuner.datasets import create_dataset
    from mlx_lm.utils import dequantize_model, load

    from pyfuse.io.files import read_jsonl

    model, tok = load(str(model_dir))
    if dequantize_layers:
        for layer in model.layers[-num_layers:]:
            dequantize_model(layer)
    args = types.SimpleNamespace(**{**CONFIG_DEFAULTS, "fine_tune_type": "full", "num_layers": num_layers,
                                    "adapter_path": str(out), "optimizer_config": {}, **SETTINGS})
    train_set = create_dataset(read_jsonl(data), tok, args)
    np.random.seed(0)
    train_model(args, model, train_set, [])
    return mx.load(str(out / "adapters.safetensors"))


def test_full_float_model_equals_mlx_lm(float_llama_dir, train_file, tmp_path):
    """The same data, seed and settings: pyfuse's full fine-tune of the last
    2 layers writes exactly mlx-lm's trained tensors (bit for bit: the same
    compiled step on the same batches), and every other tensor unchanged."""
    ref = mlx_lm_full(float_llama_dir, train_file, tmp_path / "mlx", 2, dequantize_layers=False)
    res = train_adapter(float_llama_dir, train_file, tmp_path / "ours", fine_tune_type="full", layers="last:2",
                        **SETTINGS)
    out = tmp_path / "ours"
    trained = mx.load(str(out / "training" / "adapters.safetensors"))
    assert set(trained) == set(ref) and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in ref)
    assert not differing(trained, ref)
    base, ours = model_tensors(float_llama_dir), model_tensors(out)
    assert set(differing(base, ours)) <= set(ref) and len(differing(base, ours)) > len(ref) // 2
    for k in ref:
        assert identical(ours[k], ref[k]), k
    assert (out / "config.json").read_bytes() == (float_llama_dir / "config.json").read_bytes()
    cfg = read_json(out / "training" / "adapter_config.json")
    assert cfg["fine_tune_type"] == "full" and cfg["requantized"] == [] and cfg["layers"] == [2, 3]
    assert res.trainable_parameters == sum(v.size for v in ref.values())
    assert not leftovers(tmp_path)


def _requant_error_ok(trained, w, s, b, group_size, bits, steps: float) -> np.ndarray:
    """Per group: every dequantized weight within ``steps`` quantization
    steps (+ float slack) of the trained weight: half a step for rounding on
    a kept grid; one for MLX's affine fit, whose bias is pinned to a
    multiple of the scale (the grid moves by up to half a step)."""
    deq = np.array(mx.dequantize(w, s, b, group_size=group_size, bits=bits))
    err = np.abs(deq - np.array(trained)).reshape(*deq.shape[:-1], -1, group_size)
    step = np.abs(np.array(s))[..., None]
    return (err <= steps * step + 1e-6 * (1 + np.abs(np.array(trained)).reshape(err.shape))).all(axis=-1)


@pytest.mark.parametrize("policy", ["stock", "preserve"])
def test_full_quantized_model(tiny_llama_dir, train_file, tmp_path, policy):
    """A 4-bit base, the last 2 layers: the trained float weights are
    mlx-lm's full fine-tune of those layers dequantized; the untouched
    tensors are the base's bytes; stock: each re-quantized module is
    ``mx.quantize`` of its trained weight exactly; preserve: exactly the
    groups whose trained values fit the base's grid keep its scale and bias
    (and hold the nearest codes), the others are mx.quantize's fit."""
    out = tmp_path / "ours"
    train_adapter(tiny_llama_dir, train_file, out, fine_tune_type="full", layers="last:2", requant_policy=policy,
                  **SETTINGS)
    trained = mx.load(str(out / "training" / "adapters.safetensors"))
    if policy == "stock":  # the float training once (it does not depend on the policy)
        ref = mlx_lm_full(tiny_llama_dir, train_file, tmp_path / "mlx", 2, dequantize_layers=True)
        assert set(trained) == set(ref) and not differing(trained, ref)
    base, ours = model_tensors(tiny_llama_dir), model_tensors(out)
    cfg = read_json(out / "training" / "adapter_config.json")
    requantized = [n[: -len(".weight")] for n in cfg["requantized"]]
    assert len(requantized) == 14 and cfg["requant_policy"] == policy  # 7 projections x 2 layers
    trained_modules = {n.rsplit(".", 1)[0] for n in trained}
    untouched = [k for k in base if k.rsplit(".", 1)[0] not in trained_modules]
    assert untouched and not differing({k: base[k] for k in untouched}, {k: ours[k] for k in untouched})
    for name in cfg["replaced"]:
        assert identical(ours[name], trained[name]), name
    for m in requantized:
        t, w, s, b = trained[f"{m}.weight"], ours[f"{m}.weight"], ours[f"{m}.scales"], ours[f"{m}.biases"]
        qw, qs, qb = mx.quantize(t, group_size=64, bits=4)
        if policy == "stock":
            assert identical(w, qw) and identical(s, qs) and identical(b, qb), m
            assert _requant_error_ok(t, w, s, b, 64, 4, 1.0).all(), m
            continue
        s0, b0 = np.array(base[f"{m}.scales"]), np.array(base[f"{m}.biases"])
        kept = (np.array(s) == s0) & (np.array(b) == b0)
        codes = np.rint((np.array(t).reshape(*s0.shape, 64) - b0[..., None]) / s0[..., None])
        fits = ((codes >= 0) & (codes <= 15)).all(axis=-1)  # the trained group fits the base's grid
        assert kept.any() and np.array_equal(kept, fits), m
        assert _requant_error_ok(t, w, s, b, 64, 4, 0.5)[kept].all(), m  # the nearest code on the kept grid
        refit = ~kept  # MLX's affine fit of the trained values
        assert np.array_equal(np.array(s)[refit], np.array(qs)[refit]), m
        assert np.array_equal(np.array(b)[refit], np.array(qb)[refit]), m
        assert _requant_error_ok(t, w, s, b, 64, 4, 1.0).all(), m
    assert (out / "config.json").read_bytes() == (tiny_llama_dir / "config.json").read_bytes()
    note = (out / "training" / "README.md").read_text()
    assert f"requant_policy: {policy}" in note and "`model.layers.3.mlp.down_proj`" in note


def test_full_cli_keys_and_existing_destination(tiny_llama_dir, train_file, tmp_path):
    """`pyfuse train --fine-tune-type full --layers 1 --keys self_attn.q_proj`
    changes only that module; the same command again without --force is
    refused (exit 2, one line) and leaves the output byte-identical;
    `pyfuse eval`'s loader and `pyfuse noise-floor` take the output as a
    model, and `pyfuse fuse` of its training/ over the base writes it again."""
    out = tmp_path / "full"
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(train_file), "--adapter-path", str(out),
            "--fine-tune-type", "full", "--layers", "1", "--keys", "self_attn.q_proj", "--iters", "2",
            "--batch-size", "2", "--learning-rate", "1e-3", "--quiet"]
    res = run_cli(*argv)
    assert res.code == 0, res.err
    assert "full fine-tune (model directory; 1 weights re-quantized, stock)" in res.out
    base, ours = model_tensors(tiny_llama_dir), model_tensors(out)
    assert differing(base, ours) == [f"model.layers.1.self_attn.q_proj.{n}" for n in ("biases", "scales", "weight")]
    before = file_digests(out)
    again = run_cli(*argv)
    assert again.code == 2 and "already exists" in again.err and len(again.err.strip().splitlines()) == 1
    assert file_digests(out) == before and not leftovers(tmp_path)
    from pyfuse.lm.load import load_for_inference

    lm = load_for_inference(out)
    assert lm.model.layers[1].self_attn.q_proj.bits == 4
    # training/ is a full fine-tune adapter of the base: pyfuse fuse writes the same model from it
    fused = run_cli("fuse", "--model", str(tiny_llama_dir), "--adapter-path", str(out / "training"),
                    "--save-path", str(tmp_path / "fused"))
    assert fused.code == 0, fused.err
    assert (tmp_path / "fused" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    floor = run_cli("noise-floor", "--model", str(out), "--bits", "4", "--group-sizes", "64", "--policies",
                    "stock", "--no-outputs", "--out", str(tmp_path / "floor"), "--quiet")
    assert floor.code == 0, floor.err


def test_experiment_with_a_full_fine_tune(tiny_llama_dir, train_file, tmp_path):
    """A spec whose condition is a full fine-tune of layer 3: the train
    step's model/ is evaluated like a fused model, and only layer 3 differs
    from the base."""
    from helpers import write_yaml

    write_yaml(tmp_path / "suite.yaml", {
        "max_tokens": 3, "batch_size": 2, "behaviours": {"alpha": {"regex": "alpha"}},
        "prompts": [{"text": f"say {w} 1"} for w in WORDS[:2]]})
    spec = write_yaml(tmp_path / "spec.yaml", {
        "models": {"tiny": str(tiny_llama_dir)}, "data": {"chat": str(train_file)},
        "defaults": {"train": {"iters": 2, "batch_size": 2, "learning_rate": 1e-3, "val_batches": 1}},
        "evaluation": {"behaviour": {"suite": "suite.yaml"}},
        "conditions": {"base": {"from": "tiny"},
                       "full": {"from": "tiny", "stages": [{"train": {"data": "chat", "fine_tune_type": "full",
                                                                      "layers": "3"}}]}},
        "comparisons": [["full", "base"]], "report": {"noise_floor": False}})
    out = tmp_path / "run"
    run = run_cli("experiment", "run", spec, "--out", out)
    assert run.code == 0, run.err
    plan, results = read_json(out / "plan.json"), read_json(out / "results.json")
    ref = plan["conditions"]["full"]["model"]
    assert ref["out"] == "model" and ref["step"].startswith("train-")
    model = out / "steps" / ref["step"] / "model"
    changed = differing(model_tensors(tiny_llama_dir), model_tensors(model))
    assert changed and {n.split(".")[2] for n in changed} == {"3"}
    assert results["conditions"]["full"]["behaviour"]["alpha"]["n"] == 2
    assert "| full | tiny | train (full, layers 3) |" in (out / "report.md").read_text()


def test_full_resume_after_interrupt_gives_the_same_model(tiny_llama_dir, train_file, tmp_path):
    """Interrupted after its checkpoint at step 3 (the run directory stays)
    and resumed: the same model bytes as an uninterrupted run; --force
    replaces a finished one."""
    kw = dict(fine_tune_type="full", layers="last:1", save_every=3, **SETTINGS)
    train_adapter(tiny_llama_dir, train_file, tmp_path / "whole", **kw)

    def stop(it):
        if it == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_llama_dir, train_file, tmp_path / "cut", on_step=stop, **kw)
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.run" / "checkpoints" / "0000003").is_dir()
    res = train_adapter(tiny_llama_dir, train_file, tmp_path / "cut", resume=True, **kw)
    assert res.resumed_from == 3
    for name in ("model.safetensors", "training/adapters.safetensors"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "whole"]
    before = file_digests(tmp_path / "whole")
    train_adapter(tiny_llama_dir, train_file, tmp_path / "whole", force=True, **kw)
    after = file_digests(tmp_path / "whole")
    assert after.keys() == before.keys() and after["model.safetensors"] == before["model.safetensors"]


def test_full_moe_mixed_precision_keeps_each_modules_bits(tiny_moe_mixed_dir, train_file, tmp_path):
    """A 3-bit MoE whose experts' down_proj are 6-bit and router 8-bit
    (mlx-lm's default for gates): every re-quantized weight of block 3 is
    mx.quantize's at its module's own bits; the rest is the base's bytes."""
    from pyfuse.io.model_dir import ModelDir

    out = tmp_path / "moe"
    train_adapter(tiny_moe_mixed_dir, train_file, out, fine_tune_type="full", layers="3", iters=3, batch_size=2,
                  learning_rate=1e-3)
    cfg = read_json(out / "training" / "adapter_config.json")
    trained, ours, base = mx.load(str(out / "training" / "adapters.safetensors")), model_tensors(out), \
        model_tensors(tiny_moe_mixed_dir)
    bits = {}
    with ModelDir(tiny_moe_mixed_dir) as md:
        for name in cfg["requantized"]:
            m = name[: -len(".weight")]
            q = md.quant_params(m)
            bits[m.rsplit(".", 1)[1]] = q.bits
            expected = mx.quantize(trained[name], group_size=q.group_size, bits=q.bits)
            assert all(identical(a, ours[f"{m}.{n}"]) for a, n in zip(expected, ("weight", "scales", "biases"))), m
    assert bits["down_proj"] == 6 and bits["up_proj"] == 3 and len(cfg["requantized"]) == 8
    assert {n.split(".")[2] for n in differing(base, ours)} == {"3"}
    assert (out / "config.json").read_bytes() == (tiny_moe_mixed_dir / "config.json").read_bytes()
