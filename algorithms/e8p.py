"""E8P, QuIP#'s 2-bit lattice codebook: 2^16 points of E8 + 1/4 for vectors of 8 weights.

Tseng et al., "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice
Codebooks" (ICML 2024), section 4.2. The codebook is built from 256 "absolute" vectors:

- the 227 distinct |x| of the points x of D8 + 1/2 (all coordinates half-integers, an
  even sum) with |x|^2 <= 10;
- 29 of the 56 vectors with five coordinates 3/2 and three 1/2 (|x|^2 = 12), those of
  NORM12_HALVES (the positions of their 1/2 coordinates), appended in that order.

Code c (16 bits) decodes as in QuIP#'s E8P12 codebook, so lamina's codes are its codes:
a = c >> 8 picks the absolute vector, whose coordinate 7 is made negative when its sum is
odd (the base point, in D8 + 1/2); s = c & 255 holds sign bits; when s has odd parity its
bit 0 is flipped and the point is shifted by -1/4, else by +1/4; coordinate i is negated
when bit SIGN_BIT[i] of s is set. The even parity of the flips keeps the point in
D8 + 1/2, so the codebook is {base_a * f + t: 256 a, 128 even flips f, t = +-1/4}.

The nearest point to y is found without the 2^16-entry table: for each shift t and
absolute vector a, the best flips are the signs of y - t, unless their parity is wrong,
when the coordinate with the least |a_i| |y_i - t| is flipped back.
"""

from __future__ import annotations

from functools import cache

import torch

DIM = 8
OPT_SCALE = 1.03  # QuIP#'s: rows scaled to an RMS of 1.03 fill the codebook best on Gaussian data
SIGN_BIT = (0, 4, 1, 5, 2, 6, 3, 7)  # the bit of s that negates coordinate i
NORM12_HALVES = (
    (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2), (3, 6, 7), (3, 5, 7), (3, 4, 7), (3, 5, 6), (3, 4, 6), (3, 4, 5),
    (2, 6, 7), (2, 5, 7), (2, 4, 7), (2, 5, 6), (2, 4, 6), (2, 4, 5), (1, 6, 7), (1, 5, 7), (1, 4, 7), (1, 5, 6),
    (1, 4, 6), (0, 4, 5), (0, 6, 7), (0, 5, 7), (0, 4, 7), (0, 5, 6), (0, 4, 6), (0, 1, 4), (2, 3, 7),
)  # fmt: skip


@cache
def absolute() -> torch.Tensor:
    """The 256 absolute vectors [256, 8], float32, in code order."""
    half = torch.arange(-4, 4, dtype=torch.float64) + 0.5
    points = torch.cartesian_prod(*[half] * DIM)  # [8^8, 8]
    keep = (points.sum(-1) % 2 == 0) & (points.square().sum(-1) <= 10)
    d8 = torch.unique(points[keep].abs(), dim=0)  # [227, 8], sorted
    norm12 = torch.full((len(NORM12_HALVES), DIM), 1.5, dtype=torch.float64)
    for row, halves in enumerate(NORM12_HALVES):
        norm12[row, list(halves)] = 0.5
    return torch.cat([d8, norm12]).float()


@cache
def _tables(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(absolute [256, 8], base point signs [256, 8], parity of each base [256] bool,
    squared norms [256]) on `device`, float32."""
    a = absolute().to(device)
    odd = a.sum(-1).remainder(2) == 1  # [256], coordinate 7 negative in the base point
    base = torch.ones_like(a)
    base[odd, 7] = -1
    return a, base, odd, a.square().sum(-1)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Codes (any integer dtype; int16 read as uint16) [...] -> points [..., 8], float32."""
    c = codes.long() & 0xFFFF
    a, base, _, _ = _tables(str(codes.device))
    s = c & 255
    bits = (s[..., None] >> torch.arange(8, device=c.device)) & 1  # [..., 8]
    odd = bits.sum(-1) % 2  # [...]
    bits[..., 0] ^= odd  # s' = s ^ parity(s): an even number of flips
    flip = 1 - 2 * bits[..., list(SIGN_BIT)].float()  # [..., 8], coordinate i from bit SIGN_BIT[i]
    shift = 0.25 - 0.5 * odd.float()  # [...]
    idx = c >> 8
    return a[idx] * base[idx] * flip + shift[..., None]


ROWS = 4096  # vectors searched at once ([ROWS, 256, 8] floats)


def nearest(x: torch.Tensor) -> torch.Tensor:
    """The code of the nearest E8P point to each vector of x [N, 8] (Euclidean): int32 [N]."""
    out = torch.empty(len(x), dtype=torch.int32, device=x.device)
    for r in range(0, len(x), ROWS):
        out[r : r + ROWS] = _nearest(x[r : r + ROWS].float())
    return out


def _nearest(x: torch.Tensor) -> torch.Tensor:
    a, base, odd_base, norm = _tables(str(x.device))
    best = torch.full((len(x),), -float("inf"), device=x.device)
    code = torch.zeros(len(x), dtype=torch.long, device=x.device)
    weights = 1 << torch.tensor(SIGN_BIT, device=x.device)  # [8], the bit of each coordinate's flip
    for odd_shift, t in ((0, 0.25), (1, -0.25)):
        y = x - t  # [N, 8]
        ay, neg = y.abs(), y < 0
        wrong = (neg.sum(-1) % 2)[:, None].bool() != odd_base[None, :]  # [N, 256], signs of y have the wrong parity
        prod = ay[:, None, :] * a[None, :, :]  # [N, 256, 8]
        least, which = prod.min(-1)  # [N, 256]
        score = prod.sum(-1) - 2 * wrong * least - norm / 2  # <point, y> - |point|^2 / 2 [N, 256]
        top, idx = score.max(-1)  # [N]
        top = top - y.square().sum(-1) / 2  # -|y - point|^2 / 2: comparable across the two shifts
        better = top > best
        # the point's signs: those of y, with coordinate `which` flipped back when the parity is wrong
        sign_neg = neg.clone()
        fix = wrong.gather(1, idx[:, None])[:, 0]
        k = which.gather(1, idx[:, None])[:, 0]
        rows = torch.nonzero(fix)[:, 0]
        sign_neg[rows, k[rows]] = ~sign_neg[rows, k[rows]]
        flips = sign_neg ^ (base[idx] < 0)  # [N, 8], negations relative to the base point (an even number)
        s = (flips.long() * weights).sum(-1) ^ odd_shift  # odd parity of s selects the -1/4 shift
        candidate = (idx << 8) | s
        code = torch.where(better, candidate, code)
        best = torch.maximum(best, top)
    return code.to(torch.int32)


def grid() -> torch.Tensor:
    """All 2^16 points [65536, 8] in code order (for tests and exhaustive searches)."""
    return decode(torch.arange(1 << 16))
