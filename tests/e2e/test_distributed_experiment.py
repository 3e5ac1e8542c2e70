"""``pyfuse experiment run`` on two real ranks on localhost
(pyfuse.distributed.local) against one process: results.json, the
pre-registration and every step output byte-identical, only rank 0
printing; a run killed under 2 ranks resumes in one process to the same
results. The collectives and ``pyfuse eval mc`` on two ranks:
tests/e2e/test_distributed.py."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from pyfuse.distributed.local import LocalLaunch, launch_local
from pyfuse.experiment import run_experiment

from helpers import file_digests, mmlu_row, read_json, run_cli, write_jsonl, write_yaml

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 1200  # seconds: a hung rank must not hang the test session
PYFUSE = [sys.executable, "-m", "pyfuse"]


def _mmlu_rows(n=16):
    words = ["red", "blue", "green", "seven", "lion", "iron", "salt", "river"]
    cats = ["astronomy", "chemistry", "history", "biology"]
    return [mmlu_row(2000 + i, category=cats[i % 4], question=f"Item {i}: which word names a colour?",
                     options=[words[(i + k) % 8] for k in range(4)], answer="ABCD"[i % 4], answer_index=i % 4)
            for i in range(n)]


def _spec(base: Path, persona: Path) -> dict:
    """Set-G mined on both models (two evaluations), a trained condition and its zero-delta twin fused,
    two multiple-choice datasets (logprob, and generate in batches of 2), a pre-registered criterion."""
    train = {"data": "setg", "layers": [3], "keys": ["self_attn.q_proj"], "rank": 2, "alpha": 2, "iters": 2,
             "batch_size": 1, "val_batches": 1, "steps_per_report": 1}
    fuse = {"fuse": {"policy": "stock"}}
    stages = {"A1": [{"train": {}}, fuse], "A0": [{"train": {}}, "zero", fuse]}
    mc = [{"data": "mmlu", "method": "logprob", "batch_size": 3},
          {"name": "gen", "data": "mmlu", "method": "generate", "batch_size": 2, "max_tokens": 4, "limit": 5}]
    prereg = {"hypothesis": "training adds knowledge", "criterion": "diff(A1, A0) >= 0.05", "planned_n": 16,
              "baseline_accuracy": 0.25, "expected_discordance": 0.2, "allow_underpowered": True,
              "underpowered_reason": "a test on 16 items"}
    return {"version": 1, "name": "two-ranks", "report": {"noise_floor": False},
            "models": {"base": str(base), "persona": str(persona)}, "data": {"mmlu": "mmlu.jsonl"},
            "conditions": {"P0": {"from": "persona"},
                           **{name: {"from": "persona", "stages": st} for name, st in stages.items()}},
            "setg": {"data": "mmlu", "base": "base", "persona": "persona", "method": "logprob", "batch_size": 3,
                     "split": {"train": 0.5, "test": 0.5}},
            "defaults": {"train": train}, "evaluation": {"mc": mc},
            "comparisons": [["A1", "A0"], ["A0", "P0"]], "preregistration": prereg}


@pytest.fixture(scope="module")
def exp(tmp_path_factory, tiny_moe_dir, tiny_tokenizer_dir):
    from pyfuse.demo.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("experiment")
    persona = build_tiny_model(root / "persona", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                               quantize={"group_size": 64, "bits": 3}, seed=1)
    write_jsonl(root / "mmlu.jsonl", _mmlu_rows())
    spec_path = write_yaml(root / "spec.yaml", _spec(tiny_moe_dir, persona))
    res = run_experiment(spec_path, root / "one")
    return {"root": root, "spec_path": spec_path, "one": root / "one", "res": res}


# What differs between any two runs (timings, the lock's time, absolute paths), not between rank counts
VARYING = ("run.log.jsonl", ".lock", "done.json", "prereg.json", "report.md", "fuse_report.json", "loss.json",
           "adapter_config.json", "zero_adapter.json")


def _outputs(out: Path) -> dict[str, str]:
    """The SHA-256 of every file of a run that does not vary between runs (results.json, every
    rows.jsonl and summary.json, Set-G's splits, the adapters' tensors, the plots)."""
    return {k: v for k, v in file_digests(out).items() if not k.endswith(VARYING)}


def _same_lock(a: Path, b: Path) -> bool:
    """The same pre-registration, apart from when it was locked."""
    docs = [read_json(p / "prereg.json") for p in (a, b)]
    for d in docs:
        d.pop("locked_at")
    return docs[0] == docs[1]


def test_experiment_on_two_ranks_is_byte_identical_to_one_process(exp):
    two = exp["root"] / "two"
    run = launch_local(2, [*PYFUSE, "experiment", "run", exp["spec_path"], "--out", two], timeout=TIMEOUT,
                       cwd=REPO)
    assert not run.timed_out, run.stderr
    assert run.failed_ranks() == {}, run.stderr
    assert (two / "results.json").read_bytes() == (exp["one"] / "results.json").read_bytes()
    assert _same_lock(two, exp["one"])
    assert _outputs(two) == _outputs(exp["one"])
    assert sorted(file_digests(two)) == sorted(file_digests(exp["one"]))  # the same files, no more
    kinds = [read_json(p)["kind"] for p in (two / "steps").glob("*/done.json")]
    assert kinds.count("eval-mc") >= 6 and "setg" in kinds and "train" in kinds
    assert run.stdout.count("step(s) run") == 1  # only rank 0 printed its summary
    assert not [p for p in (two / "steps").iterdir() if p.name.startswith(".")]


def _finished(out: Path) -> list[str]:
    return [p.parent.name for p in (out / "steps").glob("*/done.json") if not p.parent.name.startswith(".")]


def test_a_run_killed_on_two_ranks_resumes_in_one_process(exp):
    out = exp["root"] / "killed"
    launch = LocalLaunch(2, [*PYFUSE, "experiment", "run", exp["spec_path"], "--out", out], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while len(_finished(out)) < 2:
            assert launch.proc.poll() is None, "the run ended before two steps finished"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        launch.kill()
        launch.wait(10)
    finished = _finished(out)
    assert 2 <= len(finished) < len(exp["res"].executed)
    assert not (out / "results.json").exists()
    r = run_cli("experiment", "run", exp["spec_path"], "--out", out)
    assert r.code == 0, r.err
    assert f"{len(finished)} of " in r.err and "already done" in r.err
    assert (out / "results.json").read_bytes() == (exp["one"] / "results.json").read_bytes()
    assert _outputs(out) == _outputs(exp["one"])


# -- --data-parallel-train -------------------------------------------------------------------------


def test_data_parallel_train_refuses_a_batch_the_ranks_cannot_share_before_any_step(exp, tmp_path):
    out = tmp_path / "refused"
    run = launch_local(2, [*PYFUSE, "experiment", "run", exp["spec_path"], "--out", out, "--data-parallel-train"],
                       timeout=TIMEOUT, cwd=REPO)
    assert not run.timed_out, run.stderr
    assert "--data-parallel-train: step train-" in run.stderr
    assert "batch_size 1 is not divisible by the 2 ranks of the launch" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (out / "steps").exists() or not any((out / "steps").iterdir())


def test_data_parallel_train_shares_the_train_steps(exp, tiny_moe_dir, tmp_path):
    """The train steps on both ranks: each step's adapter equals the one
    process trains from the same inputs to float rounding (SGD: a wrong
    gradient shows in the weights), and is not bit-identical to it (one
    process would be: the evidence that the ranks shared the batches)."""
    import mlx.core as mx
    import numpy as np

    from pyfuse.train import train_adapter

    spec = _spec(tiny_moe_dir, exp["root"] / "persona")
    spec["defaults"]["train"].update(batch_size=2, optimizer="sgd", learning_rate=1.0)
    spec["data"]["mmlu"] = str(exp["root"] / "mmlu.jsonl")
    spec_path = write_yaml(tmp_path / "spec.yaml", spec)
    out = tmp_path / "dp"
    run = launch_local(2, [*PYFUSE, "experiment", "run", spec_path, "--out", out, "--data-parallel-train"],
                       timeout=TIMEOUT, cwd=REPO)
    assert not run.timed_out, run.stderr
    assert run.failed_ranks() == {}, run.stderr
    assert (out / "results.json").exists()
    trains = [s for s in read_json(out / "plan.json")["steps"] if s["kind"] == "train"]
    assert trains
    for st in trains:
        inputs = st["inputs"]
        model = inputs["model"]["source"]
        data = out / "steps" / inputs["data"]["step"] / inputs["data"]["out"]
        ref = tmp_path / f"ref-{st['dir']}"
        train_adapter(model, data, ref, **{k: v for k, v in st["options"].items() if k != "data"})
        a = mx.load(str(out / "steps" / st["dir"] / "adapter" / "adapters.safetensors"))
        b = mx.load(str(ref / "adapters.safetensors"))
        assert a.keys() == b.keys()
        for k in b:
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-5, atol=1e-6, err_msg=k)
        assert any(not np.array_equal(np.array(a[k]), np.array(b[k])) for k in b)
