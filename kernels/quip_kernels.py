"""The incoherent (QuIP) format's kernels, as `layout` / `linear` pairs.

DENSE (the `cpu` backend): the weight decoded back to the model's space once per layer
and device, then torch's matmul: on a CPU the two transforms per call cost more than the
product they would save decoding.

ROTATED (the `triton` backend, for now): the reference path's fast Walsh-Hadamard
transforms and E8P decode in torch on the device, the codes kept as stored.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from algorithms.quip import QuipWeight, decode
from kernels.reference import incoherent_linear


def _dense_layout(qw: QuipWeight, device: torch.device) -> torch.Tensor:
    return decode(qw.to(device))  # [out, in], float32


def _dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


DENSE = SimpleNamespace(layout=_dense_layout, linear=_dense_linear)
ROTATED = SimpleNamespace(layout=lambda qw, device: qw.to(device), linear=incoherent_linear)
