"""Low-bit linear layers. Each format has a torch reference path that runs anywhere, a
C kernel for CPUs and Triton kernels for GPUs; kernels/backends.py picks one."""

from kernels.backends import BACKENDS, choose
from kernels.quant_linear import CodebookLinear, IncoherentLinear, QuantLinear, VectorLinear, quant_linear

__all__ = ["BACKENDS", "CodebookLinear", "IncoherentLinear", "QuantLinear", "VectorLinear", "choose", "quant_linear"]
