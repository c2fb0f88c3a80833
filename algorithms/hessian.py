"""Layer-input Hessians H = X^T X, the statistic every Hessian-based quantizer needs."""

from __future__ import annotations

import torch


def input_gram(x: torch.Tensor) -> torch.Tensor:
    """Sum of x x^T over all tokens: x [..., in] -> [in, in] float32."""
    X = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
    return X.T @ X


def proxy_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """Hessian-weighted error tr((W - Q) H (W - Q)^T), the loss GPTQ minimises."""
    D = (W - Q).double()  # [out, in]
    return float(torch.einsum("oi,ij,oj->", D, H.double(), D))
