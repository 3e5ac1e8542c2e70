"""Shared inputs of the kernel benchmarks: one SwitchLinear tensor at the
real expert shape of a Qwen3.5-35B-A3B down_proj (128 x 2048 x 512), with
realistic bf16 weights and a rank-2 LoRA."""

import mlx.core as mx
import numpy as np

EXPERTS, OUT, IN, RANK = 128, 2048, 512, 2


def expert_tensor(group_size=64, bits=3, dtype=mx.bfloat16, experts=EXPERTS, seed=0):
    """(w, scales, biases, a, b), evaluated."""
    mx.random.seed(seed)
    weights = (mx.random.normal((experts, OUT, IN)) * 0.02).astype(dtype)
    w, s, b = mx.quantize(weights, group_size=group_size, bits=bits)
    a = mx.random.normal((experts, RANK, IN)) * 0.01
    bb = mx.random.normal((experts, OUT, RANK)) * 0.01
    mx.eval(w, s, b, a, bb)
    return w, s, b, a, bb


def mlx_stock_fuse(w, s, b, a, bb, group_size, bits, scale=1.0):
    """What `mlx_lm fuse` does to the tensor (LoRASwitchLinear.fuse), in MLX ops."""
    fused = mx.dequantize(w, s, b, group_size=group_size, bits=bits)
    fused = fused + ((scale * bb) @ a).astype(fused.dtype)
    out = mx.quantize(fused, group_size=group_size, bits=bits)
    mx.eval(out)
    return out


def memcpy_bound(w, s, b):
    """A copy of the bytes the fuse reads and writes (w, scales, biases): the
    memory-bandwidth floor of any fuse."""
    sources = [np.asarray(x.view(mx.uint8)) if x.dtype == mx.bfloat16 else np.asarray(x) for x in (w, s, b)]
    targets = [np.empty_like(x) for x in sources]

    def copy():
        for src, dst in zip(sources, targets):
            np.copyto(dst, src)

    return copy
