"""Loads the compiled extension ``pyfuse._ext`` once, or explains in one line
why it cannot and lets callers fall back to the pure-MLX reference."""

from __future__ import annotations

import warnings

import mlx.core as mx  # loads libmlx first: the extension links against it

# The MLX version the extension must have been compiled against (C++ ABI).
REQUIRED_MLX = "0.32.4"

ext = None
unavailable_reason: str | None = None

try:
    from .. import _ext as ext  # type: ignore[attr-defined]
except ImportError as err:  # not built, or built for another Python/MLX
    unavailable_reason = f"the native extension pyfuse._ext is not importable ({err})"
else:
    built_with = getattr(ext, "mlx_version", "unknown")
    if built_with != mx.__version__:
        unavailable_reason = (
            f"the native extension was built against mlx {built_with} but mlx "
            f"{mx.__version__} is installed; rebuild with `pip install -e .`"
        )
        ext = None


def warn_fallback() -> None:
    """Warn (once per process) that the slow reference path is in use."""
    if unavailable_reason and not getattr(warn_fallback, "done", False):
        warn_fallback.done = True
        warnings.warn(
            f"pyfuse: {unavailable_reason}; using the pure-MLX reference path (slow)",
            RuntimeWarning,
            stacklevel=3,
        )
