"""Round-to-nearest: the baseline every Hessian-based method must beat."""

from __future__ import annotations

import torch

from algorithms import grid
from algorithms.packing import pack
from algorithms.types import QuantizedWeight, UniformScheme


def assemble(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    scheme: UniformScheme,
    g_idx: torch.Tensor | None = None,
) -> QuantizedWeight:
    """codes [out, in], scales/zeros [out, groups], g_idx [in] or None -> the packed QuantizedWeight."""
    in_features = codes.shape[1]
    return QuantizedWeight(
        qweight=pack(codes, scheme.bits),
        scales=scales.to(torch.float16).contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        bits=scheme.bits,
        group_size=scheme.group_width(in_features),
        in_features=in_features,
        g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous(),
    )


def rtn(W: torch.Tensor, scheme: UniformScheme) -> QuantizedWeight:
    """Quantize W [out, in] group by group to the nearest grid point."""
    out, n = W.shape
    groups, width = scheme.groups(n), scheme.group_width(n)
    Wg = W.float().reshape(out * groups, width)  # [out*groups, width]
    scale, zero = grid.find_params(Wg, scheme)  # [out*groups]
    codes = grid.quantize(Wg, scale[:, None], zero[:, None], scheme.maxq)  # [out*groups, width]
    return assemble(codes.reshape(out, n), scale.reshape(out, groups), zero.reshape(out, groups), scheme)
