"""The quantization scheme and the one quantized-weight type of the uniform formats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class UniformScheme:
    """Group-wise uniform integer grid: W ~ scale * (q - zero), q in [0, 2**bits).

    group_size 0 means one group per output row (per-channel). With partial_groups, an
    input size that group_size does not divide gets a narrower last group; such a weight
    always stores g_idx (the formats without g_idx cannot describe the short group).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    partial_groups: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size < 0:
            raise ValueError(f"group_size must be >= 0 (0 = per-channel), got {self.group_size}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension; raises if the size cannot be packed."""
        if self.group_size == 0:
            return 1
        if in_features % self.group_size and not self.partial_groups:
            raise ValueError(f"group size {self.group_size} does not divide input size {in_features}")
        return -(-in_features // self.group_size)

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == 0 else self.group_size


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight on a group-wise uniform grid.

    qweight: int32 [out, in * bits / 32], codes packed along the input dimension,
             the lowest bits of each word holding the lowest input index.
    scales:  float16 [out, groups]
    zeros:   uint8 [out, groups], integer zero points
    g_idx:   int32 [in], the group of each input column, when groups are not runs of
             consecutive columns (GPTQ act-order without static groups); else None
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int  # columns per group (equal to in_features when per-channel)
    in_features: int
    g_idx: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors, by suffix, as the native artifact names them."""
        stored = {"qweight": self.qweight, "scales": self.scales, "qzeros": self.zeros}
        return stored if self.g_idx is None else {**stored, "g_idx": self.g_idx}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, bits: int, group_size: int) -> QuantizedWeight:
        qweight = tensors["qweight"]
        in_features = qweight.shape[1] * 32 // bits
        return cls(
            qweight=qweight,
            scales=tensors["scales"],
            zeros=tensors["qzeros"],
            bits=bits,
            group_size=group_size or in_features,
            in_features=in_features,
            g_idx=tensors.get("g_idx"),
        )
