"""Low-bit linear layers. Each format has a torch reference path that runs anywhere;
GPU kernels arrive with issue 7 and are picked by a plain `if` chain in dispatch."""

from kernels.quant_linear import QuantLinear

__all__ = ["QuantLinear"]
