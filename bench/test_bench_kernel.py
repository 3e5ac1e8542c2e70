"""pytest-benchmark: the native stock fuse of one 128 x 2048 x 512 expert
tensor (bf16, 3-bit g64, rank 2) against the pure-MLX stock path and a
memcpy of the same bytes, measured in the same run.

    python -m pytest bench/test_bench_kernel.py --benchmark-columns=min,mean,rounds
"""

import mlx.core as mx
import pytest

import pyfuse
from kernel_cases import expert_tensor, memcpy_bound, mlx_stock_fuse


@pytest.fixture(scope="module")
def tensor():
    return expert_tensor(group_size=64, bits=3)


def test_native_stock(benchmark, tensor):
    assert pyfuse.native_available(), "the native extension is not built"

    def run():
        mx.eval(pyfuse.fuse_requant(*tensor, group_size=64, bits=3, policy="stock"))

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def test_native_preserve(benchmark, tensor):
    def run():
        mx.eval(pyfuse.fuse_requant(*tensor, group_size=64, bits=3, policy="preserve"))

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


def test_mlx_stock_path(benchmark, tensor):
    benchmark.pedantic(lambda: mlx_stock_fuse(*tensor, group_size=64, bits=3), rounds=2, warmup_rounds=0)


def test_memcpy_same_bytes(benchmark, tensor):
    benchmark.pedantic(memcpy_bound(*tensor[:3]), rounds=10, warmup_rounds=1)
