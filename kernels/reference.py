"""Torch reference for the group-wise uniform format: dequantize, then matmul."""

from __future__ import annotations

import torch

from algorithms.packing import unpack
from algorithms.types import QuantizedWeight


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [out, in] = scale[g(j)] * (q[j] - zero[g(j)]) with g(j) = g_idx[j], or
    j // group_size when there is no g_idx."""
    codes = unpack(qw.qweight, qw.bits).to(dtype)  # [out, in]
    if qw.g_idx is None:
        scales = qw.scales.to(dtype).repeat_interleave(qw.group_size, dim=1)  # [out, in]
        zeros = qw.zeros.to(dtype).repeat_interleave(qw.group_size, dim=1)  # [out, in]
    else:
        g = qw.g_idx.long()  # [in]
        scales, zeros = qw.scales.to(dtype)[:, g], qw.zeros.to(dtype)[:, g]  # [out, in]
    return scales * (codes - zeros)


def linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] through the dequantized weight."""
    return torch.nn.functional.linear(x, dequantize(qw, x.dtype), bias)
