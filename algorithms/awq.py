"""AWQ: activation-aware weight quantization (Lin et al., 2023, arXiv:2306.00978), as the
authors' AutoAWQ runs it, with the layer's input Hessian standing in for its inputs.

1. Scale search, per group of linears sharing an input x: for alpha on a grid of n_grid
   points in [0, 1), the per-input-channel scale
       s = x_mean^alpha / w_mean^(1 - alpha)      (duo scaling; else x_mean^alpha)
   normalised by sqrt(max s * min s), where x_mean is the mean |x| of each input channel
   and w_mean the mean over rows of |w| / max |w| of its quantization group. The group's
   weights become W diag(s), the op before them absorbs diag(s)^-1 (a norm's weight or
   the rows of the linear before), and alpha is chosen to minimise the group's output
   error sum_l ||W_l x - Q(W_l diag(s)) diag(s)^-1 x||^2 = sum_l tr(D_l H D_l^T) with
   D_l = W_l - Q(W_l diag(s)) diag(s)^-1. No scaling at all (s = 1, plain round-to-nearest)
   is a candidate too, so the search never does worse than it on this loss (AutoAWQ's
   grid alone does not hold it: with duo scaling, alpha = 0 is s = 1 / w_mean). AutoAWQ measures the error at the output
   of the whole attention or MLP module on the calibration tokens; here it is measured at
   the linears' outputs through H = sum x x^T, which the pipeline has already summed.
2. Clipping search, per row and quantization group of the scaled weight: the range
   [-r max|w|, r max|w|] for r from 1 down to 1 - max_shrink, keeping the r whose output
   error d H_gg d^T (H_gg: the group's diagonal block of H, as AutoAWQ's per-group
   outputs) is least; the weights are clamped to it. Not applied to the linears whose
   outputs make attention scores (q, k), as in AutoAWQ.
3. Round-to-nearest on the scheme's grid (AWQ's default: 4 bits, groups of 128, with zero
   points).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms import grid
from algorithms.rtn import in_groups, rtn
from algorithms.types import QuantizedWeight, UniformScheme


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., (n_grid - 1)/n_grid}
    duo_scaling: bool = True  # s from both activation and weight magnitudes
    clip: bool = True  # the clipping search of step 2
    clip_grid: int = 20  # shrink ratios r = 1 - k / clip_grid ...
    max_shrink: float = 0.5  # ... down to 1 - max_shrink
    search_rows: int = 2048  # rows of a group's weights on which each alpha's loss is measured

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ValueError("n_grid and clip_grid must be >= 1")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


@dataclass(frozen=True)
class Search:
    """The chosen scale s [in], its alpha (None: no scaling, s = 1, was best), and the
    group's loss at it relative to no scaling."""

    scale: torch.Tensor
    alpha: float | None
    loss_ratio: float


def fake_quantize(W: torch.Tensor, scheme: UniformScheme) -> torch.Tensor:
    """W [out, in] rounded to its min-max grid, group by group, and dequantized."""
    out, n = W.shape
    groups, width = scheme.groups(n), scheme.group_width(n)
    Wg = in_groups(W, groups, width)  # [out*groups, width]
    scale, zero = grid.find_params(Wg, scheme)  # [out*groups]
    q = grid.quantize(Wg, scale[:, None], zero[:, None], scheme.maxq)
    return grid.dequantize(q, scale[:, None], zero[:, None]).reshape(out, groups * width)[:, :n]


def weight_mean(W: torch.Tensor, scheme: UniformScheme) -> torch.Tensor:
    """w_mean [in]: the mean over rows of |w| / max |w| of w's quantization group."""
    out, n = W.shape
    groups, width = scheme.groups(n), scheme.group_width(n)
    Wg = in_groups(W.abs(), groups, width)  # [out*groups, width]
    Wg = Wg / Wg.amax(dim=1, keepdim=True).clamp(min=1e-12)
    return Wg.reshape(out, groups * width)[:, :n].mean(dim=0)


def output_error(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T), D = W - What: the squared output error over the calibration tokens."""
    D = W - What  # [rows, in]
    return float(((D @ H) * D).sum())


def search_scale(
    Ws: list[torch.Tensor], H: torch.Tensor, x_mean: torch.Tensor, scheme: UniformScheme, config: AWQConfig
) -> Search:
    """Step 1 for one group: its linears' weights Ws (each [out_l, in]), the Hessian of
    their shared input H [in, in] (per token) and x_mean [in]."""
    W = torch.cat([w.float() for w in Ws])  # [out, in]
    W = W[:: max(1, W.shape[0] // config.search_rows)]  # [rows, in]: the loss is a sum over rows
    H, x_mean = H.float(), x_mean.float()
    w_mean = weight_mean(W, scheme)  # [in]
    base = output_error(W, fake_quantize(W, scheme), H)
    best: tuple[float, float | None, torch.Tensor] = (base, None, torch.ones_like(x_mean))
    for k in range(config.n_grid):
        alpha = k / config.n_grid
        if config.duo_scaling:
            s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)  # [in]
        else:
            s = x_mean.pow(alpha).clamp(min=1e-4)  # [in]
        s = s / (s.max() * s.min()).sqrt()
        loss = output_error(W, fake_quantize(W * s, scheme) / s, H)
        if loss < best[0]:
            best = (loss, alpha, s)
    loss, alpha, s = best
    return Search(scale=s, alpha=alpha, loss_ratio=loss / base if base else 1.0)


def clip(W: torch.Tensor, H: torch.Tensor, scheme: UniformScheme, config: AWQConfig) -> torch.Tensor:
    """Step 2: W [out, in] clamped, per row and group, to the range of least output error."""
    out, n = W.shape
    groups, width = scheme.groups(n), scheme.group_width(n)
    Wg = in_groups(W.float(), groups, width).reshape(out, groups, width)  # [out, groups, width]
    Hp = torch.nn.functional.pad(H.float(), (0, groups * width - n, 0, groups * width - n))
    Hb = torch.stack([Hp[g * width : (g + 1) * width, g * width : (g + 1) * width] for g in range(groups)])
    wmin = Wg.amin(dim=2).clamp(max=0)  # [out, groups]
    wmax = Wg.amax(dim=2).clamp(min=0)  # [out, groups]
    amax = torch.maximum(-wmin, wmax)  # [out, groups]
    best_err = torch.full((out, groups), float("inf"))
    best_r = torch.ones(out, groups)
    steps = max(1, int(config.max_shrink * config.clip_grid))
    for k in range(steps):
        r = 1 - k / config.clip_grid
        lo, hi = torch.maximum(wmin, -r * amax), torch.minimum(wmax, r * amax)  # [out, groups]
        scale, zero = grid.grid_for(lo.reshape(-1), hi.reshape(-1), scheme)  # [out*groups]
        Wc = torch.minimum(torch.maximum(Wg, lo[..., None]), hi[..., None]).reshape(-1, width)
        q = grid.quantize(Wc, scale[:, None], zero[:, None], scheme.maxq)
        D = (grid.dequantize(q, scale[:, None], zero[:, None]) - Wg.reshape(-1, width)).reshape(out, groups, width)
        err = torch.einsum("ogi,gij,ogj->og", D, Hb, D)  # [out, groups]
        better = err < best_err
        best_err, best_r = torch.where(better, err, best_err), torch.where(better, r, best_r)
    bound = best_r * amax  # [out, groups]
    Wc = torch.minimum(torch.maximum(Wg, -bound[..., None]), bound[..., None])  # [out, groups, width]
    return Wc.reshape(out, groups * width)[:, :n].to(W.dtype)


def awq(
    W: torch.Tensor, H: torch.Tensor, scheme: UniformScheme, config: AWQConfig, *, clip_range: bool = True
) -> QuantizedWeight:
    """Steps 2 and 3 for W [out, in], already scaled by step 1's s (with H the Hessian of its
    scaled inputs): `clip_range` False for the linears that make attention scores."""
    if config.clip and clip_range:
        W = clip(W, H, scheme, config)
    return rtn(W, scheme)
