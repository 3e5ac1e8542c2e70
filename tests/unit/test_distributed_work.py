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


def test_the_ranks_sums_are_the_single_process_loss_and_gradient(monkeypatch):
    """Two ranks simulated in one process (``all_sum`` adds what each sends):
    the token-weighted sums of the two halves give one process's loss,
    metric and gradient over the whole batch (its rows have different
    token counts, so an unweighted mean of the ranks would not)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    model = nn.Linear(4, 3)
    x = mx.random.normal((6, 5, 4))
    mask = mx.array([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0]], dtype=mx.float32)

    def loss(model, x, mask):  # as mlx-lm's default_loss: a mean over the tokens, and their number
        ce = (model(x) ** 2).sum(-1) * mask
        ntoks = mask.sum()
        return ce.sum() / ntoks, ntoks, (ce * 2).sum() / ntoks

    (l1, w1, m1), g1 = nn.value_and_grad(model, loss)(model, x, mask)
    sent = {}

    def all_sum(vec, group=None):
        sent.setdefault("first", vec)
        return vec if len(sent) == 1 and "second" not in sent else sent["first"] + vec

    monkeypatch.setattr(mx.distributed, "all_sum", all_sum)
    out = []
    for rank in (1, 0):  # rank 1 sends first (captured), then rank 0 receives the sum
        dp = training.DataParallel(rank, 2, None)
        ids = mx.array(dp.share(list(range(6))))
        (ls, w, ms), g = nn.value_and_grad(model, dp.weighted_loss(loss))(model, x[ids], mask[ids])
        out.append(dp.reduce(ls, w, [ms], g))
        sent["second"] = True
    lvalue, weight, metrics, grad = out[1]
    assert float(weight) == float(w1) == 16.0
    assert float(lvalue) == pytest.approx(float(l1), rel=1e-6)
    assert float(metrics[0]) == pytest.approx(float(m1), rel=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(grad), tree_flatten(g1)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-7, err_msg=k)


def test_check_same_refuses_ranks_that_went_out_of_step(monkeypatch):
    weights = {"a": mx.ones((3,), mx.bfloat16), "b": mx.zeros((2, 2))}
    monkeypatch.setattr(training, "all_gather_bytes", lambda data, what: [data, data])
    training.DataParallel(0, 2, None).check_same(weights)
    monkeypatch.setattr(training, "all_gather_bytes", lambda data, what: [data, b"other"])
    with pytest.raises(RuntimeError, match="weights differ"):
        training.DataParallel(0, 2, None).check_same(weights)
