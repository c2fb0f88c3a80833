"""The vector format on CPU: the weight decoded once, at layout time, then torch's matmul.

VPTQ's vectors run along the outputs, so a lookup table of x . codeword (the codebook
format's CPU path) does not apply: output block r is sum_j x_j * C[idx[r, j]], a
scaled codeword per input, which costs as much as the dense product. The decode is the
work a kernel would save; on CPU it is paid once per layer and device, not per call.
"""

from __future__ import annotations

import torch

from algorithms.vector import VectorWeight, decode


def layout(vw: VectorWeight, device: torch.device) -> torch.Tensor:
    """The dense weight [out, in], float32, on `device`."""
    return decode(vw.to(device))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
