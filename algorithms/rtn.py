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


def rtn(W: torch.Tensor, scheme: UniformScheme, *, mse: bool = False) -> QuantizedWeight:
    """Quantize W [out, in] group by group to the nearest grid point (of a min-max grid, or
    with `mse` of the clipped grid with the least rounding error)."""
    out, n = W.shape
    groups, width = scheme.groups(n), scheme.group_width(n)
    Wg = in_groups(W.float(), groups, width)  # [out*groups, width]
    scale, zero = grid.find_params(Wg, scheme, mse=mse)  # [out*groups]
    codes = grid.quantize(Wg, scale[:, None], zero[:, None], scheme.maxq)  # [out*groups, width]
    codes = codes.reshape(out, groups * width)[:, :n]  # [out, in]
    return assemble(codes, scale.reshape(out, groups), zero.reshape(out, groups), scheme, partial_g_idx(n, width))


def in_groups(W: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """W [out, in] as rows of one group each, [out*groups, width]; a partial last group is
    padded with zeros, which leave its grid unchanged (every grid's range contains 0)."""
    out, n = W.shape
    padded = torch.nn.functional.pad(W, (0, groups * width - n))  # [out, groups*width]
    return padded.reshape(out * groups, width)


def partial_g_idx(n: int, width: int) -> torch.Tensor | None:
    """The g_idx a weight with a partial last group stores (None when groups divide n)."""
    return torch.arange(n) // width if n % width else None
