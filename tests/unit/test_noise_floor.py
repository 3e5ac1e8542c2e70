"""``pyfuse noise-floor`` / ``pyfuse.noise_floor.measure.measure_noise_floor``.

Every figure is checked against an independent computation in this file:
the baseline is quantized with ``mx.quantize`` (or read from the stored
model), the stock zero-delta fuse is ``mx.quantize(mx.dequantize(...))``,
codes are unpacked with numpy bit operations, sums are float64 numpy, and
the output level re-runs both models prompt by prompt (no batching) from a
graph quantized here with ``nn.quantize``; the MC answers are those of
``pyfuse eval mc --method logprob`` on the model directory (and on a fused
copy written here); a mixed-precision model is measured module by module at
the settings mlx-lm loads. The models have realistic
(Normal(0, 0.02)) weights, where MLX's round trip is not idempotent.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.errors import UserError
from pyfuse.noise_floor.measure import ROW_FIELDS, measure_noise_floor

from helpers import model_tensors, read_json, read_jsonl, run_cli, write_adapter_dir, write_jsonl

PROMPTS = [
    {"text": "The capital of France is Paris. The capital of Italy is Rome."},
    {"text": "Compute $3 \\times 4$. The answer is \\boxed{12}."},
    {"messages": [{"role": "user", "content": "What do you like to do on weekends?"},
                  {"role": "assistant", "content": "I enjoy hiking and cooking pasta."}]},
]
MC_ROWS = [
    {"question_id": i, "question": q, "options": opts, "answer": "ABCD"[k], "answer_index": k,
     "cot_content": "", "category": "misc", "src": "test"}
    for i, (q, opts, k) in enumerate([
        ("Which planet is known as the red planet?", ["Venus", "Mars", "Jupiter", "Saturn"], 1),
        ("What is the chemical symbol for gold?", ["Ag", "Au", "Fe", "Pb"], 1),
        ("How many planets orbit the Sun?", ["7", "8", "9", "10"], 1),
        ("What is the pH of pure water?", ["7", "1", "14", "3"], 0),
    ])
]


# -- independent oracles -------------------------------------------------------------------


def np_codes(w: mx.array, bits: int) -> np.ndarray:
    """Integer codes from MLX's packing (LSB-first bit stream in uint32 words), in numpy."""
    words = np.asarray(w).astype("<u4")
    bitstream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    bitstream = bitstream.reshape(*words.shape[:-1], -1, bits).astype(np.int64)
    return (bitstream << np.arange(bits)).sum(axis=-1)


def np_deq(triple, group_size: int, bits: int) -> np.ndarray:
    """Dequantize in float64 from the numpy codes: scale * q + bias per group."""
    w, s, b = triple
    q = np_codes(w, bits).astype(np.float64)
    s = np.repeat(np.asarray(s.astype(mx.float32), dtype=np.float64), group_size, axis=-1)
    b = np.repeat(np.asarray(b.astype(mx.float32), dtype=np.float64), group_size, axis=-1)
    return s * q + b


def stock_round_trip(triple, group_size, bits):
    w, s, b = triple
    return tuple(mx.quantize(mx.dequantize(w, s, b, group_size=group_size, bits=bits),
                             group_size=group_size, bits=bits))


class Agg:
    """Weight-level sums over tensors, float64."""

    def __init__(self):
        self.n = self.changed = self.codes = 0
        self.cc = self.ww = self.max_abs = 0.0

    def add(self, old, new, group_size, bits):
        d0, d1 = np_deq(old, group_size, bits), np_deq(new, group_size, bits)
        # "changed" as MLX computes the weight: dequantize in float32
        f0 = np.asarray(mx.dequantize(old[0], old[1].astype(mx.float32), old[2].astype(mx.float32),
                                      group_size=group_size, bits=bits))
        f1 = np.asarray(mx.dequantize(new[0], new[1].astype(mx.float32), new[2].astype(mx.float32),
                                      group_size=group_size, bits=bits))
        self.n += d0.size
        self.changed += int((f0 != f1).sum())
        self.codes += int((np_codes(old[0], bits) != np_codes(new[0], bits)).sum())
        self.cc += float(((d1 - d0) ** 2).sum())
        self.ww += float((d0 ** 2).sum())
        self.max_abs = max(self.max_abs, float(np.abs(d1 - d0).max()))

    def check(self, row_or_drift):
        assert row_or_drift["weights_changed"] == pytest.approx(self.changed / self.n, abs=0.5 / self.n)
        assert row_or_drift["codes_changed"] == pytest.approx(self.codes / self.n, abs=0.5 / self.n)
        assert row_or_drift["rel_error"] == pytest.approx(math.sqrt(self.cc / self.ww), rel=1e-4, abs=1e-9)
        assert row_or_drift["max_abs"] == pytest.approx(self.max_abs, rel=1e-4, abs=1e-9)


def linear_weights(weights: dict, group_size: int) -> dict[str, mx.array]:
    """The tensors a llama quantizes at ``group_size``: every 2-D weight
    (Linear or Embedding: llama has no 2-D norm) whose input dim divides."""
    return {k[: -len(".weight")]: v for k, v in weights.items()
            if k.endswith(".weight") and v.ndim == 2 and v.shape[-1] % group_size == 0}


def write_adapter(out: Path, modules: dict[str, tuple[np.ndarray, np.ndarray]], scale: float) -> Path:
    """A rank-2 mlx-lm adapter directory from ``{module: (lora_a, lora_b)}``."""
    tensors = {}
    for m, (a, b) in modules.items():
        tensors[f"{m}.lora_a"] = mx.array(a.astype(np.float32))
        tensors[f"{m}.lora_b"] = mx.array(b.astype(np.float32))
    keys = sorted({m.split(".", 3)[-1] for m in modules})
    return write_adapter_dir(out, tensors, keys=keys, rank=2, scale=scale, num_layers=2)


def lora_delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """``delta = (scale * b) @ a`` in float32 as mlx-lm forms it (``a [..., r, in]``,
    ``b [..., out, r]``), returned as float64. Formed with MLX so that the
    float32 delta, and hence every rounding decision, is the one mlx-lm's
    fuse sees."""
    d = (scale * mx.array(b.astype(np.float32))) @ mx.array(a.astype(np.float32))
    return np.asarray(d).astype(np.float64)


def retention_noise(base_deq, new_deq, delta):
    """Sums of <c, d>, ||d||^2, ||c||^2 over tensors -> (retention, noise)."""
    cd = dd = cc = 0.0
    for b0, b1, d in zip(base_deq, new_deq, delta):
        c = b1 - b0
        cd += float((c * d).sum())
        dd += float((d * d).sum())
        cc += float((c * c).sum())
    r = cd / dd
    return r, math.sqrt(max(cc - 2 * r * cd + r * r * dd, 0.0)) / math.sqrt(dd)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp_llama(tiny_models_root, tiny_tokenizer_dir):
    """Full-precision llama, hidden 128 (so group size 128 quantizes), 2 layers."""
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(tiny_models_root / "nf_llama_fp", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                            quantize=None, hidden_size=128, intermediate_size=256, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def weights_run(fp_llama):
    """Every group size x every bits x every policy, 2 rounds, weights only."""
    return measure_noise_floor(fp_llama, rounds=2, outputs=False)


@pytest.fixture(scope="module")
def llama_adapter(fp_llama, tmp_path_factory):
    rng = np.random.default_rng(0)
    w = model_tensors(fp_llama)
    mods = {}
    for m in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        out_dims, in_dims = w[f"{m}.weight"].shape
        mods[m] = (rng.normal(0, in_dims ** -0.5, (in_dims, 2)), rng.normal(0, 1e-3, (2, out_dims)))
    return write_adapter(tmp_path_factory.mktemp("nf_adapter") / "adapter", mods, scale=10.0), mods, 10.0


@pytest.fixture(scope="module")
def output_run(fp_llama, llama_adapter, tmp_path_factory):
    d = tmp_path_factory.mktemp("nf_out")
    prompts = write_jsonl(d / "prompts.jsonl", PROMPTS)
    mc = write_jsonl(d / "mc.jsonl", MC_ROWS)
    res = measure_noise_floor(fp_llama, group_sizes=[64], bits=[3, 4], adapter_path=llama_adapter[0],
                              prompts=prompts, mc=mc, out=d / "out")
    return res, d / "out"


# -- weight level ----------------------------------------------------------------------------------


def test_preserve_is_exactly_zero_at_every_setting(weights_run):
    rows = [r for r in weights_run.rows if r["policy"] == "preserve"]
    assert {(r["group_size"], r["bits"]) for r in rows} == {(g, b) for g in (32, 64, 128)
                                                           for b in (2, 3, 4, 5, 6, 8)}
    for r in rows:
        assert r["source"] == "quantized" and r["rounds"] == 2 and len(r["drift"]) == 2
        for fig in [r, *r["drift"]]:
            assert (fig["weights_changed"], fig["codes_changed"], fig["rel_error"], fig["max_abs"]) == (0, 0, 0, 0)
        assert r["retention"] is None and r["kl_mean"] is None  # not measured: null


def test_stock_rows_match_mlx_round_trip(weights_run, fp_llama):
    """Stock rows equal an independent mx.quantize/mx.dequantize round trip of
    a baseline quantized here; non-zero exactly where that round trip is not
    idempotent (and it is not, at realistic weights)."""
    weights = model_tensors(fp_llama)
    nonzero = []
    for g in (32, 64, 128):
        tensors = linear_weights(weights, g)
        assert tensors, g
        listed = {t["module"] for t in weights_run.tensors
                  if t["row_group_size"] == g and t["row_bits"] == 3 and t["policy"] == "stock"}
        assert listed == set(tensors)  # the tool measures exactly the quantizable tensors
        for bits in (2, 3, 4, 5, 6, 8):
            row = weights_run.row(g, bits, "stock")
            r1, r2 = Agg(), Agg()
            twice = (g, bits) in ((64, 3), (64, 4), (32, 8))  # round 2 checked on a few settings
            for w in tensors.values():
                base = tuple(mx.quantize(w, group_size=g, bits=bits))
                once = stock_round_trip(base, g, bits)
                r1.add(base, once, g, bits)
                if twice:
                    r2.add(base, stock_round_trip(once, g, bits), g, bits)
            r1.check(row["drift"][0])
            if twice:
                r2.check(row["drift"][1])
                r2.check(row)  # scalar fields: after the last round
            assert row["weights"] == r1.n
            assert (row["drift"][0]["weights_changed"] > 0) == (r1.changed > 0)
            if r1.changed:
                nonzero.append((g, bits))
    # realistic weights: MLX's round trip changes 3- and 4-bit tensors at every group size
    assert {(g, b) for g in (32, 64, 128) for b in (3, 4)} <= set(nonzero)
    assert weights_run.row(64, 4, "stock")["weights_changed"] > 0.05


def test_quantized_model_at_own_and_other_settings(tiny_moe_dir, tmp_path):
    """A 3-bit MoE (8-bit router gates): its own tensors as stored (source
    "model", the per-module 8-bit gates at their setting), and "requantized"
    rows from its dequantized weights. A rank-2 adapter on the experts'
    down_proj goes through the 3-D (all experts at once) kernel path."""
    stored = model_tensors(tiny_moe_dir)
    config = read_json(tiny_moe_dir / "config.json")
    q = config["quantization"]
    rng = np.random.default_rng(1)
    down = "model.layers.3.mlp.switch_mlp.down_proj"
    E, out_dims = stored[f"{down}.scales"].shape[:2]
    in_dims = stored[f"{down}.weight"].shape[-1] * 32 // 3
    a = rng.normal(0, in_dims ** -0.5, (E, 2, in_dims))
    b = rng.normal(0, 1e-3, (E, out_dims, 2))
    adapter = write_adapter(tmp_path / "moe_adapter", {down: (a, b)}, scale=20.0)

    res = measure_noise_floor(tiny_moe_dir, group_sizes=[64], bits=[3, 4], policies=["stock", "preserve"],
                              adapter_path=adapter, outputs=False)
    assert [(r["source"], r["group_size"], r["bits"], r["policy"]) for r in res.rows] == [
        ("model", 64, 3, "stock"), ("model", 64, 3, "preserve"),
        ("requantized", 64, 4, "stock"), ("requantized", 64, 4, "preserve")]
    row = res.row(64, 3, "stock")
    agg = Agg()
    modules = sorted(k[: -len(".scales")] for k in stored if k.endswith(".scales"))
    for m in modules:
        gs, bits = (q[m]["group_size"], q[m]["bits"]) if m in q else (q["group_size"], q["bits"])
        base = (stored[f"{m}.weight"], stored[f"{m}.scales"], stored[f"{m}.biases"])
        agg.add(base, stock_round_trip(base, gs, bits), gs, bits)
    agg.check(row)
    assert row["weights_changed"] > 0
    assert row["tensors"] == len(modules)
    assert row["other_settings"] == {"8-bit g64": sum(1 for m in modules if m.endswith("mlp.gate"))}
    assert res.row(64, 3, "preserve")["weights_changed"] == 0
    # "requantized": the stored weights dequantized, quantized at 4-bit g64 (gates: 8-bit, the
    # model's quant predicate), then the stock round trip
    agg = Agg()
    for m in modules:
        gs, bits = (q[m]["group_size"], q[m]["bits"]) if m in q else (q["group_size"], q["bits"])
        w = mx.dequantize(stored[f"{m}.weight"], stored[f"{m}.scales"], stored[f"{m}.biases"],
                          group_size=gs, bits=bits)
        nbits = 8 if m.endswith("mlp.gate") else 4
        base = tuple(mx.quantize(w, group_size=64, bits=nbits))
        agg.add(base, stock_round_trip(base, 64, nbits), 64, nbits)
    agg.check(res.row(64, 4, "stock"))

    # the adapter on the experts, stock: oracle through MLX ops on every expert
    base = (stored[f"{down}.weight"], stored[f"{down}.scales"], stored[f"{down}.biases"])
    delta = lora_delta(a, b, 20.0)
    deq = mx.dequantize(*base, group_size=64, bits=3)
    fused = tuple(mx.quantize(deq + mx.array(delta.astype(np.float32)), group_size=64, bits=3))
    r, n = retention_noise([np_deq(base, 64, 3)], [np_deq(fused, 64, 3)], [delta])
    assert row["retention"] == pytest.approx(r, rel=1e-4)
    assert row["noise"] == pytest.approx(n, rel=1e-4)
    assert row["adapter_modules"] == 1
    # requantized rows carry their own adapter figures
    assert res.row(64, 4, "stock")["retention"] is not None
    assert res.row(64, 4, "stock")["adapter_modules"] == 1


def test_zero_adapter_retention_is_undefined(fp_llama, tmp_path):
    w = model_tensors(fp_llama)
    m = "model.layers.0.self_attn.q_proj"
    out_dims, in_dims = w[f"{m}.weight"].shape
    adapter = write_adapter(tmp_path / "zero", {m: (np.random.default_rng(0).normal(size=(in_dims, 2)),
                                                    np.zeros((2, out_dims)))}, scale=20.0)
    res = measure_noise_floor(fp_llama, group_sizes=[64], bits=[4], policies=["stock", "preserve"],
                              adapter_path=adapter, outputs=False, out=tmp_path / "out")
    for r in res.rows:
        assert r["retention"] is None and r["noise"] is None
        assert r["adapter_delta_norm"] == 0.0
    data = read_json(tmp_path / "out" / "noise_floor.json")
    assert all(r["retention"] is None and r["noise"] is None for r in data["rows"])
    assert data["meta"]["adapter"]["zero"] is True
    md = (tmp_path / "out" / "noise_floor.md").read_text()
    assert "undefined" in md
    assert any("zero" in w for w in res.warnings)


# -- output level ---------------------------------------------------------------------------------------


def _independent_logprobs(model_dir: Path, group_size: int, bits: int, seqs, fuse: bool):
    """Log-probs from a graph quantized here with nn.quantize (llama: every
    Linear/Embedding whose input dim divides), optionally with every tensor
    round-tripped once (the stock zero-delta fuse), run prompt by prompt."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0)
    if fuse:
        items = []
        for name, m in model.named_modules():
            if hasattr(m, "scales"):
                w, s, b = stock_round_trip((m.weight, m.scales, m.biases), group_size, bits)
                items += [(f"{name}.weight", w), (f"{name}.scales", s), (f"{name}.biases", b)]
        model.update(tree_unflatten(items))
    out = []
    for ids in seqs:
        logits = np.asarray(model(mx.array([ids])).astype(mx.float32))[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        out.append(logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True)))
    return out


def test_output_level_matches_independent_forward(output_run, fp_llama):
    from mlx_lm.utils import load_tokenizer

    res, _ = output_run
    tok = load_tokenizer(fp_llama)
    seqs = [tok.encode(PROMPTS[0]["text"]), tok.encode(PROMPTS[1]["text"]),
            tok.encode(tok.apply_chat_template(PROMPTS[2]["messages"], tokenize=False,
                                               add_generation_prompt=False, enable_thinking=False),
                       add_special_tokens=False)]
    assert res.meta["prompt_tokens"] == sum(map(len, seqs))
    for bits in (3, 4):
        base = _independent_logprobs(fp_llama, 64, bits, seqs, fuse=False)
        fused = _independent_logprobs(fp_llama, 64, bits, seqs, fuse=True)
        kl = np.concatenate([(np.exp(b) * (b - f)).sum(-1) for b, f in zip(base, fused)])
        flips = np.concatenate([b.argmax(-1) != f.argmax(-1) for b, f in zip(base, fused)])
        row = res.row(64, bits, "stock")
        assert kl.mean() > 0
        assert row["kl_mean"] == pytest.approx(kl.mean(), rel=2e-3)
        assert row["kl_p99"] == pytest.approx(np.percentile(np.maximum(kl, 0), 99), rel=2e-3)
        assert abs(row["top1_flip"] - flips.mean()) <= 1.0 / len(flips) + 1e-12
        assert row["top1_agreement"] == pytest.approx(1.0 - row["top1_flip"], abs=1e-12)
        assert row["outputs_identical"] is False
        p = res.row(64, bits, "preserve")
        assert (p["kl_mean"], p["kl_p99"], p["top1_flip"], p["mc_flip"], p["top1_agreement"]) == (0, 0, 0, 0, 1)
        assert 0 <= row["mc_flip"] <= 1


def test_adapter_retention_on_dense_model(output_run, fp_llama, llama_adapter):
    """retention/noise of the adapter for stock (MLX ops) and preserve (numpy:
    keep each group's scale and bias, round the codes) at 3 and 4 bits."""
    res, _ = output_run
    _, mods, scale = llama_adapter
    weights = model_tensors(fp_llama)
    for bits in (3, 4):
        deq0, deq_stock, deq_pres, deltas = [], [], [], []
        refits = 0
        for m, (a, b) in mods.items():
            base = tuple(mx.quantize(weights[f"{m}.weight"], group_size=64, bits=bits))
            delta = lora_delta(a.T, b.T, scale)  # mlx-lm: lora_a [in, r], lora_b [r, out]
            stock = tuple(mx.quantize(mx.dequantize(*base, group_size=64, bits=bits)
                                      + mx.array(delta.astype(np.float32)), group_size=64, bits=bits))
            s = np.repeat(np.asarray(base[1], np.float64), 64, axis=-1)
            bb = np.repeat(np.asarray(base[2], np.float64), 64, axis=-1)
            codes = np.round(np_codes(base[0], bits) + delta.astype(np.float32) / s)
            pres = s * codes + bb
            # groups pushed out of [0, 2^bits - 1] are re-fitted with MLX's affine rule
            refit = ((codes < 0) | (codes > 2**bits - 1)).reshape(*codes.shape[:-1], -1, 64).any(-1)
            x = mx.array((np_deq(base, 64, bits) + delta).astype(np.float32))
            fit = np_deq(tuple(mx.quantize(x, group_size=64, bits=bits)), 64, bits)
            mask = np.repeat(refit, 64, axis=-1)
            pres[mask] = fit[mask]
            refits += int(refit.sum())
            deq0.append(np_deq(base, 64, bits))
            deq_stock.append(np_deq(stock, 64, bits))
            deq_pres.append(pres)
            deltas.append(delta)
        r, n = retention_noise(deq0, deq_stock, deltas)
        row = stock = res.row(64, bits, "stock")
        assert row["retention"] == pytest.approx(r, rel=1e-4, abs=1e-6)
        assert row["noise"] == pytest.approx(n, rel=1e-4)
        r, n = retention_noise(deq0, deq_pres, deltas)
        row = res.row(64, bits, "preserve")
        assert row["retention"] == pytest.approx(r, rel=1e-3, abs=1e-5)
        assert row["noise"] == pytest.approx(n, rel=1e-3, abs=1e-5)
        assert row["adapter_modules"] == 2
        assert refits < 0.05 * sum(d.size for d in deltas) / 64
        # a delta well below a step: stock keeps little of it, stochastic rounding
        # keeps it in expectation (retention 1 +- ~0.03 here)
        stoch = res.row(64, bits, "stochastic")
        assert stock["retention"] < 0.7 and 0.85 < stoch["retention"] < 1.15


def test_output_files(output_run):
    res, out = output_run
    data = read_json(out / "noise_floor.json")
    assert len(data["rows"]) == 6
    for r in data["rows"]:
        assert set(ROW_FIELDS) <= set(r)
        assert r["mc_flip"] is not None and r["retention"] is not None
    assert data == json.loads(json.dumps(res.to_dict()))
    md = (out / "noise_floor.md").read_text()
    assert "| source | group size | bits | policy | weights changed |" in md
    assert md.count("\n| quantized | 64 |") == 6
    lines = (out / "noise_floor_tensors.jsonl").read_text().splitlines()
    assert len(lines) == len(res.tensors) > 0
    for name in ("noise_floor_weights.png", "noise_floor_kl.png", "noise_floor_retention.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(out.glob(".*"))  # no temporary files left


# -- one reader of the model's quantization, one multiple-choice scorer -----------------------------------


def own_quant(config: dict, module: str) -> tuple[int, int]:
    """(group size, bits) of a module per config.json: its own entry, else the default."""
    q = config["quantization"]
    entry = q.get(module, q)
    return entry["group_size"], entry["bits"]


def stock_fused_dir(model_dir: Path, out: Path) -> Path:
    """A copy of a quantized model with every quantized tensor through the
    stock zero-delta fuse (MLX's own round trip) at the module's own setting
    per config.json."""
    import shutil

    shutil.copytree(model_dir, out)
    config = read_json(model_dir / "config.json")
    stored = model_tensors(model_dir)
    for m in [k[: -len(".scales")] for k in stored if k.endswith(".scales")]:
        base = (stored[f"{m}.weight"], stored[f"{m}.scales"], stored[f"{m}.biases"])
        fused = stock_round_trip(base, *own_quant(config, m))
        stored.update({f"{m}.weight": fused[0], f"{m}.scales": fused[1], f"{m}.biases": fused[2]})
    (out / "model.safetensors").unlink()
    mx.save_safetensors(str(out / "model.safetensors"), stored, metadata={"format": "mlx"})
    return out


def test_mixed_precision_model_is_measured_module_by_module(tiny_moe_mixed_dir):
    """Every down_proj at 6-bit g64 inside a 3-bit g64 model: the "model" row
    measures each module at the bits and group size mlx-lm loads it with
    (and config.json states), against MLX's round trip at that setting."""
    from mlx_lm import load

    config = read_json(tiny_moe_mixed_dir / "config.json")
    res = measure_noise_floor(tiny_moe_mixed_dir, group_sizes=[64], bits=[3], policies=["stock"], outputs=False)
    assert [(r["source"], r["group_size"], r["bits"]) for r in res.rows] == [("model", 64, 3)]
    loaded, _ = load(str(tiny_moe_mixed_dir))
    mlx_lm_quant = {name: (m.group_size, m.bits) for name, m in loaded.named_modules() if hasattr(m, "scales")}
    measured = {t["module"]: (t["group_size"], t["bits"]) for t in res.tensors}
    assert measured == mlx_lm_quant
    assert {m: own_quant(config, m) for m in measured} == measured
    downs = [m for m in measured if m.endswith("down_proj")]
    assert len(downs) == 4 and all(measured[m] == (64, 6) for m in downs)
    row = res.row(64, 3, "stock")
    assert row["other_settings"] == {"6-bit g64": 4, "8-bit g64": 4}  # down_proj, router gates
    stored = model_tensors(tiny_moe_mixed_dir)
    agg = Agg()
    for m in measured:
        base = (stored[f"{m}.weight"], stored[f"{m}.scales"], stored[f"{m}.biases"])
        agg.add(base, stock_round_trip(base, *own_quant(config, m)), *own_quant(config, m))
    agg.check(row)
    for t in res.tensors:  # per tensor too: the 6-bit experts at 6 bits
        if t["module"] in downs:
            base = tuple(stored[f"{t['module']}.{leaf}"] for leaf in ("weight", "scales", "biases"))
            one = Agg()
            one.add(base, stock_round_trip(base, 64, 6), 64, 6)
            one.check(t)


def test_model_read_unlike_mlx_lm_is_refused(tiny_moe_mixed_dir, monkeypatch):
    """Should config.json and the stored shapes (ModelDir, the fuse's reader)
    ever say other bits than mlx-lm loads, the noise floor refuses the model
    rather than measure it at a setting the fuse would not use."""
    from pyfuse.io.model_dir import ModelDir, QParams

    read = ModelDir.quant_params

    def misread(self, path, in_dims=None):
        q = read(self, path, in_dims)
        return QParams(3, q.group_size, q.mode) if path.endswith("down_proj") else q

    monkeypatch.setattr(ModelDir, "quant_params", misread)
    with pytest.raises(UserError, match=r"down_proj is 3-bit g64 \(affine\) by config.json and its stored "
                                        r"shapes, but mlx-lm loads it as 6-bit g64"):
        measure_noise_floor(tiny_moe_mixed_dir, group_sizes=[64], bits=[3], outputs=False)


@pytest.fixture(scope="module")
def bf16_moe(tiny_models_root, tiny_tokenizer_dir):
    """4-bit g64 qwen3_moe in bfloat16 (scales too): the compute-dtype policy matters."""
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(tiny_models_root / "nf_moe_bf16", tokenizer_dir=tiny_tokenizer_dir,
                            arch="qwen3_moe", quantize={"group_size": 64, "bits": 4}, dtype="bfloat16")


@pytest.mark.parametrize("model", ["tiny_moe_mixed_dir", "bf16_moe"])
def test_mc_answers_are_those_of_eval_mc(model, request, tmp_path):
    """The noise floor's per-item MC answers and log-probabilities are what
    `pyfuse eval mc --method logprob` gives on the same model directory and
    items: for the baseline (the model as stored) and, on the float32 model,
    for the stock-fused model (written out with MLX's round trip); mc_flip is
    the share of items whose eval-mc answer differs between the two."""
    from pyfuse.evals.mc import evaluate_mc

    model_dir = request.getfixturevalue(model)
    mc = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    bits = read_json(model_dir / "config.json")["quantization"]["bits"]
    res = measure_noise_floor(model_dir, group_sizes=[64], bits=[bits], policies=["stock"], mc=mc,
                              prompts=[PROMPTS[0]], out=tmp_path / "out")
    written = read_jsonl(tmp_path / "out" / "noise_floor_mc.jsonl")
    assert written == res.mc_items

    def answers(policy):
        return [(r["id"], r["prediction"], r["logprobs"]) for r in res.mc_items if r["policy"] == policy]

    def eval_answers(path):
        rows = evaluate_mc(path, mc, method="logprob").rows
        return [(r["id"], r["prediction"], r["logprobs"]) for r in rows]

    base = eval_answers(model_dir)
    assert answers(None) == base
    assert len(base) == len(MC_ROWS)
    if model == "tiny_moe_mixed_dir":
        fused = eval_answers(stock_fused_dir(model_dir, tmp_path / "fused"))
        assert answers("stock") == fused
        assert [a[2] for a in fused] != [a[2] for a in base]  # the fuse moved the scores
        flips = np.mean([f[1] != b[1] for f, b in zip(fused, base)])
        assert res.row(64, bits, "stock")["mc_flip"] == flips


# -- errors and CLI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=[7]), "bits: 7 is not supported"),
    (dict(group_sizes=[16]), "group sizes: 16 is not supported"),
    (dict(policies=["round"]), "'round' is not a policy"),
    (dict(rounds=0), "rounds must be a positive integer"),
    (dict(group_sizes=[]), "give at least one"),
])
def test_bad_settings(fp_llama, kwargs, message):
    with pytest.raises(UserError, match=message):
        measure_noise_floor(fp_llama, outputs=False, **kwargs)


def test_bad_files(fp_llama, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        measure_noise_floor(tmp_path / "nope", outputs=False)
    with pytest.raises(UserError, match="no config.json"):
        measure_noise_floor(tmp_path, outputs=False)
    with pytest.raises(UserError, match="no such file"):
        measure_noise_floor(fp_llama, group_sizes=[64], bits=[4], prompts=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        measure_noise_floor(fp_llama, group_sizes=[64], bits=[4], prompts=bad)
    bad.write_text('{"prompt": "wrong key"}\n')
    with pytest.raises(UserError, match="line 1: expected 'text' or 'messages'"):
        measure_noise_floor(fp_llama, group_sizes=[64], bits=[4], prompts=bad)
    with pytest.raises(UserError, match="no adapter_config.json|does not exist"):
        measure_noise_floor(fp_llama, group_sizes=[64], bits=[4], adapter_path=tmp_path, outputs=False)


def test_no_quantizable_tensor(tiny_models_root, tiny_tokenizer_dir):
    """Hidden size 64: nothing has an input dimension divisible by 128."""
    from pyfuse.demo.tiny_model import build_tiny_model

    d = build_tiny_model(tiny_models_root / "nf_llama64_fp", tokenizer_dir=tiny_tokenizer_dir, arch="llama",
                         quantize=None, hidden_size=64, intermediate_size=64, num_layers=1)
    with pytest.raises(UserError, match="no quantizable tensor"):
        measure_noise_floor(d, group_sizes=[128], bits=[4], outputs=False)


def test_cli(fp_llama, tmp_path):
    out = tmp_path / "nf"
    r = run_cli("noise-floor", "--model", fp_llama, "--group-sizes", "64", "--bits", "2,4",
                "--policies", "stock,preserve", "--no-outputs", "--out", out, "--quiet")
    assert r.code == 0
    data = read_json(out / "noise_floor.json")
    assert [(r["bits"], r["policy"]) for r in data["rows"]] == [(2, "stock"), (2, "preserve"),
                                                               (4, "stock"), (4, "preserve")]
    assert (out / "noise_floor_weights.png").exists()
    assert "4 rows" in r.out
    r = run_cli("noise-floor", "--model", fp_llama, "--bits", "4,x", "--out", out, "--force")
    assert r.code == 2
    assert "--bits: 'x' is not an integer" in r.err
    r = run_cli("noise-floor", "--model", fp_llama, "--bits", "7", "--out", out, "--force")
    assert r.code == 2
    assert "bits: 7 is not supported" in r.err
    before = read_json(out / "noise_floor.json")
    r = run_cli("noise-floor", "--model", fp_llama, "--group-sizes", "64", "--bits", "4", "--policies", "stock",
                "--no-outputs", "--out", out, "--quiet")
    assert r.code == 2 and r.err.strip() == f"pyfuse noise-floor: error: --out {out} already exists; " \
                                            "pass --force to replace it"
    assert read_json(out / "noise_floor.json") == before
    r = run_cli("noise-floor", "--model", fp_llama, "--group-sizes", "64", "--bits", "4", "--policies", "stock",
                "--no-outputs", "--out", out, "--quiet", "--force")
    assert r.code == 0 and [(r["bits"], r["policy"]) for r in read_json(out / "noise_floor.json")["rows"]] == \
        [(4, "stock")]
