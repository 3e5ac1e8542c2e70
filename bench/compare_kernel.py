"""Native fuse vs the pure-MLX stock path vs memcpy, at the real expert
shape (128 x 2048 x 512, bf16, rank 2), for group sizes 32/64/128 and
3/4/8 bits, all measured in this run. Prints a Markdown table of times and
ratios (the README quotes it).

    python bench/compare_kernel.py [--group-sizes 32,64,128] [--bits 3,4,8] [--repeats 3]
                                   [--cpu-kernels auto|baseline|avx2|avx512]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
import pyfuse  # noqa: E402
from pyfuse.kernel import native as _native  # noqa: E402
from kernel_cases import expert_tensor, memcpy_bound, mlx_stock_fuse  # noqa: E402


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group-sizes", default="32,64,128")
    parser.add_argument("--bits", default="3,4,8")
    parser.add_argument("--repeats", type=int, default=3, help="best of N for the native and memcpy runs")
    parser.add_argument("--mlx-repeats", type=int, default=2, help="best of N for the (slow) MLX path")
    parser.add_argument("--cpu-kernels", default="auto",
                        help="the CPU kernel build to measure (default: the widest this processor runs)")
    args = parser.parse_args()
    if not pyfuse.native_available():
        sys.exit("compare_kernel: the native extension is not built")
    try:
        _native.ext.set_cpu_kernels(args.cpu_kernels)
    except ValueError as err:
        sys.exit(f"compare_kernel: {err}")
    kernels = _native.ext.cpu_kernels()
    print(f"CPU kernel build: {kernels['active']} (available: {', '.join(kernels['available'])}); "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the start\n")

    print("| group size | bits | MLX stock path | pyfuse stock | pyfuse preserve | memcpy | speed-up (stock) | x memcpy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for gs in map(int, args.group_sizes.split(",")):
        for bits in map(int, args.bits.split(",")):
            t = expert_tensor(group_size=gs, bits=bits)

            def native(policy):
                return lambda: mx.eval(pyfuse.fuse_requant(*t, group_size=gs, bits=bits, policy=policy))

            native("stock")()  # warm-up
            stock = best_of(native("stock"), args.repeats)
            preserve = best_of(native("preserve"), args.repeats)
            mlx_path = best_of(lambda: mlx_stock_fuse(*t, group_size=gs, bits=bits), args.mlx_repeats)
            copy = best_of(memcpy_bound(*t[:3]), args.repeats * 3)
            print(f"| {gs} | {bits} | {mlx_path:.3f} s | {stock * 1e3:.0f} ms | {preserve * 1e3:.0f} ms | "
                  f"{copy * 1e3:.1f} ms | {mlx_path / stock:.1f}x | {stock / copy:.1f}x |", flush=True)
            del t


if __name__ == "__main__":
    main()
