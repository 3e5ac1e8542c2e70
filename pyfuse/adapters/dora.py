"""DoRA layers where mlx-lm's refuse or mis-size, in mlx-lm's adapter format.

* :class:`DoRALinear`: mlx-lm's ``DoRALinear`` (same parameters, forward
  and ``fuse``), sized right for every bits: mlx-lm sizes a quantized layer
  as ``packed_width * (32 // bits)`` (10 instead of 10.67 words per input
  for 3 bits), which breaks 3, 5 and 6-bit layers.
* :class:`DoRASwitchLinear`: DoRA on MoE experts (``SwitchLinear`` /
  ``QuantizedSwitchLinear``), which mlx-lm refuses. Parameters as mlx-lm's
  ``LoRASwitchLinear`` plus the magnitude: ``lora_a [E, r, in]``, ``lora_b
  [E, out, r]``, ``m [E, out]``. Each expert is a DoRA linear layer: its
  output rows are rescaled by ``m / ||W + scale * B @ A||`` (the norm
  without gradient, as mlx-lm's DoRA and the DoRA paper). The row norms are
  computed without dequantizing the experts: ``||W + sBA||^2 = ||W||^2 +
  2s <B, W A^T> + s^2 <B, B (A A^T)>`` per row, ``||W||^2`` once at
  creation, ``W A^T`` by a quantized matmul.

``m`` starts as the float32 row norm of the dequantized weight (mlx-lm's
``set_linear``), so an untrained layer computes what the base layer does.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.dora import DoRALinear as MlxDoRALinear

__all__ = ["DoRALinear", "DoRASwitchLinear", "dequantized_weight"]


def dequantized_weight(layer) -> mx.array:
    """The float weight of a (Quantized)Linear / (Quantized)SwitchLinear."""
    if "scales" not in layer:
        return layer.weight
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                         bits=layer.bits, mode=layer.mode)


class DoRALinear(MlxDoRALinear):
    """mlx-lm's DoRALinear with the input size of a quantized layer computed
    exactly (``packed_width * 32 / bits``)."""

    @staticmethod
    def from_base(linear, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        output_dims, input_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            input_dims = input_dims * 32 // linear.bits
        layer = DoRALinear(input_dims=input_dims, output_dims=output_dims, r=r, dropout=dropout, scale=scale)
        layer.set_linear(linear)
        return layer


class DoRASwitchLinear(nn.Module):
    @staticmethod
    def from_base(linear, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        layer = DoRASwitchLinear(linear.input_dims, linear.output_dims, linear.num_experts, r=r, dropout=dropout,
                                 scale=scale)
        layer.set_linear(linear)
        return layer

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, r: int = 8, dropout: float = 0.0,
                 scale: float = 20.0, bias: bool = False):
        super().__init__()
        self.set_linear(SwitchLinear(input_dims, output_dims, num_experts, bias=bias))
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(num_experts, r, input_dims))
        self.lora_b = mx.zeros(shape=(num_experts, output_dims, r))
        self.num_experts = num_experts

    def set_linear(self, linear) -> None:
        """Wrap ``linear`` and start ``m`` at its row norms (float32)."""
        self.linear = linear
        w = dequantized_weight(linear).astype(mx.float32)
        norm2 = (w * w).sum(axis=-1)
        # in the module's state (compiled steps capture it), not a parameter
        # (a leading underscore): neither trained nor saved
        self._weight_norm2 = norm2
        self.m = mx.sqrt(norm2)

    def _w_at(self) -> mx.array:
        """``W @ A^T`` per expert ``[E, out, r]`` (quantized matmul, no dequantize)."""
        lin, a = self.linear, self.lora_a.astype(mx.float32)
        if isinstance(lin, QuantizedSwitchLinear):
            at = mx.quantized_matmul(a, lin.weight, lin.scales, lin.get("biases"), transpose=True,
                                     group_size=lin.group_size, bits=lin.bits, mode=lin.mode)  # [E, r, out]
            return at.swapaxes(-1, -2)
        return lin.weight.astype(mx.float32) @ a.swapaxes(-1, -2)

    def adapted_norm(self) -> mx.array:
        """``||W + scale * B @ A||`` per expert row ``[E, out]`` (float32)."""
        a, b = self.lora_a.astype(mx.float32), self.lora_b.astype(mx.float32)
        cross = (b * self._w_at()).sum(axis=-1)
        gram = a @ a.swapaxes(-1, -2)  # [E, r, r]
        quad = (b * (b @ gram)).sum(axis=-1)
        norm2 = self._weight_norm2 + 2 * self.scale * cross + self.scale ** 2 * quad
        return mx.sqrt(mx.maximum(norm2, 0))

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        bias = self.linear["bias"] if "bias" in self.linear else None
        if bias is not None:  # the rescale applies to W x, not to the bias
            y = y - mx.expand_dims(bias[indices], -2)
        z = mx.gather_mm(self.dropout(x), self.lora_a.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        out = y + (self.scale * z).astype(x.dtype)
        denom = mx.stop_gradient(self.adapted_norm())
        out = mx.expand_dims((self.m / denom)[indices], -2).astype(x.dtype) * out
        if bias is not None:
            out = out + mx.expand_dims(bias[indices], -2)
        return out

    def fuse(self, dequantize: bool = False):
        """The fused ``SwitchLinear`` (re-quantized as the base unless
        ``dequantize``), as mlx-lm's DoRALinear.fuse does per expert."""
        lin = self.linear
        weight = dequantized_weight(lin)
        num_experts, output_dims, input_dims = weight.shape
        fused = SwitchLinear(input_dims, output_dims, num_experts, bias="bias" in lin)
        weight = weight + ((self.scale * self.lora_b) @ self.lora_a).astype(weight.dtype)
        norm_scale = self.m / mx.linalg.norm(weight, axis=-1)
        fused.weight = norm_scale[..., None] * weight
        if "bias" in lin:
            fused.bias = lin.bias
        if isinstance(lin, QuantizedSwitchLinear) and not dequantize:
            fused = fused.to_quantized(group_size=lin.group_size, bits=lin.bits, mode=lin.mode)
        return fused
