"""GPTQ: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (ICLR 2023), Algorithm 1 with lazy batch updates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from algorithms import grid
from algorithms.rtn import assemble, partial_g_idx
from algorithms.types import QuantizedWeight, UniformScheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    """damp: fraction of the mean Hessian diagonal added to it; block_size: lazy-batch width;
    act_order: solve columns by descending Hessian diagonal ("desc_act");
    static_groups (with act_order): keep groups as runs of stored columns, so no `g_idx` is
    stored, each grid chosen when the solve reaches the group's first column (in solve
    order) from the group's columns as updated by then (not, as other implementations do,
    from the weights before the solve: the solve can move columns far outside that range);
    without it, groups are runs of the solve order, and `g_idx` maps every stored column
    to its group; mse: choose each group's grid by the clipping search of
    grid.find_params instead of min-max (also used by RTN)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    mse: bool = False


MAX_DAMP = 1.0  # a Hessian that needs more damping than its mean diagonal is not one


def inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U, float32 [in, in].

    With J the order-reversing permutation and J H J = L L^T, H^-1 = (J L^-1 J)^T (J L^-1 J)
    and J L^-1 J is upper triangular with a positive diagonal, so U = J L^-1 J: one Cholesky
    factorization and one triangular inverse instead of factor, invert and factor again.
    The factorization, where an ill-conditioned H loses accuracy, runs in float64; the
    triangular inverse of the factor in float32 (closer to the float64 result than an
    all-float32 computation, at 1.2x its time on CPU, against 2.2x for all-float64).

    If H is not positive definite at this damping (too few calibration tokens for the
    layer's width, or inputs that are linearly dependent), damping is multiplied by 10
    until it is, up to MAX_DAMP; each increase is logged as a warning, never silent.

    Memory, in bytes per entry of H beside the caller's: 16 while factorizing (the damped
    float64 copy, then the factor in its place), then 12 (the float32 factor, the
    identity, the inverse), then 4: a 405B down_proj's 53248^2 Hessian needs 45 GB at
    the peak, not the 3x more of a copy per step."""
    n = len(H)
    mean = H.diagonal().double().mean()  # [in] float64: not a float64 copy of the whole H
    while True:
        damped = H.flip(0, 1).double()  # [in, in], J H J (reversing is exact in any precision)
        damped.diagonal().add_(damp * mean)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            L32 = L.float()
            del L
            inverse = torch.linalg.solve_triangular(L32, torch.eye(n, device=H.device), upper=False)
            del L32
            return inverse.flip(0, 1)
        if damp * 10 > MAX_DAMP:
            raise ValueError(f"Hessian is not positive definite even with damp {damp:g} (of its mean diagonal)")
        log.warning("Hessian not positive definite with damp %g; retrying with damp %g", damp, damp * 10)
        damp *= 10


def updated_columns(
    W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor, i1: int, col: int, pos: torch.Tensor
) -> torch.Tensor:
    """The not yet solved columns at solve positions `pos` (all >= col) as the solve has
    updated them so far: [out, len(pos)]. Those in the current batch (from i1) are up to
    date in W1; those after it still miss the batch's pending updates Err1 Hinv[i1:col]."""
    i2 = i1 + W1.shape[1]
    inside, after = pos[pos < i2], pos[pos >= i2]
    pending = Err1[:, : col - i1] @ Hinv[i1:col, after]  # [out, len(after)]
    return torch.cat([W1[:, inside - i1], W[:, after] - pending], dim=1)


@dataclass(frozen=True)
class Prepared:
    """What GPTQ derives from H alone, the same for every linear (and row range of one)
    that reads the same inputs: the solve order, the columns no input reaches, and the
    inverse Hessian's upper Cholesky factor in solve order."""

    perm: torch.Tensor  # [in], stored column solved at each position
    dead: torch.Tensor  # [in] bool, columns with zero input energy
    Hinv: torch.Tensor  # [in, in], upper triangular


def prepare(H: torch.Tensor, config: GPTQConfig = GPTQConfig()) -> Prepared:
    """The O(in^3) part of GPTQ, computed once per Hessian (see gptq)."""
    n = len(H)
    dead = H.diagonal() == 0  # [in]
    diagonal = torch.where(dead, torch.ones_like(H.diagonal()), H.diagonal()).float()
    perm = torch.argsort(diagonal, descending=True, stable=True) if config.act_order else torch.arange(n)  # [in]
    H = H.float()[perm[:, None], perm] if config.act_order else H.float().clone()  # [in, in], one copy
    H[dead[perm], dead[perm]] = 1
    return Prepared(perm=perm, dead=dead, Hinv=inverse_cholesky(H, config.damp))


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    scheme: UniformScheme,
    config: GPTQConfig = GPTQConfig(),
    prepared: Prepared | None = None,
) -> QuantizedWeight:
    """Quantize W [out, in] column by column, pushing each column's error onto the columns
    not yet quantized, weighted by the inverse Hessian H [in, in] of the layer's inputs.

    A group's grid is chosen when the solve reaches the group's first column, from the
    group's columns as updated so far. With act_order, columns are solved by descending
    diag(H); groups are runs of that solve order (stored with g_idx) or, with
    static_groups, runs of stored columns, whose columns the solve reaches in any order.
    With H = I no error is propagated and the result equals RTN. `prepared` is
    prepare(H, config), when the caller shares it between the linears that read H.
    """
    prepared = prepared or prepare(H, config)
    W = W.float().clone()  # [out, in]
    out, n = W.shape
    groups, width = scheme.groups(n), scheme.group_width(n)
    perm, Hinv = prepared.perm, prepared.Hinv  # [in], [in, in]
    W[:, prepared.dead] = 0
    static = config.act_order and config.static_groups
    stored = torch.argsort(perm)  # [in], solve position of each stored column
    W = W[:, perm]

    codes = torch.zeros(out, n, dtype=torch.uint8)  # [out, in], solve order
    scales = torch.zeros(out, groups)  # [out, groups]
    zeros = torch.zeros(out, groups)  # [out, groups]
    chosen = torch.zeros(groups, dtype=torch.bool)  # static groups whose grid is set
    scale = zero = torch.zeros(out)
    for i1 in range(0, n, config.block_size):
        i2 = min(i1 + config.block_size, n)
        W1 = W[:, i1:i2].clone()  # [out, b]
        Err1 = torch.zeros_like(W1)  # [out, b]
        Hinv1 = Hinv[i1:i2, i1:i2]  # [b, b]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // width if static else col // width
            if (static and not chosen[g]) or (not static and col % width == 0):
                pos = stored[g * width : (g + 1) * width] if static else torch.arange(col, min(col + width, n))
                current = updated_columns(W, W1, Err1, Hinv, i1, col, pos)  # [out, width]
                scale, zero = grid.find_params(current, scheme, mse=config.mse)
                scales[:, g], zeros[:, g], chosen[g] = scale, zero, True
            elif static:
                scale, zero = scales[:, g], zeros[:, g]
            w = W1[:, i]  # [out]
            q = grid.quantize(w, scale, zero, scheme.maxq)  # [out]
            codes[:, col] = q.to(torch.uint8)
            err = (w - grid.dequantize(q, scale, zero)) / Hinv1[i, i]  # [out]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = stored // width  # [in]
    if static or torch.equal(g_idx, torch.arange(n) // width):
        g_idx = partial_g_idx(n, width)  # groups are runs of stored columns: stored only if the last is short
    return assemble(codes[:, stored], scales, zeros, scheme, g_idx)
