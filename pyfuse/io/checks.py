"""Checks of the numbers pyfuse reads and writes: finite adapter tensors and
config numbers, finite fused tensors before they are written, and a model's
stated quantization (config.json) against its stored tensor shapes.

A NaN or an overflow fused silently would write a model that looks fine and
answers garbage; a config.json that misstates the bits would be copied into
the output as is. Every check raises a one-line UserError naming the file,
the tensor or field, and what is accepted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import UserError
from ..options import MX_MODES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, joined

# float32's largest finite value: a config number beyond it overflows in the fuse.
FLOAT32_MAX = 3.4028234663852886e38


def finite_number(value: Any, what: str, *, integer: bool = False, positive: bool = False):
    """``value`` as a finite number (an int with ``integer``; > 0 with
    ``positive``), or a UserError naming ``what``."""
    if isinstance(value, bool) or value is None:
        raise UserError(f"{what} must be a number, got {value!r}")
    if integer:
        if not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
            raise UserError(f"{what} must be an integer, got {value!r}")
        value = int(value)
    else:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{what} must be a number, got {value!r}") from None
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise UserError(f"{what} must be a finite number (float32 range), got {value!r}")
    if positive and value <= 0:
        raise UserError(f"{what} must be > 0, got {value!r}")
    return value


def nonfinite_count(arr: mx.array) -> int:
    """How many entries of a floating-point array are NaN or infinite."""
    if not mx.issubdtype(arr.dtype, mx.floating):
        return 0
    return int(mx.sum(~mx.isfinite(arr)).item())


def check_finite(arr: mx.array, what: str, hint: str = "") -> None:
    """UserError when ``arr`` holds a NaN or an infinity."""
    bad = nonfinite_count(arr)
    if bad:
        raise UserError(f"{what}: {bad} of {arr.size} values are NaN or infinite{hint}")


def stated_quantization_problems(config_path: Path, default: dict, overrides: dict,
                                 tensors: dict) -> list[str]:
    """What is wrong between config.json's quantization (``default`` and
    per-module ``overrides``) and the stored ``tensors`` (name -> info with
    ``.shape``/``.dtype``): unsupported bits or group size, or a reading
    that does not fit a module's weight and scales."""
    problems = []
    for name in sorted(tensors):
        if not name.endswith(".scales"):
            continue
        path = name[: -len(".scales")]
        w, s = tensors.get(f"{path}.weight"), tensors[name]
        stated = overrides.get(path) or default
        if w is None or not stated or stated.get("mode", "affine") in MX_MODES or s.dtype == "U8":
            continue
        bits, gs = stated.get("bits"), stated.get("group_size")
        if bits is None or gs is None:  # nothing stated: read from the shapes (ModelDir.quant_params)
            continue
        where = f"{config_path}: quantization of {path}" if path in overrides else f"{config_path}: quantization"
        if bits not in SUPPORTED_BITS or gs not in SUPPORTED_GROUP_SIZES:
            problems.append(f"{where} says bits {bits}, group size {gs}; supported: bits "
                            f"{joined(SUPPORTED_BITS)}, group sizes {joined(SUPPORTED_GROUP_SIZES)}")
            break
        packed, groups = w.shape[-1], s.shape[-1]
        if (packed * 32) % bits or packed * 32 // bits != groups * gs:
            fits = [f"{b}-bit g{packed * 32 // b // groups}" for b in SUPPORTED_BITS
                    if (packed * 32) % b == 0 and (packed * 32 // b) % groups == 0
                    and packed * 32 // b // groups in SUPPORTED_GROUP_SIZES]
            problems.append(f"{where} says {bits}-bit group size {gs}, but {path}'s stored weight "
                            f"{list(w.shape)} and scales {list(s.shape)} do not fit that"
                            + (f" (they fit {', '.join(fits)})" if fits else ""))
            break
    return problems
