"""Torch reference for every format: dequantize, then matmul."""

from __future__ import annotations

import torch

from algorithms.codebook import CodebookWeight, decode
from algorithms.packing import unpack
from algorithms.types import QuantizedWeight
from algorithms.vector import VectorWeight
from algorithms.vector import decode as decode_vectors


def dequantize(qw: QuantizedWeight | CodebookWeight | VectorWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in]. Uniform: W = scale[g(j)] * (q[j] - zero[g(j)]) with
    g(j) = g_idx[j], or j // group_size when there is no g_idx. Codebook: see
    algorithms.codebook.decode. Vector: algorithms.vector.decode."""
    if isinstance(qw, VectorWeight):
        return decode_vectors(qw, dtype)
    if isinstance(qw, CodebookWeight):
        return decode(qw, dtype)
    codes = unpack(qw.qweight, qw.bits).to(dtype)  # [out, in]
    if qw.g_idx is None:
        scales = qw.scales.to(dtype).repeat_interleave(qw.group_size, dim=1)  # [out, in]
        zeros = qw.zeros.to(dtype).repeat_interleave(qw.group_size, dim=1)  # [out, in]
    else:
        g = qw.g_idx.long()  # [in]
        scales, zeros = qw.scales.to(dtype)[:, g], qw.zeros.to(dtype)[:, g]  # [out, in]
    return scales * (codes - zeros)


def linear(
    x: torch.Tensor, qw: QuantizedWeight | CodebookWeight | VectorWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., in] -> [..., out] through the dequantized weight."""
    return torch.nn.functional.linear(x, dequantize(qw, x.dtype), bias)
