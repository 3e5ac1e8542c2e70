"""Data-parallel training on two real ranks on localhost (``mlx.launch -n 2
--backend ring`` through pyfuse.distributed.local, killed after a timeout)
against one process: the adapter to float tolerance, the loss log, only
rank 0 writes; a batch size the ranks cannot share is refused; a run killed
under 2 ranks resumes in one process; dropout trains with every rank
holding the same weights.

Tolerance: the gradient of a LoRA matrix is a sum over every token of the
batch. One process sums them in one matrix product, two ranks sum their
own rows and then add the two partial sums: float addition in another
order rounds differently (relative 6e-8 per float32 operation). The
training uses plain SGD (lr 1.0), so a gradient error reaches the weights
in proportion (Adam's normalisation would hide a wrongly scaled gradient):
measured, the largest difference is 6e-8 (one float32 ulp of the larger
weights, ~0.15); the test allows atol 1e-6 + rtol 1e-5. Averaging the
ranks' gradients unweighted (mlx-lm's rule; the ranks' token counts
differ here) moved the weights by up to 1.9e-3 (measured with a patched
run). The logged losses: measured within 3e-7 (relative), allowed 1e-5;
token counts exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from pyfuse.distributed.local import launch_local

from helpers import file_digests, read_json, run_cli, write_jsonl

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # seconds: a hung rank must not hang the test session (the launch's process group is killed)
PYFUSE = [sys.executable, "-m", "pyfuse"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """Rows of different lengths (so the ranks' token counts differ within a batch)."""
    root = tmp_path_factory.mktemp("dp_data")
    rows = [{"messages": [{"role": "user", "content": f"say {w} {i}" + " again" * (i % 4)},
                          {"role": "assistant", "content": f"{w} {w[::-1]} {i % 3}" + " ok" * (i % 5)}]}
            for i, w in enumerate(WORDS)]
    write_jsonl(root / "train.jsonl", rows[:12])
    write_jsonl(root / "valid.jsonl", rows[12:])
    return root


def _train_args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--adapter-path", out, "--iters", "6",
            "--batch-size", "4", "--grad-accumulation-steps", "2", "--steps-per-report", "2",
            "--steps-per-eval", "3", "--val-batches", "-1", "--optimizer", "sgd", "--learning-rate", "1.0",
            "--rank", "4", "--alpha", "8", "--mask-prompt", "--save-every", "3", "--seed", "3", "--num-layers", "-1",
            *map(str, extra)]


def _launch(n, argv):
    run = launch_local(n, argv, timeout=TIMEOUT, cwd=REPO)
    assert not run.timed_out, run.stderr
    return run


def _weights(adapter: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(adapter / "adapters.safetensors")).items()}


def _assert_same_training(two: Path, one: Path) -> None:
    a, b = _weights(two), _weights(one)
    assert a.keys() == b.keys()
    moved = max(float(np.abs(v).max()) for k, v in b.items() if k.endswith("lora_b"))
    assert moved > 1e-2  # the adapter trained (lora_b starts at zero)
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    la, lb = read_json(two / "loss.json"), read_json(one / "loss.json")
    for kind, loss in (("train", "train_loss"), ("val", "val_loss")):
        assert [r["iteration"] for r in la[kind]] == [r["iteration"] for r in lb[kind]]
        assert [r[loss] for r in la[kind]] == pytest.approx([r[loss] for r in lb[kind]], rel=1e-5)
    assert [r["trained_tokens"] for r in la["train"]] == [r["trained_tokens"] for r in lb["train"]]
    ca, cb = read_json(two / "adapter_config.json"), read_json(one / "adapter_config.json")
    for c in (ca, cb):
        c.pop("adapter_path"), c.pop("best_val_loss")
    assert ca == cb


@pytest.fixture(scope="module")
def one_process(tiny_moe_dir, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp_one") / "adapter"
    res = run_cli(*_train_args(tiny_moe_dir, chat_data, out))
    assert res.code == 0, res.err
    return out


def test_two_ranks_train_the_single_process_adapter(tiny_moe_dir, chat_data, one_process, tmp_path):
    out = tmp_path / "adapter"
    run = _launch(2, [*PYFUSE, *_train_args(tiny_moe_dir, chat_data, out)])
    assert run.failed_ranks() == {}, run.stderr
    _assert_same_training(out, one_process)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # only rank 0 wrote, no run dir left
    assert run.stdout.count("pyfuse train: wrote") == 1  # only rank 0 printed


def test_a_batch_the_ranks_cannot_share_is_refused(tiny_moe_dir, chat_data, tmp_path):
    out = tmp_path / "adapter"
    argv = _train_args(tiny_moe_dir, chat_data, out)
    argv[argv.index("--batch-size") + 1] = "3"
    run = _launch(2, [*PYFUSE, *argv])
    assert ("pyfuse train (rank 0 of 2): error: batch_size 3 is not divisible by the 2 ranks of the launch: "
            "each rank takes an equal share of every batch") in run.stderr
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


KILLED = r'''
import os, signal, sys
import pyfuse.train.loop as loop
from pyfuse import distributed as d

run_loop = loop.run_loop

def dying(*args, **kwargs):
    def on_step(it):
        if it == 4:  # after the checkpoint of step 3: every rank dies
            os.kill(os.getpid(), signal.SIGKILL)
    kwargs["on_step"] = on_step
    return run_loop(*args, **kwargs)

loop.run_loop = dying
import pyfuse.train.lora as lora
lora.run_loop = dying
from pyfuse.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_run_killed_on_two_ranks_resumes_in_one_process(tiny_moe_dir, chat_data, one_process, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    out = tmp_path / "runs" / "adapter"
    out.parent.mkdir()
    run = _launch(2, [sys.executable, script, *_train_args(tiny_moe_dir, chat_data, out)])
    assert run.failed_ranks(), run.stderr
    assert not out.exists() and (out.parent / ".adapter.run" / "checkpoints" / "0000003" / "state.json").exists()
    res = run_cli(*_train_args(tiny_moe_dir, chat_data, out, "--resume"))
    assert res.code == 0, res.err
    assert "resumed from iteration 3" in res.out
    _assert_same_training(out, one_process)


def test_dropout_keeps_every_rank_in_step(tiny_moe_dir, chat_data, tmp_path):
    """Each rank draws its own masks; the update is the same on every rank
    (the run checks the ranks' weights are identical before writing)."""
    out = tmp_path / "adapter"
    run = _launch(2, [*PYFUSE, *_train_args(tiny_moe_dir, chat_data, out, "--dropout", "0.3")])
    assert run.failed_ranks() == {}, run.stderr
    assert (out / "adapters.safetensors").exists()


# -- pyfuse fuse -----------------------------------------------------------------------------------


def _fuse_args(model, adapter, out, *extra):
    return ["fuse", "--model", model, "--adapter-path", adapter, "--save-path", out,
            "--report", f"{out}.json", *map(str, extra)]


@pytest.mark.parametrize("policy", ["stock", "stochastic"])
def test_fuse_on_two_ranks_writes_the_single_process_model(tiny_moe_dir, moe_adapter, tmp_path, policy):
    """Each rank fuses a share of the modules, rank 0 writes: the model
    byte-identical, the report equal but for its timing."""
    one = run_cli(*_fuse_args(tiny_moe_dir, moe_adapter, tmp_path / "one", "--policy", policy))
    assert one.code == 0, one.err
    run = _launch(2, [*PYFUSE, *_fuse_args(tiny_moe_dir, moe_adapter, tmp_path / "two", "--policy", policy)])
    assert run.failed_ranks() == {}, run.stderr
    assert file_digests(tmp_path / "two") == file_digests(tmp_path / "one")
    r1, r2 = read_json(tmp_path / "one.json"), read_json(tmp_path / "two.json")
    assert r1["summary"].pop("seconds") >= 0 and r2["summary"].pop("seconds") >= 0
    assert len(r1["tensors"]) >= 4 and r2 == r1
    assert run.stdout.count("pyfuse fuse: wrote") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.json", "two", "two.json"]


FUSE_FAULT = r'''
import sys
from pyfuse import distributed as d
from pyfuse.errors import UserError
import pyfuse.fuse.compute as compute

real = compute.run_job

def broken(mdir, job, *args, **kwargs):
    if d.current().rank == 1 and job.path.endswith("q_proj"):
        raise UserError("cannot fuse on this rank")
    return real(mdir, job, *args, **kwargs)

compute.run_job = broken
from pyfuse.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_rank_failing_in_a_fuse_stops_every_rank_and_nothing_is_written(tiny_moe_dir, moe_adapter, tmp_path):
    script = tmp_path / "fault.py"
    script.write_text(FUSE_FAULT)
    out = tmp_path / "out" / "model"
    out.parent.mkdir()
    run = _launch(2, [sys.executable, script, *_fuse_args(tiny_moe_dir, moe_adapter, out)])
    assert "pyfuse fuse (rank 1 of 2): error: cannot fuse on this rank" in run.stderr
    assert "pyfuse fuse (rank 0 of 2): error: rank 1 failed while fusing modules: cannot fuse on this rank" \
        in run.stderr
    assert "Traceback" not in run.stderr
    assert list(out.parent.iterdir()) == []
