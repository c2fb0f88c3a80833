"""Weighted k-means on short vectors: the initialization of additive codebooks."""

from __future__ import annotations

import torch

ASSIGN_POINTS = 65536  # points whose distances to every centroid are held at once


def assign(X: torch.Tensor, weights: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each point under the point's per-dimension weights:
    argmin_k sum_d w[n, d] (X[n, d] - C[k, d])^2. X, weights [N, d], C [K, d] -> [N] int64."""
    out = torch.empty(len(X), dtype=torch.int64, device=X.device)
    for a in range(0, len(X), ASSIGN_POINTS):
        x, w = X[a : a + ASSIGN_POINTS], weights[a : a + ASSIGN_POINTS]  # [n, d]
        dist = w @ (C * C).T - 2 * (w * x) @ C.T  # [n, K], without the constant sum w x^2
        out[a : a + len(x)] = dist.argmin(dim=1)
    return out


def kmeans(
    X: torch.Tensor, weights: torch.Tensor, K: int, *, iters: int, seed: int, sample: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm with per-dimension weights [N, d]: each centroid coordinate is the
    weighted mean of its points' coordinates. Starts from K points drawn with `seed`
    (with replacement when there are fewer than K; drawn on the CPU, so the same on any
    device); an empty cluster keeps its centroid.
    With `sample` (> K), the iterations run on that many points drawn with `seed` and
    only the final assignment sees them all. Returns (centroids [K, d], assignment [N])."""
    N, d = X.shape
    g = torch.Generator().manual_seed(seed)
    if sample and sample < N:
        pick = torch.randperm(N, generator=g)[:sample].to(X.device)  # [sample]
        C, _ = kmeans(X[pick], weights[pick], K, iters=iters, seed=seed)
        return C, assign(X, weights, C)
    start = torch.randperm(N, generator=g)[:K] if N >= K else torch.randint(N, (K,), generator=g)
    C = X[start.to(X.device)].clone()  # [K, d]
    for _ in range(iters):
        idx = assign(X, weights, C)  # [N]
        num = X.new_zeros(K, d).index_add_(0, idx, weights * X)  # [K, d]
        den = X.new_zeros(K, d).index_add_(0, idx, weights)  # [K, d]
        C = torch.where(den > 0, num / den.clamp(min=1e-30), C)
    return C, assign(X, weights, C)
