"""Signals mid-write, in real processes: SIGTERM and SIGINT end a long
command with one line and 143 / 130, SIGKILL ends it at once; in every case
the destination is absent (nothing half-written), the inputs are
byte-identical, and a rerun gives byte-identical output to an undisturbed
run (the temporary directory a killed run left is swept by the rerun).

The signal is sent as soon as the command's temporary output appears (its
``.NAME.pyfuse-tmp-PID-*`` directory), i.e. while it writes. Two
concurrent fuses to one destination: exactly one wins."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import file_digests, make_adapter, write_jsonl

CODES = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}
MESSAGES = {signal.SIGTERM: "terminated; nothing was left half-written",
            signal.SIGINT: "interrupted; nothing was left half-written"}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_tokenizer_dir, tiny_moe_dir):
    """A model large enough that its fuse writes for a good fraction of a
    second (32 experts of 512 x 512, 3-bit), an adapter on its experts, the
    tiny MoE to train on (training is slow enough) and text rows."""
    from pyfuse.demo.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("signals")
    shutil.copytree(tiny_moe_dir, root / "in" / "small")
    model = build_tiny_model(root / "in" / "M", tokenizer_dir=tiny_tokenizer_dir, arch="qwen3_moe",
                             hidden_size=512, num_experts=32, moe_intermediate_size=512,
                             quantize={"group_size": 64, "bits": 3})
    make_adapter(model, root / "in" / "A", num_layers=4,
                 keys=["mlp.switch_mlp.down_proj", "mlp.switch_mlp.up_proj"])
    write_jsonl(root / "in" / "train.jsonl", [{"text": f"row {i}: the quick brown fox jumps"} for i in range(16)])
    return root


def _commands(root: Path, dest: Path) -> dict[str, list]:
    inp = root / "in"
    return {
        "fuse": ["fuse", "--model", inp / "M", "--adapter-path", inp / "A", "--save-path", dest, "--quiet",
                 "--exact-report"],
        "train": ["train", "--model", inp / "small", "--data", inp / "train.jsonl", "--adapter-path", dest,
                  "--iters", "10", "--batch-size", "2", "--rank", "2", "--layers", "3", "--keys", "self_attn.q_proj",
                  "--steps-per-report", "5", "--quiet"],
    }


def _start(argv) -> subprocess.Popen:
    env = {**os.environ, "PYFUSE_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-m", "pyfuse", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _run(argv) -> subprocess.CompletedProcess:
    p = _start(argv)
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _signal_mid_write(p: subprocess.Popen, dest: Path, sig, prefix: str) -> None:
    """Send ``sig`` as soon as ``dest``'s temporary output exists."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(n.startswith(prefix) for n in os.listdir(dest.parent)):
            p.send_signal(sig)
            return
        if p.poll() is not None:
            pytest.fail(f"the command ended (code {p.returncode}) before it started writing: {p.stderr.read()}")
        time.sleep(0.002)
    pytest.fail("no temporary output appeared")


def _reference(work: Path, name: str) -> dict:
    dest = work / "ref" / name
    if not dest.exists():
        dest.parent.mkdir(exist_ok=True)
        r = _run(_commands(work, dest)[name])
        assert r.returncode == 0, r.stderr
    return file_digests(dest)


def _comparable(digests: dict, name: str) -> dict:
    """The files and the bytes that must not depend on the run: all of them
    for a fuse; for a training, its weights (its config and plot name the
    output directory, its loss curve has timings)."""
    if name == "train":
        return {k: (v if k == "adapters.safetensors" else None) for k, v in digests.items()}
    return digests


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
@pytest.mark.parametrize("name", ["fuse", "train"])
def test_a_signal_mid_write_leaves_nothing_and_a_rerun_gives_the_same_bytes(work, name, sig):
    reference = _reference(work, name)
    inputs = file_digests(work / "in")
    dest = work / "out" / f"{name}-{sig.name}"
    dest.parent.mkdir(exist_ok=True)
    argv = _commands(work, dest)[name]
    p = _start(argv)
    # a training writes into its resumable run directory (.NAME.run, see
    # pyfuse.train.checkpoint); a fuse into a pid-named temporary
    _signal_mid_write(p, dest, sig, f".{dest.name}.run" if name == "train" else f".{dest.name}.pyfuse-tmp-")
    out, err = p.communicate(timeout=300)
    assert p.returncode == CODES[sig], err
    if sig in MESSAGES:
        assert err.strip().splitlines()[-1] == f"pyfuse {name}: {MESSAGES[sig]}" and "Traceback" not in err
    assert not dest.exists()  # nothing half-written
    assert file_digests(work / "in") == inputs
    # the rerun sweeps what a killed run left and writes the same bytes (a
    # training keeps its interrupted run for --resume: --force starts over)
    r = _run([*argv, "--force"] if name == "train" else argv)
    assert r.returncode == 0, r.stderr
    assert _comparable(file_digests(dest), name) == _comparable(reference, name)
    assert [n for n in os.listdir(dest.parent) if ".pyfuse-" in n] == []
    shutil.rmtree(dest)


def test_two_concurrent_fuses_to_one_destination_one_wins(work):
    reference = _reference(work, "fuse")
    dest = work / "out" / "race"
    dest.parent.mkdir(exist_ok=True)
    argv = _commands(work, dest)["fuse"]
    procs = [_start(argv) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], results
    loser = results[[p.returncode for p in procs].index(2)][1].strip()
    assert loser.startswith("pyfuse fuse: error: ") and len(loser.splitlines()) == 1
    assert ("another pyfuse run is writing" in loser or "already exists" in loser), loser
    assert file_digests(dest) == reference
