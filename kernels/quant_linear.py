"""QuantLinear: an nn.Linear replacement that stores a QuantizedWeight and runs it
through a low-bit kernel (today the torch reference)."""

from __future__ import annotations

import torch
from torch import nn

from algorithms.types import QuantizedWeight
from kernels import reference


class QuantLinear(nn.Module):
    """Buffers `qweight`, `scales`, `qzeros` (and `g_idx`, `bias`) as in the native artifact."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.bits, self.group_size = qw.bits, qw.group_size
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("qzeros", qw.zeros)
        self.register_buffer("g_idx", qw.g_idx)
        self.register_buffer("bias", bias)

    @property
    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(
            qweight=self.qweight,
            scales=self.scales,
            zeros=self.qzeros,
            bits=self.bits,
            group_size=self.group_size,
            in_features=self.in_features,
            g_idx=self.g_idx,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.linear(x, self.quantized, self.bias)

    def dense(self) -> nn.Linear:
        """An nn.Linear holding the dequantized weight: the same outputs as this layer's
        reference path, for running one layer over many batches on CPU."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(reference.dequantize(self.quantized), requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.float(), requires_grad=False)
        return layer.eval()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"
