"""The op level: :func:`fuse_requant` (native kernels, or the pure-MLX
reference when the extension cannot load) and the fidelity figures of one
tensor."""

from .ops import fuse_requant, native_available
from .reference import fuse_requant_reference
from .refine import refine_grid

__all__ = ["fuse_requant", "fuse_requant_reference", "refine_grid", "native_available"]
