"""Exact bit packing of integer codes into int32 words along the input dimension.

The codes of a row form one little-endian bit stream: code j occupies bits
[j * bits, (j + 1) * bits) of the row, word w holds stream bits [32 w, 32 w + 32), lowest
bit first. For 2, 4 and 8 bits a word holds 16, 8 or 4 whole codes; for 3 bits every 32
codes fill 3 words and some codes straddle two words (the GPTQ layout, transposed).
"""

from __future__ import annotations

from functools import cache
from math import lcm

import torch

from algorithms.types import SUPPORTED_BITS


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {SUPPORTED_BITS}")


def codes_per_run(bits: int) -> int:
    """Smallest number of codes that fills whole words: 32 // bits, or 32 for 3 bits."""
    _check_bits(bits)
    return lcm(bits, 32) // bits


@cache
def _layout(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one run of codes: each code's word, its shift in that word, and its spill (bits
    that continue at the bottom of the next word; 0 if none)."""
    n = codes_per_run(bits)
    offsets = torch.arange(n, dtype=torch.int64) * bits  # [n] stream bit of each code
    shift = offsets % 32
    return offsets // 32, shift, (shift + bits - 32).clamp(min=0)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer [out, in] in [0, 2**bits) -> int32 [out, in * bits / 32]."""
    per_run = codes_per_run(bits)
    codes = codes.to(torch.int64)  # [out, in]; uint8 would wrap 2**8 in the range check
    out, n = codes.shape
    if n % per_run:
        raise ValueError(f"input size {n} is not a multiple of {per_run} ({bits}-bit codes fill whole words)")
    if n and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    word, shift, spill = _layout(bits)
    runs = codes.reshape(out, n // per_run, per_run)  # [out, runs, per_run]
    words_per_run = per_run * bits // 32
    words = torch.zeros(out, n // per_run, words_per_run, dtype=torch.int64)
    low = (runs << shift) & 0xFFFFFFFF  # the part in the code's own word
    words.index_add_(2, word, low)  # disjoint bit ranges: adding is OR-ing
    straddle = spill > 0
    if straddle.any():
        high = runs[..., straddle] >> (bits - spill[straddle])  # the spilled top bits
        words.index_add_(2, word[straddle] + 1, high)
    words = words.reshape(out, n * bits // 32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [out, words] -> uint8 codes [out, words * 32 / bits]; inverse of `pack`."""
    per_run = codes_per_run(bits)
    words_per_run = per_run * bits // 32
    out, words = packed.shape
    word, shift, spill = (t.to(packed.device) for t in _layout(bits))
    runs = packed.to(torch.int64).reshape(out, words // words_per_run, words_per_run) & 0xFFFFFFFF
    codes = runs[..., word] >> shift  # [out, runs, per_run]
    straddle = spill > 0
    if straddle.any():
        codes[..., straddle] |= runs[..., word[straddle] + 1] << (bits - spill[straddle])
    return (codes & (2**bits - 1)).reshape(out, words * 32 // bits).to(torch.uint8)
