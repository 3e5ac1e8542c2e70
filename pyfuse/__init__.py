"""pyfuse: fuse LoRA adapters into quantized (MoE) MLX models without losing
them to re-quantization noise, and run the experiments that tell the two
apart."""

from .kernel.ops import fuse_requant, native_available
from .kernel.reference import fuse_requant_reference
from .kernel.refine import refine_grid


def __getattr__(name):
    # The model-level fuse pulls in mlx-lm and safetensors: imported on first use.
    if name in ("fuse_model", "FuseResult"):
        from .fuse import api as fuse

        return getattr(fuse, name)
    raise AttributeError(f"module 'pyfuse' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = ["fuse_requant", "fuse_requant_reference", "refine_grid", "fuse_model", "FuseResult", "native_available",
           "__version__"]
