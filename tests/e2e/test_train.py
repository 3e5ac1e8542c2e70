"""`pyfuse train`: a few iterations on a tiny MoE really change its answers,
explicit layers train only those layers, the adapter directory is read by
mlx-lm (load_adapters / mlx_lm fuse: exactly the trained modules) and fused
by `pyfuse fuse`; DoRA, the standard all-layers form, seeds, atomic output
and bad input."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.cli import main
from pyfuse.errors import UserError
from pyfuse.evals.mc import evaluate_mc
from pyfuse.data.mmlu import format_question, load_mc
from pyfuse.train import load_training_data, parse_layers, train_adapter

from helpers import mlx_fuse, model_tensors, read_json, write_jsonl

LAYERS = [1, 3]
KEYS = ["mlp.switch_mlp.down_proj", "self_attn.v_proj"]
TRAINED = sorted(f"model.layers.{i}.{k}" for i in LAYERS for k in KEYS)

QUESTIONS = [
    ("astronomy", "Which planet is known as the red planet?", ["Venus", "Mars", "Jupiter", "Saturn"]),
    ("chemistry", "What is the chemical symbol for gold?", ["Ag", "Au", "Gd", "Fe"]),
    ("history", "In which year did the Second World War end?", ["1939", "1945", "1918", "1950"]),
    ("biology", "Which organ pumps blood through the body?", ["the liver", "the heart", "the lungs", "the skin"]),
    ("astronomy", "What is the closest star to the Earth?", ["Sirius", "the Sun", "Vega", "Polaris"]),
    ("chemistry", "Which gas do plants absorb from the air?", ["oxygen", "carbon dioxide", "helium", "argon"]),
    ("math", "What is the derivative of $x^2$?", ["$x$", "$2x$", "$x^3$", "$2$"]),
    ("biology", "What is the basic unit of life?", ["the atom", "the cell", "the organ", "the gene"]),
]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny qwen3_moe (3-bit), with weights of std 0.2 (about unit gain at
    hidden size 64): with conftest's std 0.02 the logits of a random model
    span ~1 nat, so a few LoRA steps cannot move an answer."""
    from pyfuse.demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("moe_std02"), tokenizer_dir=tiny_tokenizer_dir,
                            arch="qwen3_moe", quantize={"group_size": 64, "bits": 3}, weight_std=0.2)


@pytest.fixture(scope="module")
def case(tmp_path_factory, moe_dir):
    """Eight items whose answer is always B, as chat training data; an
    adapter trained on them (16 iterations, ~10 s)."""
    root = tmp_path_factory.mktemp("train")
    rows = [{"question_id": i, "question": q, "options": o, "answer": "B", "answer_index": 1,
             "category": c} for i, (c, q, o) in enumerate(QUESTIONS)]
    items_file = write_jsonl(root / "items.jsonl", rows)
    data = root / "data"
    write_jsonl(data / "train.jsonl", [{"messages": [{"role": "user", "content": format_question(it)},
                                                     {"role": "assistant", "content": "\\boxed{B}"}]}
                                       for it in load_mc(items_file)])
    adapter = root / "adapter"
    result = train_adapter(moe_dir, data, adapter, layers=LAYERS, keys=KEYS, iters=16,
                           learning_rate=1e-2, batch_size=4, rank=8, alpha=16, mask_prompt=True,
                           steps_per_report=4, seed=0)
    return {"root": root, "items": items_file, "data": data, "adapter": adapter, "result": result}


def test_training_changes_the_answers_on_its_items(case, moe_dir):
    res = case["result"]
    assert res.first_loss > res.final_loss  # the optimiser ran
    before = evaluate_mc(moe_dir, case["items"], method="logprob")
    # mlx-lm's own loader applies the adapter (mlx_lm.load(..., adapter_path=...))
    after = evaluate_mc(moe_dir, case["items"], method="logprob", adapter_path=case["adapter"])
    assert before.accuracy <= 0.5
    assert after.accuracy == 1.0
    changed = sum(a["prediction"] != b["prediction"] for a, b in zip(after.rows, before.rows))
    assert changed >= 4


def test_explicit_layers_train_only_those_modules(case):
    adapter = case["adapter"]
    weights = mx.load(str(adapter / "adapters.safetensors"))
    assert sorted(weights) == sorted(f"{m}.{leaf}" for m in TRAINED for leaf in ("lora_a", "lora_b"))
    for m in TRAINED:  # lora_b starts at zero: non-zero means trained
        assert mx.abs(weights[f"{m}.lora_b"]).max().item() > 0
    assert weights["model.layers.1.mlp.switch_mlp.down_proj.lora_a"].shape == (8, 8, 64)  # [E, r, in]
    cfg = read_json(adapter / "adapter_config.json")
    assert cfg["fine_tune_type"] == "lora"
    assert cfg["layers"] == LAYERS
    assert cfg["num_layers"] == 4 - min(LAYERS)
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": TRAINED}
    assert cfg["iters"] == 16 and cfg["seed"] == 0 and cfg["mask_prompt"] is True
    loss = read_json(adapter / "loss.json")
    assert [r["iteration"] for r in loss["train"]] == [4, 8, 12, 16]
    assert [r["train_loss"] for r in loss["train"]] == [r["train_loss"] for r in case["result"].losses]
    assert (adapter / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in case["root"].iterdir()) == ["adapter", "data", "items.jsonl"]  # no temp dirs


def test_mlx_lm_applies_exactly_the_trained_modules(case, moe_dir, tmp_path):
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear, LoRASwitchLinear

    model, _ = load(str(moe_dir), adapter_path=str(case["adapter"]))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRASwitchLinear)))
    assert wrapped == TRAINED

    # mlx_lm fuse re-quantizes the trained modules and nothing else
    out = mlx_fuse(moe_dir, case["adapter"], tmp_path / "mlx_fused")
    base, fused = model_tensors(moe_dir), model_tensors(out)
    assert fused.keys() == base.keys()
    changed = sorted({k.rsplit(".", 1)[0] for k in base if not mx.array_equal(base[k], fused[k])})
    assert changed == TRAINED


def test_pyfuse_fuse_reads_the_adapter(case, moe_dir, tmp_path, capsys):
    out = tmp_path / "fused"
    report = tmp_path / "report.json"
    assert main(["fuse", "--model", str(moe_dir), "--adapter-path", str(case["adapter"]),
                 "--save-path", str(out), "--report", str(report), "--quiet"]) == 0
    assert "4 module(s) fused" in capsys.readouterr().out
    # The full-path keys of explicit layers are understood as mlx-lm does:
    # every fused module was configured, and nothing configured lacked weights.
    summary = read_json(report)["summary"]
    assert summary["outside_config"] == [] and summary["configured_without_weights"] == []
    fused = evaluate_mc(out, case["items"], method="logprob")
    assert fused.accuracy == 1.0  # the trained behaviour survived the stock fuse
    base, ours = model_tensors(moe_dir), model_tensors(out)
    changed = sorted({k.rsplit(".", 1)[0] for k in base if not mx.array_equal(base[k], ours[k])})
    assert changed == TRAINED


def test_all_layers_standard_form_dora_and_seed(tiny_llama_dir, case, tmp_path):
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    # layers=None: mlx-lm's own form (num_layers = all, keys relative)
    a = train_adapter(tiny_llama_dir, case["data"], tmp_path / "a", keys=["self_attn.q_proj"], iters=2,
                      batch_size=2, learning_rate=1e-3, steps_per_report=1, seed=3)
    cfg = read_json(tmp_path / "a" / "adapter_config.json")
    assert cfg["num_layers"] == 4 and cfg["layers"] is None
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj"]
    assert a.modules == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    first = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    # the same seed again (replacing the directory): the same adapter, bit for bit
    again = train_adapter(tiny_llama_dir, case["data"], tmp_path / "a", keys=["self_attn.q_proj"], iters=2,
                          batch_size=2, learning_rate=1e-3, steps_per_report=1, seed=3, force=True)
    second = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    assert first.keys() == second.keys()
    assert all(mx.array_equal(first[k], second[k]) for k in first)
    assert [r["train_loss"] for r in a.losses] == [r["train_loss"] for r in again.losses]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # the old directory is gone

    # DoRA on a 4-bit dense model, one layer: magnitudes saved, mlx-lm loads it
    d = train_adapter(tiny_llama_dir, case["data"], tmp_path / "d", fine_tune_type="dora", layers="-2",
                      keys=["self_attn.q_proj", "mlp.down_proj"], iters=2, batch_size=2, rank=4, alpha=4)
    dw = mx.load(str(tmp_path / "d" / "adapters.safetensors"))
    assert sorted(dw) == sorted(f"model.layers.2.{k}.{leaf}" for k in ("mlp.down_proj", "self_attn.q_proj")
                                for leaf in ("lora_a", "lora_b", "m"))
    assert d.config["lora_parameters"]["scale"] == 1.0
    model, _ = load_model(tiny_llama_dir)
    load_adapters(model, str(tmp_path / "d"))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, DoRALinear)) == \
        ["model.layers.2.mlp.down_proj", "model.layers.2.self_attn.q_proj"]


def test_parse_layers():
    assert parse_layers(None, 24) is None and parse_layers("all", 24) is None
    assert parse_layers("8,14,20", 24) == [8, 14, 20]
    assert parse_layers("20,8, 8,4-6", 24) == [4, 5, 6, 8, 20]
    assert parse_layers([-1, 0], 24) == [0, 23]
    for bad, fragment in [("24", "layer 24 is out of range: the model has 24 layers (0-23)"),
                          ("a", "'a' is not an index"), ("5-3", "range 5-3 is empty"), ("1,,2", "empty item"),
                          ([], "layers is empty"), ([1.5], "1.5 is not an integer")]:
        with pytest.raises(UserError, match=None) as info:
            parse_layers(bad, 24)
        assert fragment in str(info.value)


def test_training_data_validation(tmp_path):
    def write(name, rows):
        return write_jsonl(tmp_path / name, rows)

    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    cases = [
        (write("a.jsonl", [chat, "{nope"]), "a.jsonl: line 2: not valid JSON"),
        (write("b.jsonl", [chat, {"text": "x"}]), "b.jsonl: line 2: a text row in chat data"),
        (write("c.jsonl", [chat, {"messages": [{"role": "user", "content": "hi"}]}]),
         "c.jsonl: line 2: field 'messages' has no assistant turn"),
        (write("d.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}]), "unknown role 'robot'"),
        (write("e.jsonl", [{"prompt": "p", "completion": 3}]), "field 'completion' must be a string"),
        (write("f.jsonl", [{"question": "q"}]), "not an mlx-lm training row"),
        (write("g.jsonl", []), "g.jsonl: no training rows"),
        (tmp_path / "nothere", "does not exist"),
        (tmp_path, "no train.jsonl"),
    ]
    for path, fragment in cases:
        with pytest.raises(UserError) as info:
            load_training_data(path)
        assert fragment in str(info.value), (fragment, str(info.value))
    td = load_training_data(write("ok.jsonl", [{"prompt": "p", "completion": "c"}] * 3))
    assert td.format == "completions" and len(td.train) == 3 and td.valid == []


def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tiny_moe_dir, tiny_llama_dir, tmp_path, capsys):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}, {"text": "there"}])
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    m, d = str(tiny_moe_dir), str(case["data"])
    out = tmp_path / "out"
    for args, fragment in [
        (["--model", m, "--data", d, "--keys", "mlp.nothing"],
         "key 'mlp.nothing' matches no Linear/SwitchLinear/Embedding module in the model's layers; available:"),
        (["--model", m, "--data", d, "--layers", "7"], "layer 7 is out of range: the model has 4 layers"),
        (["--model", m, "--data", str(text), "--mask-prompt"], "mask_prompt needs chat or completions rows"),
        (["--model", m, "--data", d, "--batch-size", "9"], "8 training rows, fewer than batch_size=9"),
        (["--model", m, "--data", d, "--rank", "0"], "rank must be an integer >= 1"),
        (["--model", str(broken), "--data", d], "broken_model: cannot load the model"),
        (["--model", str(tmp_path / "none"), "--data", d], "does not exist"),
        (["--model", m, "--data", d, "--adapter-path", str(case["adapter"])], "already exists; pass --force to replace it"),
    ]:
        target = args if "--adapter-path" in args else [*args, "--adapter-path", str(out)]
        every_layer = [] if "--layers" in args else ["--num-layers", "-1"]  # mlx-lm's default is 16
        assert main(["train", *target, *every_layer, "--iters", "1", "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("pyfuse train: error: ") and fragment in err[0], \
            (fragment, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_model", "text.jsonl"]


def test_interrupted_training_leaves_no_adapter_only_its_run(case, tiny_llama_dir, tmp_path):
    def boom(it):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_adapter(tiny_llama_dir, case["data"], tmp_path / "x", iters=2, batch_size=2, on_step=boom)
    assert [p.name for p in tmp_path.iterdir()] == [".x.run"]  # for resume=True; no adapter directory


def test_cli_trains_and_reports(case, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "cli_adapter"
    code = main(["train", "--model", str(tiny_llama_dir), "--data", str(case["data"]), "--adapter-path",
                 str(out), "--layers", "0,2", "--keys", "self_attn.v_proj", "--iters", "2", "--batch-size", "2",
                 "--rank", "4", "--alpha", "8", "--steps-per-report", "1", "--quiet"])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"pyfuse train: wrote {out} (lora, rank 4, scale 2, 2 modules in layers 0,2")
    cfg = read_json(out / "adapter_config.json")
    assert cfg["lora_parameters"]["keys"] == ["model.layers.0.self_attn.v_proj", "model.layers.2.self_attn.v_proj"]
    assert np.isfinite([r["train_loss"] for r in read_json(out / "loss.json")["train"]]).all()
