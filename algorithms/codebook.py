"""The codebook format (additive quantization, AQLM's layout): its scheme and weight type.

A weight row is cut into groups of `in_group_size` consecutive inputs; each group is the
sum of one codeword from each of `num_codebooks` codebooks of 2**nbits_per_codebook
entries, times the row's scale:

    W[o, j*g:(j+1)*g] = scales[o] * sum_m codebooks[m, codes[o, j, m], 0, :]

The stored tensors are AQLM's Hugging Face layout, so that the native artifact and the
`aqlm` export hold the same bytes:
    codes:     [out, in / g, num_codebooks], int8 (nbits <= 8) or int16 (<= 16), the code
               c stored as c - 2**nbits when c >= 2**(nbits-1) (read back as c mod 2**nbits)
    codebooks: [num_codebooks, 2**nbits, 1, g] float16 (out_group_size 1)
    scales:    [out, 1, 1, 1] float16
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("1x16", "2x8")  # the layouts serving kernels exist for; others run on the reference path


@dataclass(frozen=True)
class CodebookScheme:
    num_codebooks: int = 2
    nbits_per_codebook: int = 8
    in_group_size: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.num_codebooks <= 8:
            raise ValueError(f"num_codebooks must be 1..8, got {self.num_codebooks}")
        if not 1 <= self.nbits_per_codebook <= 16:
            raise ValueError(f"nbits_per_codebook must be 1..16, got {self.nbits_per_codebook}")
        if self.in_group_size < 1:
            raise ValueError(f"in_group_size must be >= 1, got {self.in_group_size}")

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits_per_codebook

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.nbits_per_codebook <= 8 else torch.int16

    @property
    def name(self) -> str:
        return f"{self.num_codebooks}x{self.nbits_per_codebook}"

    def fields(self) -> dict[str, int]:
        """The scheme as a quantization_config names it: AQLM's field names, which lamina's
        own config uses too."""
        return {
            "nbits_per_codebook": self.nbits_per_codebook,
            "num_codebooks": self.num_codebooks,
            "in_group_size": self.in_group_size,
            "out_group_size": 1,
        }

    @classmethod
    def from_fields(cls, qc: dict) -> CodebookScheme:
        """The scheme from those fields (out_group_size is the caller's to check); KeyError
        names a missing field, ValueError a bad one."""
        return cls(
            num_codebooks=int(qc["num_codebooks"]),
            nbits_per_codebook=int(qc["nbits_per_codebook"]),
            in_group_size=int(qc["in_group_size"]),
        )

    def groups(self, in_features: int) -> int:
        """Groups along the input; raises if the group size does not divide it."""
        if in_features % self.in_group_size:
            raise ValueError(f"in_group_size {self.in_group_size} does not divide input size {in_features}")
        return in_features // self.in_group_size

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Codes, plus each row's fp16 scale and the fp16 codebooks spread over the weight."""
        codes = self.num_codebooks * self.nbits_per_codebook / self.in_group_size
        books = self.num_codebooks * self.codebook_size * self.in_group_size * 16
        return codes + 16 / in_features + books / (out_features * in_features)


def store_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes in [0, 2**nbits) as the format's signed integers."""
    wide = codes.to(torch.int32)
    wide = torch.where(wide >= 2 ** (nbits - 1), wide - 2**nbits, wide)
    return wide.to(torch.int8 if nbits <= 8 else torch.int16)


def load_codes(stored: torch.Tensor, nbits: int) -> torch.Tensor:
    """The format's signed integers back as codes in [0, 2**nbits), int64."""
    return stored.to(torch.int64) % 2**nbits


@dataclass(frozen=True)
class CodebookWeight:
    """A linear weight in the codebook format (tensors as in the module docstring)."""

    codes: torch.Tensor  # [out, in / g, M] int8 | int16, stored form
    codebooks: torch.Tensor  # [M, K, 1, g] float16
    scales: torch.Tensor  # [out, 1, 1, 1] float16

    @property
    def scheme(self) -> CodebookScheme:
        M, K, _, g = self.codebooks.shape
        return CodebookScheme(num_codebooks=M, nbits_per_codebook=K.bit_length() - 1, in_group_size=g)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * self.codebooks.shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "codebooks": self.codebooks, "scales": self.scales}

    def to(self, device: str | torch.device) -> CodebookWeight:
        return CodebookWeight(
            codes=self.codes.to(device), codebooks=self.codebooks.to(device), scales=self.scales.to(device)
        )

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> CodebookWeight:
        return cls(codes=tensors["codes"], codebooks=tensors["codebooks"], scales=tensors["scales"])


def decode_groups(codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Unscaled groups, the sum of each group's codewords: codes [rows, G, M] in [0, K),
    books [M, K, g] -> [rows, G, g]."""
    M, K, g = books.shape
    offsets = torch.arange(M, device=codes.device) * K  # [M]
    return books.reshape(M * K, g)[codes + offsets].sum(dim=2)


def decode(cw: CodebookWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight [out, in]: each group the scaled sum of its codewords."""
    M, K, _, g = cw.codebooks.shape
    codes = load_codes(cw.codes, K.bit_length() - 1)  # [out, G, M]
    groups = decode_groups(codes, cw.codebooks.to(dtype).reshape(M, K, g))  # [out, G, g]
    return groups.reshape(cw.out_features, -1) * cw.scales.to(dtype).reshape(-1, 1)
