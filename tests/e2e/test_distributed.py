"""Two real ranks on localhost (``mlx.launch -n 2 --backend ring`` through
pyfuse.distributed.local, free ports, killed after a timeout) against one
process: the collectives (bytes of different lengths, the shard gather, a
rank that fails, a rank that dies), ``pyfuse eval mc`` (both methods,
results byte-identical, only rank 0 writes and prints, a failing or dying
rank is a clear error and nothing is written), and ``pyfuse experiment
run`` (results.json, the pre-registration and every step output
byte-identical; a run killed under 2 ranks resumes in one process)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from pyfuse.distributed.local import LocalLaunch, launch_local
from pyfuse.experiment import run_experiment

from helpers import file_digests, mmlu_row, read_json, run_cli, write_jsonl, write_yaml

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 900  # seconds: a hung rank must not hang the test session
PYFUSE = [sys.executable, "-m", "pyfuse"]


def _launch(n, argv, **kw):
    run = launch_local(n, argv, timeout=TIMEOUT, cwd=REPO, **kw)
    assert not run.timed_out, run.stderr
    return run


def _script(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, str(path)]


COLLECTIVES = r'''
import json, os, signal, sys
from pathlib import Path
from pyfuse import distributed as d
from pyfuse.errors import UserError
from pyfuse.io.files import Terminated, sigterm_as_interrupt

out = Path(sys.argv[1])
g = d.current()
rec = {"size": g.size, "writes": d.writes()}
mine = ("\u00e9t\u00e9 " * 3).encode() if g.rank == 0 else b""
rec["gathered"] = [b.decode() for b in d.all_gather_bytes(mine, "gathering")]
rec["broadcast"] = d.broadcast_json({"from": g.rank}, "broadcasting")
rec["mapped"] = d.map_shard(7, 2, lambda s: [{"i": i, "by": g.rank} for i in s.items], "mapping")

def outcome(fn):
    try:
        fn()
        return ["ok"]
    except d.RankError as e:
        return ["RankError", str(e)]
    except Exception as e:
        return [type(e).__name__, str(e)]

def fail_on_1():
    with d.together("testing"):
        if g.rank == 1:
            raise UserError("rank one cannot")

def fail_on_0(shard):
    if g.rank == 0:
        raise ValueError("bad value\nsecond line")
    return [0] * len(shard.items)

rec["together"] = outcome(fail_on_1)
rec["map_fail"] = outcome(lambda: d.map_shard(4, 1, fail_on_0, "scoring"))
(out / f"rank{g.rank}.json").write_text(json.dumps(rec))
if g.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)  # dies: mlx.launch then stops rank 0 with SIGTERM
with sigterm_as_interrupt():  # as `pyfuse experiment run` does
    try:
        d.all_gather_bytes(b"x", "gathering after a death")
        rec["after_death"] = ["ok"]
    except (d.RankError, Terminated) as e:  # whichever comes first: the lost connection or the SIGTERM
        rec["after_death"] = [type(e).__name__, str(e)]
(out / f"rank{g.rank}.json").write_text(json.dumps(rec))
'''


def test_collectives_on_two_ranks(tmp_path):
    run = _launch(2, [*_script(tmp_path, "collectives.py", COLLECTIVES), tmp_path])
    assert run.failed_ranks().get(1) == "exit code -9", run.stderr  # and rank 0 did not hang (no timeout)
    r0, r1 = (read_json(tmp_path / f"rank{r}.json") for r in (0, 1))
    assert (r0["size"], r0["writes"], r1["size"], r1["writes"]) == (2, True, 2, False)
    assert r0["gathered"] == r1["gathered"] == ["\u00e9t\u00e9 " * 3, ""]
    assert r0["broadcast"] == r1["broadcast"] == {"from": 0}
    # batches of 2 round-robin: rank 0 has batches 0 and 2 (items 0, 1, 4, 5), rank 1 the rest
    expected = [{"i": i, "by": (i // 2) % 2} for i in range(7)]
    assert r0["mapped"] == r1["mapped"] == expected
    assert r0["together"] == ["RankError", "rank 1 failed while testing: rank one cannot"]
    assert r1["together"] == ["UserError", "rank one cannot"]
    assert r0["map_fail"] == ["ValueError", "bad value\nsecond line"]
    assert r1["map_fail"] == ["RankError", "rank 0 failed while scoring: ValueError: bad value"]
    assert r0["after_death"][0] in ("RankError", "Terminated"), r0["after_death"]
    if r0["after_death"][0] == "RankError":
        assert "lost the connection to another rank while gathering after a death" in r0["after_death"][1]


# -- pyfuse eval mc ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mc_items(tmp_path_factory):
    cats = ["math", "history", "law"]
    rows = [mmlu_row(i, category=cats[i % 3], question=f"Item {i}: what is {i} + 1?") for i in range(7)]
    return write_jsonl(tmp_path_factory.mktemp("mc") / "items.jsonl", rows)


def _mc_args(model, data, out, method):
    return ["eval", "mc", "--model", model, "--data", data, "--method", method, "--batch-size", "2",
            "--max-tokens", "6", "--out", out, "--json"]


@pytest.mark.parametrize("method", ["logprob", "generate"])
def test_eval_mc_on_two_ranks_is_byte_identical_to_one_process(tmp_path, tiny_moe_dir, mc_items, method):
    one = run_cli(*_mc_args(tiny_moe_dir, mc_items, tmp_path / "one.jsonl", method))
    assert one.code == 0, one.err
    run = _launch(2, [*PYFUSE, *_mc_args(tiny_moe_dir, mc_items, tmp_path / "two.jsonl", method)])
    assert run.failed_ranks() == {}, run.stderr
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in rows] == [0, 0, 1, 1, 2, 2, 3]
    summary = json.loads(run.stdout)  # one JSON document: only rank 0 printed
    expected = json.loads(one.out)
    for s in (summary, expected):
        s.pop("seconds"), s.pop("out")
    assert summary == expected


FAULTY = r'''
import os, signal, sys
from pyfuse import distributed as d
from pyfuse.errors import UserError
import pyfuse.evals.mc as mc

def broken(*args, **kwargs):
    if sys.argv[1] == "die":
        os.kill(os.getpid(), signal.SIGKILL)  # a rank that crashes
    raise UserError("the scorer is broken on this rank")

if d.current().rank == 1:
    mc.score_item = broken
from pyfuse.cli import main
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.parametrize("fault", ["error", "die"])
def test_a_failing_rank_is_a_clear_error_and_nothing_is_written(tmp_path, tiny_moe_dir, mc_items, fault):
    out = tmp_path / "rows.jsonl"
    run = _launch(2, [*_script(tmp_path, "faulty.py", FAULTY), fault,
                      *_mc_args(tiny_moe_dir, mc_items, out, "logprob")])
    assert not out.exists() and not list(tmp_path.glob(".rows.jsonl*"))
    assert run.stdout == ""
    failed = run.failed_ranks()
    # Both report before either exits (farewell); whichever exits first,
    # mlx.launch then stops the other with SIGTERM (-15, or 143 from pyfuse's
    # handler), so an exit status alone does not say which rank failed: the
    # messages below do.
    stopped = ("exit code -15", "exit code 143")
    assert failed.pop(0, None) in ("exit code 2", *stopped, None), run.stderr
    if fault == "error":
        assert failed in ({1: "exit code 2"}, *({1: s} for s in stopped)), run.stderr
        assert ("pyfuse eval (rank 0 of 2): error: rank 1 failed while scoring items: the scorer is broken "
                "on this rank") in run.stderr
        assert "pyfuse eval (rank 1 of 2): error: the scorer is broken on this rank" in run.stderr
    else:  # mlx.launch names the dead rank; rank 0 stops (SIGTERM) without writing
        assert failed == {1: "exit code -9"}, run.stderr
    assert "Traceback" not in run.stderr
