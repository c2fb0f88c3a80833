"""SmoothQuant (Xiao et al., 2023, arXiv:2211.10438): migrate activation outliers into the
weights before W8A8 quantization.

Per input channel j of a group of linears that share an input x (q/k/v after the input
norm, gate/up after the post-attention norm):
    s_j = max|x_j|^alpha / max_l max_i |W_l[i, j]|^(1 - alpha)
the norm's weight becomes w / s and each linear's weight W diag(s), so x W^T is unchanged
while the channels of x / s are flatter (easier to quantize per token) and the weights'
columns absorb the difference. alpha (the migration strength) is the recipe's: 0.5 in the
paper for most models, up to 0.75-0.85 for those with harder outliers.

The max |x_j| come from the calibration set; a channel that never fired (or whose weights
are all zero) keeps s_j = 1.
"""

from __future__ import annotations

import torch


def smoothing_scale(x_absmax: torch.Tensor, Ws: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] from the calibration's max |x_j| [in] and the group's weights Ws (each [out_l, in])."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w_absmax = torch.stack([w.float().abs().amax(dim=0) for w in Ws]).amax(dim=0)  # [in]
    x_absmax = x_absmax.float()
    s = x_absmax.pow(alpha) / w_absmax.pow(1 - alpha)  # [in]
    dead = (x_absmax == 0) | (w_absmax == 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=1e-5))
