"""The incoherent (QuIP) format on CPU: the weight decoded back to the model's space once
per layer and device, then torch's matmul (the vector format's `linear`). On a CPU the
two Hadamard transforms per call would cost more than the decode they save (the
reference path runs them)."""

from __future__ import annotations

import torch

from algorithms.quip import QuipWeight, decode
from kernels.vector_cpu import linear

__all__ = ["layout", "linear"]


def layout(qw: QuipWeight, device: torch.device) -> torch.Tensor:
    """The dense weight [out, in], float32, on `device`."""
    return decode(qw.to(device))
