"""pyfuse's training loop against mlx-lm's trainer (same weights, same
losses), a run killed mid-way and resumed (the same bytes as an
uninterrupted run), best-validation selection and early stopping, an mlx-lm
YAML config through `pyfuse train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.train import train_adapter

from helpers import read_json, run_cli, write_jsonl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_data")
    rows = [{"messages": [{"role": "user", "content": f"say {w} {i}"},
                          {"role": "assistant", "content": f"{w} {w[::-1]} {i % 3}"}]}
            for i, w in enumerate(WORDS)]
    write_jsonl(root / "train.jsonl", rows[:10])
    write_jsonl(root / "valid.jsonl", rows[8:])
    return root


def _weights(path: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_the_loop_is_mlx_lms_trainer(tiny_llama_dir, chat_data, tmp_path):
    """Without validation, the same seed: mlx-lm's ``train`` and pyfuse's
    loop draw the same batches and take the same steps (bit for bit)."""
    import types

    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.utils import load

    from pyfuse.train.data import load_training_data
    from pyfuse.train.trainer import add_adapter_layers, datasets, make_optimizer, seed_everything

    def mlx_lm_run():
        model, tok = load(str(tiny_llama_dir))
        lp = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
        add_adapter_layers(model, 4, lp, "lora", {f"model.layers.{i}.{k}" for i in range(4) for k in lp["keys"]}, 0)
        td = load_training_data(chat_data / "train.jsonl")
        train_set, _, _ = datasets(td, tok, True, 2048, [])
        losses = []
        cb = types.SimpleNamespace(on_train_loss_report=lambda info: losses.append(info["train_loss"]),
                                   on_val_loss_report=lambda info: None)
        seed_everything(0)
        train(model=model, optimizer=make_optimizer("adam", 1e-3), train_dataset=train_set,
              args=TrainingArgs(batch_size=2, iters=6, steps_per_report=2, grad_accumulation_steps=2,
                                steps_per_save=100, adapter_file=str(tmp_path / "mlx.safetensors")),
              training_callback=cb)
        return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}, losses

    ref, ref_losses = mlx_lm_run()
    res = train_adapter(tiny_llama_dir, chat_data / "train.jsonl", tmp_path / "ours", keys=["self_attn.q_proj",
                        "mlp.down_proj"], rank=4, alpha=8, iters=6, batch_size=2, grad_accumulation_steps=2,
                        learning_rate=1e-3, steps_per_report=2, mask_prompt=True, seed=0)
    ours = _weights(tmp_path / "ours" / "adapters.safetensors")
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    assert [r["train_loss"] for r in res.losses] == pytest.approx(ref_losses, rel=1e-6)


TRAIN_ARGS = ["--num-layers", "-1", "--rank", "4", "--alpha", "8", "--dropout", "0.1", "--iters", "12",
              "--batch-size", "2", "--grad-accumulation-steps", "2", "--learning-rate", "1e-3",
              "--steps-per-report", "2", "--steps-per-eval", "4", "--save-every", "3", "--mask-prompt",
              "--seed", "5", "--quiet",
              "--lr-schedule", '{"name": "cosine_decay", "arguments": [1e-3, 6, 1e-5], "warmup": 2}']


def _cli(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--adapter-path", str(out), *TRAIN_ARGS, *extra]


def test_resume_after_kill_gives_the_same_bytes(tiny_llama_dir, chat_data, tmp_path):
    """Dropout (MLX's random state), a checkpoint inside a gradient
    accumulation (step 3 of pairs), a schedule, validation: killed after its
    checkpoint at step 3 and resumed, the run writes the same adapter as an
    uninterrupted one."""
    whole = run_cli(*_cli(tiny_llama_dir, chat_data, tmp_path / "whole"))
    assert whole.code == 0, whole.err
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "pyfuse", *_cli(tiny_llama_dir, chat_data, killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = tmp_path / ".killed.run" / "checkpoints" / "0000003" / "state.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), proc.stderr.read().decode()
    assert not killed.exists()  # killed before the end: only the run directory
    res = run_cli(*_cli(tiny_llama_dir, chat_data, killed, "--resume"))
    assert res.code == 0, res.err
    assert "resumed from iteration" in res.out
    for name in ("adapters.safetensors", "best_adapters.safetensors", "0000012_adapters.safetensors"):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    a, b = read_json(killed / "loss.json"), read_json(tmp_path / "whole" / "loss.json")
    timing = ("iterations_per_second", "tokens_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in a["train"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b["train"]]
    assert a["val"] == b["val"]
    # a finished run has nothing to resume
    again = run_cli(*_cli(tiny_llama_dir, chat_data, killed, "--resume"))
    assert again.code == 2 and "is a finished run, nothing to resume" in again.err


def test_best_validation_and_early_stop(tiny_llama_dir, chat_data, tmp_path):
    """A learning rate that makes the validation loss climb: the run stops
    after 2 validations without improvement and writes the best one's
    adapter (the weights saved at that step)."""
    from mlx_lm.tuner.trainer import evaluate as mlx_evaluate

    res = train_adapter(tiny_llama_dir, chat_data, tmp_path / "a", keys=["self_attn.q_proj", "mlp.down_proj"],
                        rank=4, alpha=64, iters=40, batch_size=2, learning_rate=0.3, steps_per_report=1,
                        steps_per_eval=2, save_every=2, val_batches=-1, early_stop_patience=2,
                        select_best=True, seed=0)
    vals = [r["val_loss"] for r in res.val_losses]
    best = int(np.argmin(vals))
    assert res.best_iteration == res.val_losses[best]["iteration"]
    assert res.stopped_early and res.val_losses[-1]["iteration"] == res.val_losses[best]["iteration"] + 4
    assert min(vals[best + 1:]) >= vals[best]
    out = tmp_path / "a"
    written = _weights(out / "adapters.safetensors")
    at_best = _weights(out / f"{res.best_iteration:07d}_adapters.safetensors")
    assert all(np.array_equal(written[k], at_best[k]) for k in written)
    cfg = read_json(out / "adapter_config.json")
    assert cfg["best_iteration"] == res.best_iteration and cfg["stopped_early"] is True
    # the validation loss is mlx-lm's evaluate over every batch (a different summation order)
    from mlx_lm.utils import load

    model, tok = load(str(tiny_llama_dir), adapter_path=str(out))
    from pyfuse.train.data import load_training_data
    from pyfuse.train.trainer import datasets

    _, valid_set, _ = datasets(load_training_data(chat_data), tok, False, 2048, [])
    ref = mlx_evaluate(model, valid_set, batch_size=2, num_batches=-1)
    assert vals[best] == pytest.approx(ref, rel=1e-5)


def test_mlx_lm_yaml_runs_unchanged(tiny_llama_dir, chat_data, tmp_path):
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\ntrain: true\ndata: {chat_data}\nfine_tune_type: dora\n"
                   "num_layers: 2\nbatch_size: 2\niters: 4\nlearning_rate: 1e-4\nsteps_per_report: 2\n"
                   f"adapter_path: {tmp_path / 'ad'}\nsave_every: 2\nmask_prompt: true\n"
                   "lora_parameters:\n  keys: [self_attn.q_proj]\n  rank: 4\n  scale: 10.0\n  dropout: 0.0\n")
    res = run_cli("train", "-c", cfg, "--iters", "2")
    assert res.code == 0, res.err
    ac = read_json(tmp_path / "ad" / "adapter_config.json")
    assert ac["iters"] == 2 and ac["fine_tune_type"] == "dora" and ac["num_layers"] == 2
    assert ac["lora_parameters"] == {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    # mlx-lm loads it: the last 2 layers' q_proj as DoRA
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.utils import load

    model, _ = load(str(tiny_llama_dir), adapter_path=str(tmp_path / "ad"))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, DoRALinear)) == \
        ["model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    assert json.loads((tmp_path / "ad" / "loss.json").read_text())["train"][-1]["iteration"] == 2
