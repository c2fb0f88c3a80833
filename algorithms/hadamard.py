"""Orthogonal Hadamard transforms of any size a model has, applied in O(n log n).

A Hadamard matrix of order n (entries +-1, H H^T = n I) exists only for n = 1, 2 or a
multiple of 4. Sylvester's construction gives the powers of two; model sizes such as
576 = 9 * 64 or 14336 = 7 * 2048 are not. lamina writes n = h * p with p a power of two
and h the smallest order m * 2^j (m the odd part of n) that Paley's constructions give
for a prime q:

- Paley I, h = q + 1 with q = 3 (mod 4): H = I + [[0, 1^T], [-1, Q]];
- Paley II, h = 2 (q + 1) with q = 1 (mod 4): H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]],
  C = [[0, 1^T], [1, Q]];

where Q[i, j] is the Legendre symbol of (j - i) mod q. Then Had_n = (P_h (x) S_p) / sqrt(n)
is orthogonal, applied to a vector x viewed as h x p as P X S_p: a fast Walsh-Hadamard
transform along the p axis and an h x h product along the other. This covers every size
of Llama-3 8B/70B/405B (14336 = 28 * 512, 28672 = 28 * 1024, 53248 = 104 * 512), Qwen2.5
(4864 = 76 * 64, 29568 = 924 * 32) and the fixture model (576 = 36 * 16, 1536 = 12 * 128,
192 = 12 * 16). A size none of them covers is refused (`factor` raises), never padded.
"""

from __future__ import annotations

import math
from functools import cache

import torch

MAX_FACTOR = 4096  # the largest non-power-of-two factor h tried (an h x h matrix per size)


def _prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = Legendre symbol of (j - i) mod q, for a prime q: [q, q] float64."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if d in residues else -1.0 for d in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q  # [q, q]
    return chi[idx]


def paley(h: int) -> torch.Tensor | None:
    """A Hadamard matrix of order h from Paley's constructions with a prime q, or None."""
    if h % 4:
        return None
    if _prime(h - 1) and (h - 1) % 4 == 3:
        q = h - 1
        core = torch.zeros(h, h, dtype=torch.float64)
        core[0, 1:], core[1:, 0], core[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(h, dtype=torch.float64) + core
    if _prime(h // 2 - 1) and (h // 2 - 1) % 4 == 1:
        q = h // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@cache
def factor(n: int) -> tuple[int, int]:
    """(h, p): n = h * p with p a power of two and a Paley matrix of order h (h = 1: none
    needed). Raises ValueError naming n when no such split exists."""
    if n < 1:
        raise ValueError(f"no Hadamard transform of size {n}")
    p = n & -n  # the largest power of two dividing n
    m = n // p
    if m == 1:
        return 1, n
    h = m
    while h <= min(n, MAX_FACTOR):
        if paley(h) is not None:
            return h, n // h
        h *= 2
    raise ValueError(
        f"size {n} = {m} x {p} has no Hadamard transform here (no Paley matrix of order {m} x 2^j <= {MAX_FACTOR})"
    )


@cache
def _paley_matrix(h: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return paley(h).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x S_p along the last axis (p a power of two), unnormalised: log2(p) butterflies."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, p)


def apply(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Had_n applied to each vector along the last axis (x @ Had_n^T), or with `transpose`
    Had_n^T (x @ Had_n); Had_n = (P_h (x) S_p) / sqrt(n) is orthogonal."""
    n = x.shape[-1]
    h, p = factor(n)
    y = fwht(x) if h == 1 else fwht(x.reshape(*x.shape[:-1], h, p))
    if h > 1:
        P = _paley_matrix(h, x.dtype, str(x.device))  # [h, h]
        y = torch.einsum("ac,...cb->...ab", P.T if transpose else P, y).reshape(x.shape)
    return y / math.sqrt(n)


def matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Had_n as a dense [n, n] matrix (for tests and small sizes)."""
    return apply(torch.eye(n, dtype=dtype)).T


def signs(n: int, seed: int, salt: int) -> torch.Tensor:
    """n random +-1 (int8) from `seed` and `salt`, the same on every machine (torch's CPU generator)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)
