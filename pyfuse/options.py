"""The one table of what pyfuse supports and its defaults.

The kernel's argument checks, the CLI's choices, the experiment specs'
validation, the C++ checks' error messages (``csrc/options.h`` is generated
from this file at build time: ``python pyfuse/options.py --cpp-header``) and
the docs all take their values from here. This module imports nothing from
pyfuse (and nothing outside the standard library), so that the build can
run it as a script.
"""

from __future__ import annotations

# MLX's affine quantization: the bit widths and group sizes the native
# kernels are instantiated for.
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# The scales' (and biases') dtypes, by MLX name.
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")

# Re-quantization policies (what happens to a group's grid when a delta is
# added): see docs/design.md, "Policies".
POLICIES = ("stock", "preserve", "stochastic", "calibrated")
# The policies that need no calibration data (``calibrated`` without a
# Hessian is plain nearest rounding on the kept grid): what the noise floor
# measures unless told otherwise.
DATA_FREE_POLICIES = ("stock", "preserve", "stochastic")
DEFAULT_POLICY = "stock"
DEFAULT_SEED = 0
# The policies that keep every group's grid (scale and bias), and what they
# do with a group whose fused values leave the grid's range: re-fit it
# (MLX's affine rule; the group loses its grid), clip its codes to the range
# (the grid is kept, the out-of-range weights saturate) or refuse the fuse.
GRID_KEEPING_POLICIES = ("preserve", "stochastic")
# The policies --on-range-overflow applies to: the grid-keeping ones and
# calibrated (a group whose nearest codes leave the range is re-fitted before
# the error feedback, or kept and clamped under clip).
RANGE_OVERFLOW_POLICIES = GRID_KEEPING_POLICIES + ("calibrated",)
RANGE_OVERFLOW_ACTIONS = ("refit", "clip", "error")
DEFAULT_RANGE_OVERFLOW = "refit"

# mlx_lm fuse's default --gguf-path (inside --save-path).
DEFAULT_GGUF_PATH = "ggml-model-f16.gguf"

# MLX's microscaling modes: (bits, group size) each. pyfuse reads and
# re-quantizes them the stock way only.
MX_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
QUANT_MODES = ("affine", *MX_MODES)

# The largest LoRA rank a spec may ask for: beyond it a rank is a typo (it
# would exceed the width of the matrices of today's largest models).
MAX_LORA_RANK = 4096

# The defaults of the kernel API (pyfuse.fuse_requant), as in mx.quantize.
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64


def mode_defaults(mode: str = "affine") -> tuple[int, int]:
    """(bits, group size) MLX uses for ``mode`` when a quantization leaves
    them null (``mlx_lm convert --quant-predicate mixed_*`` per-module
    entries; mlx-lm's QuantizedSwitchLinear then keeps ``group_size=None``)."""
    return MX_MODES.get(mode, (DEFAULT_BITS, DEFAULT_GROUP_SIZE))


def joined(values) -> str:
    """``2, 3, 4`` for error messages."""
    return ", ".join(map(str, values))


def cpp_header() -> str:
    """The C++ header with the same tables (X-macros, so that the kernel
    instantiations and the error messages come from one list)."""
    lines = [
        "// Generated from pyfuse/options.py at build time: do not edit.",
        "#pragma once",
        "",
        "#define PYFUSE_FOR_EACH_BITS(X) " + " ".join(f"X({b})" for b in SUPPORTED_BITS),
        "#define PYFUSE_FOR_EACH_GROUP_SIZE(X) " + " ".join(f"X({g})" for g in SUPPORTED_GROUP_SIZES),
        # Every (bits, group size) pair, bits outer: the kernel instantiations.
        "#define PYFUSE_FOR_EACH_BITS_GROUP_SIZE(X) "
        + " ".join(f"X({b}, {g})" for b in SUPPORTED_BITS for g in SUPPORTED_GROUP_SIZES),
        "#define PYFUSE_FOR_EACH_POLICY(X) " + " ".join(f"X({i}, \"{p}\")" for i, p in enumerate(POLICIES)),
        f'#define PYFUSE_SUPPORTED_BITS "{joined(SUPPORTED_BITS)}"',
        f'#define PYFUSE_SUPPORTED_GROUP_SIZES "{joined(SUPPORTED_GROUP_SIZES)}"',
        f'#define PYFUSE_SUPPORTED_POLICIES "{joined(POLICIES)}"',
        f'#define PYFUSE_SUPPORTED_DTYPES "{joined(SUPPORTED_DTYPES)}"',
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["--cpp-header"]:
        sys.exit("usage: python pyfuse/options.py --cpp-header [OUT]")
    text = cpp_header()
    if len(sys.argv) > 2:
        from pathlib import Path

        out = Path(sys.argv[2])
        if not out.exists() or out.read_text() != text:  # keep the mtime: no needless rebuilds
            out.write_text(text)
    else:
        sys.stdout.write(text)
