"""The uniform grid: choose scale and zero for a group, round onto it, and back."""

from __future__ import annotations

import torch

from algorithms.types import UniformScheme


def find_params(w: torch.Tensor, scheme: UniformScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid per row of w [out, cols] -> (scale [out], zero [out]).

    As in GPTQ's reference quantizer: the range always contains 0; a symmetric grid is
    centred on zero = 2**(bits-1). The scale is rounded to float16 here, the dtype it is
    stored in, so that codes are computed against exactly the stored scale.
    """
    maxq = scheme.maxq
    xmin = w.min(dim=1).values.clamp(max=0)  # [out]
    xmax = w.max(dim=1).values.clamp(min=0)  # [out]
    if scheme.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
    scale = scale.to(w.dtype)
    centre = torch.full_like(scale, (maxq + 1) // 2)
    zero = centre if scheme.sym else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of w on the grid; scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)
