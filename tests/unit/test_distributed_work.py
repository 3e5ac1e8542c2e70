"""The pieces of sharded fusing and data-parallel training that need no
launcher (the 2-rank runs: tests/e2e/test_distributed_train_fuse.py): the
order ranks deal the fuse jobs out in is the order the writer asks for
them (observed on a real one-process fuse), tensors survive the trip
between ranks bit for bit, a rank's share of a batch, the refusals, and
``alone`` running a block as one process."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from pyfuse import distributed
from pyfuse.distributed import fuse as dfuse
from pyfuse.distributed import group, training
from pyfuse.errors import UserError


def test_jobs_are_dealt_in_the_order_the_writer_computes_them(tiny_moe_dir, moe_adapter, tmp_path, monkeypatch):
    import pyfuse.fuse.api as api

    seen, planned = [], {}
    real_writer, real_runner = api.write_model, api._job_runner

    def writer(mdir, plan, save_path, *, compute, **kw):
        planned["order"] = [j.path for j in dfuse.job_order(mdir, plan)]

        def spy(job):
            seen.append(job.path)
            return compute(job)

        return real_writer(mdir, plan, save_path, compute=spy, **kw)

    monkeypatch.setattr(api, "write_model", writer)
    monkeypatch.setattr(api, "_job_runner", real_runner)
    api.fuse_model(tiny_moe_dir, moe_adapter, tmp_path / "out")
    assert len(seen) >= 4 and seen == planned["order"]


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32, mx.uint32])
def test_tensors_travel_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((3, 5, 8)).astype(np.float32) * 100).astype(dtype)
    empty = mx.zeros((0, 4), dtype)
    back, record = dfuse._unpack(dfuse._pack({"x": x, "e": empty}, {"name": "m", "noise": 0.25}))
    assert record == {"name": "m", "noise": 0.25}
    for name, a in (("x", x), ("e", empty)):
        b = back[name]
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.array(b.view(mx.uint8)).tobytes() == np.array(a.view(mx.uint8)).tobytes()


def test_with_record_pairs_tensors_and_the_record_appended():
    records = []

    def run(job):
        if job == "fused":
            records.append({"name": job})
        return {"t": job}

    both = dfuse.with_record(run, records)
    assert both("fused") == ({"t": "fused"}, {"name": "fused"})
    assert both("dequantized") == ({"t": "dequantized"}, None)
    assert records == []


def test_a_ranks_share_of_a_batch():
    ids = list(range(10, 18))
    shares = [training.DataParallel(r, 4, None).share(ids) for r in range(4)]
    assert shares == [[10, 14], [11, 15], [12, 16], [13, 17]]
    assert sorted(sum(shares, [])) == ids


def test_one_process_trains_as_before_and_refusals(monkeypatch):
    assert training.data_parallel(3, "orpo") is None  # no launcher: one process, anything goes
    monkeypatch.setattr(group, "_current", group.Group(1, 2, handle=None))
    with pytest.raises(UserError, match="batch_size 3 is not divisible by the 2 ranks"):
        training.data_parallel(3, "sft")
    with pytest.raises(UserError, match="orpo cannot be trained data-parallel"):
        training.data_parallel(4, "orpo")
    dp = training.data_parallel(4, "dpo")
    assert (dp.rank, dp.size, dp.is_main) == (1, 2, False)


def test_alone_runs_a_block_as_one_process(monkeypatch):
    monkeypatch.setattr(group, "_current", group.Group(0, 3, handle=None))
    with distributed.alone():
        assert distributed.current() == group.Group(0, 1)
        # the collectives are pass-throughs there: nothing waits for the other ranks
        assert distributed.broadcast_json({"a": 1}, "testing") == {"a": 1}
    assert distributed.current().size == 3
