"""Exact bit packing of integer codes into int32 words along the input dimension."""

from __future__ import annotations

import torch

from algorithms.types import SUPPORTED_BITS


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {SUPPORTED_BITS}")
    return 32 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer [out, in] in [0, 2**bits) -> int32 [out, in * bits / 32]."""
    per_word = _check_bits(bits)
    codes = codes.to(torch.int64)  # [out, in]; uint8 would wrap 2**8 in the range check
    out, n = codes.shape
    if n % per_word:
        raise ValueError(f"input size {n} is not a multiple of {per_word} ({bits}-bit codes per word)")
    if codes.min() < 0 or codes.max() >= 2**bits:
        raise ValueError(f"codes out of range for {bits} bits")
    shifts = torch.arange(per_word, dtype=torch.int64) * bits  # [per_word]
    words = (codes.reshape(out, n // per_word, per_word) << shifts).sum(-1)  # [out, n/pw]
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [out, words] -> uint8 codes [out, words * 32 / bits]; inverse of `pack`."""
    per_word = _check_bits(bits)
    out, words = packed.shape
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits  # [per_word]
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # [out, words, per_word]
    return codes.reshape(out, words * per_word).to(torch.uint8)
