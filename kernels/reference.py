"""Torch reference for every format: dequantize, then matmul."""

from __future__ import annotations

import torch

from algorithms import floatq, hadamard
from algorithms.codebook import CodebookWeight, decode
from algorithms.float_activations import quantize_activations
from algorithms.floatq import FloatWeight
from algorithms.packing import unpack
from algorithms.quip import QuipWeight, rotated
from algorithms.quip import decode as decode_quip
from algorithms.types import QuantizedWeight
from algorithms.vector import VectorWeight
from algorithms.vector import decode as decode_vectors

Weight = QuantizedWeight | CodebookWeight | VectorWeight | QuipWeight | FloatWeight


def dequantize(qw: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in]. Uniform: W = scale[g(j)] * (q[j] - zero[g(j)]) with
    g(j) = g_idx[j], or j // group_size when there is no g_idx. Codebook: see
    algorithms.codebook.decode. Vector: algorithms.vector.decode. QuIP: algorithms.quip.decode.
    Float (fp8, int8, nvfp4): algorithms.floatq.dequantize."""
    if isinstance(qw, FloatWeight):
        return floatq.dequantize(qw, dtype)
    if isinstance(qw, QuipWeight):
        return decode_quip(qw, dtype)
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


def linear(x: torch.Tensor, qw: Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] through the dequantized weight (QuIP: through its rotations;
    float schemes with activation quantization: of the quantized activations)."""
    if isinstance(qw, QuipWeight):
        return incoherent_linear(x, qw, bias)
    if isinstance(qw, FloatWeight) and qw.scheme.activations is not None:
        x = quantize_activations(x, qw.scheme.activations, qw.activation_scale)
    return torch.nn.functional.linear(x, dequantize(qw, x.dtype), bias)


def incoherent_linear(x: torch.Tensor, qw: QuipWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = su * Had_out^T(Q (Had_in (sv * x))) + bias: fast Walsh-Hadamard transforms of the
    activations on both sides of the rotated weight Q, decoded from its codes."""
    z = hadamard.apply(x * qw.sv.to(x.dtype))  # [..., in]
    y = torch.nn.functional.linear(z, rotated(qw, x.dtype))  # [..., out]
    y = hadamard.apply(y, transpose=True) * qw.su.to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)
