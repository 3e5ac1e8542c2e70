"""pyfuse.distributed without a launcher (the real 2-rank runs are in
tests/e2e/test_distributed.py): the shard assignment against the
single-process batch composition (pyfuse.lm.generate.batches), a process
without a launcher never touching mx.distributed, mlx.launch -n 1 as one
process, and the collectives as pass-throughs."""

from __future__ import annotations

import pytest

from pyfuse import distributed
from pyfuse.distributed import group
from pyfuse.errors import UserError
from pyfuse.lm.generate import batches


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_shards_partition_the_items_into_the_single_process_batches(size, batch_size):
    for n in range(0, 30):
        whole = [list(b) for b in batches(n, batch_size)]
        seen = []
        for rank in range(size):
            shard = distributed.shard_batches(n, batch_size, rank, size)
            assert list(shard.items) == sorted(shard.items)
            # batching this rank's items again by batch_size gives exactly the global batches it owns
            regrouped = [[shard.items[i] for i in b] for b in batches(len(shard.items), batch_size)]
            assert regrouped == [whole[shard.global_batch(j)] for j in range(len(regrouped))]
            assert len(regrouped) == len(shard.batches)
            seen += shard.items
        assert sorted(seen) == list(range(n))  # every item once


def test_shard_of_one_process_is_everything():
    shard = distributed.shard_batches(7, 3)
    assert shard.items == tuple(range(7)) and shard.batches == (0, 1, 2)
    with pytest.raises(ValueError):
        distributed.shard_batches(7, 3, rank=2, size=2)


@pytest.fixture
def fresh_group(monkeypatch):
    """A process whose group is not started yet, without launcher variables."""
    monkeypatch.setattr(group, "_current", None)
    for k in group.LAUNCHER_ENV + ("MLX_HOSTFILE",):
        monkeypatch.delenv(k, raising=False)
    yield
    group._current = None


def test_without_a_launcher_mx_distributed_is_never_touched(fresh_group, monkeypatch):
    import mlx.core as mx

    def boom(*a, **k):
        raise AssertionError("mx.distributed.init called without a launcher")

    monkeypatch.setattr(mx.distributed, "init", boom)
    g = distributed.current()
    assert (g.rank, g.size, g.handle) == (0, 1, None) and distributed.writes()
    assert not distributed.launched()


def test_mlx_launch_n_1_is_one_process(fresh_group, monkeypatch, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("\n")  # what mlx.launch -n 1 gives its rank
    monkeypatch.setenv("MLX_RANK", "0")
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    assert distributed.launched()
    g = distributed.current()
    assert (g.rank, g.size) == (0, 1) and distributed.writes()


def test_a_backend_that_does_not_start_is_an_error_not_one_process(fresh_group, monkeypatch, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[["127.0.0.1:1"], ')  # broken
    monkeypatch.setenv("MLX_RANK", "1")
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    with pytest.raises(UserError, match="distributed backend did not start"):
        distributed.current()


def test_collectives_of_one_process_pass_through(fresh_group):
    assert distributed.all_gather_bytes(b"abc", "x") == [b"abc"]
    assert distributed.broadcast_json({"a": [1]}, "x") == {"a": [1]}
    got = distributed.map_shard(5, 2, lambda shard: [("row", i) for i in shard.items], "x")
    assert got == [("row", i) for i in range(5)]  # not even serialised
    with pytest.raises(KeyError):  # the block's own exception, unchanged
        with distributed.together("x"):
            raise KeyError("k")
