"""The uniform grid: choose scale and zero for a group, round onto it, and back."""

from __future__ import annotations

import torch

from algorithms.types import UniformScheme

# the clipping search of GPTQ's reference quantizer: ranges shrunk by 1%, 2%, ... up to
# 80% of min-max, keeping per row the one with the least sum |w - q(w)|^2.4
MSE_STEPS, MSE_MAX_SHRINK, MSE_NORM = 100, 0.8, 2.4


def grid_for(xmin: torch.Tensor, xmax: torch.Tensor, scheme: UniformScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero [rows] of the grid spanning [xmin, xmax] [rows] (which contain 0).

    A symmetric grid is centred on zero = 2**(bits-1). The scale is rounded to float16
    here, the dtype it is stored in, so that codes are computed against exactly the
    stored scale."""
    maxq = scheme.maxq
    if scheme.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
    scale = scale.to(xmin.dtype)
    centre = torch.full_like(scale, (maxq + 1) // 2)
    zero = centre if scheme.sym else torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def find_params(w: torch.Tensor, scheme: UniformScheme, *, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid per row of w [rows, cols] -> (scale [rows], zero [rows]).

    As in GPTQ's reference quantizer: the min-max range, always containing 0; with `mse`,
    the shrunk range (MSE_STEPS above) whose rounding error is least, row by row."""
    xmin = w.min(dim=1).values.clamp(max=0)  # [rows]
    xmax = w.max(dim=1).values.clamp(min=0)  # [rows]
    scale, zero = grid_for(xmin, xmax, scheme)
    if not mse:
        return scale, zero
    best = rounding_error(w, scale, zero, scheme)  # [rows]
    for step in range(1, int(MSE_MAX_SHRINK * MSE_STEPS)):
        shrink = 1 - step / MSE_STEPS
        s, z = grid_for(shrink * xmin, shrink * xmax, scheme)
        err = rounding_error(w, s, z, scheme)  # [rows]
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: UniformScheme) -> torch.Tensor:
    """sum over each row of |w - q(w)|^MSE_NORM on the grid (scale, zero) [rows] -> [rows]."""
    s, z = scale[:, None], zero[:, None]
    return (dequantize(quantize(w, s, z, scheme.maxq), s, z) - w).abs_().pow_(MSE_NORM).sum(dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of w on the grid; scale and zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)
