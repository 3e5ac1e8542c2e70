"""pyfuse: fuse LoRA adapters into quantized (MoE) MLX models without losing
them to re-quantization noise, and run the experiments that tell the two
apart."""

from .ops import fuse_requant, native_available
from .reference import fuse_requant_reference

__version__ = "0.1.0"

__all__ = ["fuse_requant", "fuse_requant_reference", "native_available", "__version__"]
