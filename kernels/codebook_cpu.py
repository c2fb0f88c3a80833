"""The codebook format on CPU, in torch: for a few activation rows, lookup tables instead
of the dequantized weight.

For each input group j and codebook m, T[j, m, k] = x_j . C_m[k] holds every codeword's
dot product with that slice of x ([G, M, K], computed once per row); then
y_o = s_o * sum_{j,m} T[j, m, code[o, j, m]] is a gather and a sum, out * G * M
additions, against out * in multiply-adds for a dense matmul (in / M = 4x fewer at 2x8,
8x at 1x16), and the weight is never expanded. The tables take in * M * K multiply-adds
and decoding the weight out * in * M copies, so the lookup runs when K < out (2x8 on
wide layers; not 1x16, whose tables are 8192 x 65536 wide) and for few rows; otherwise
the weight is decoded and multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms.codebook import CodebookWeight, decode, load_codes

LOOKUP_MAX_ROWS = 8  # rows up to which the lookup beats dequantize + matmul (kernels/bench.py)


@dataclass(frozen=True)
class CpuCodebookWeight:
    flat_codes: torch.Tensor  # [out, G * M] int64: code + m * K, the index into [G, M*K] tables per group
    books: torch.Tensor  # [M * K, g] float32
    scales: torch.Tensor  # [out] float32
    weight: CodebookWeight


def layout(cw: CodebookWeight, device: torch.device) -> CpuCodebookWeight:
    M, K, _, g = cw.codebooks.shape
    codes = load_codes(cw.codes, K.bit_length() - 1)  # [out, G, M]
    G = codes.shape[1]
    flat = codes + torch.arange(M) * K + (torch.arange(G) * M * K)[:, None]  # [out, G, M], into [G*M*K]
    return CpuCodebookWeight(
        flat_codes=flat.reshape(len(codes), -1).contiguous(),
        books=cw.codebooks.float().reshape(M * K, g),
        scales=cw.scales.float().reshape(-1),
        weight=cw,
    )


def linear(x: torch.Tensor, w: CpuCodebookWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])  # [rows, in]
    if len(x2) > LOOKUP_MAX_ROWS or w.books.shape[0] // w.weight.codebooks.shape[0] >= len(w.scales):
        return torch.nn.functional.linear(x, decode(w.weight, x.dtype), bias)
    g = w.books.shape[1]
    xg = x2.float().reshape(len(x2), -1, g)  # [rows, G, g]
    tables = (xg @ w.books.T).reshape(len(x2), -1)  # [rows, G * M*K]
    y = torch.stack([t[w.flat_codes].sum(dim=1) for t in tables]) * w.scales  # [rows, out]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
