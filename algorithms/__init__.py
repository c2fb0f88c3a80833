"""Pure quantization math: functions from (weight, hessian, config) to a quantized weight.

No I/O, no Ray, no printing. Every quantizer has the signature
``quantize(W [out, in], H [in, in] | None, scheme, options) -> QuantizedWeight``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from algorithms.gptq import GPTQConfig, gptq
from algorithms.rtn import rtn
from algorithms.types import QuantizedWeight, UniformScheme


def _rtn(W: torch.Tensor, H: torch.Tensor | None, scheme: UniformScheme, options: GPTQConfig) -> QuantizedWeight:
    return rtn(W, scheme, mse=options.mse)


def _gptq(W: torch.Tensor, H: torch.Tensor | None, scheme: UniformScheme, options: GPTQConfig) -> QuantizedWeight:
    if H is None:
        raise ValueError("gptq needs the layer's input Hessian")
    return gptq(W, H, scheme, options)


Quantizer = Callable[[torch.Tensor, torch.Tensor | None, UniformScheme, GPTQConfig], QuantizedWeight]

QUANTIZERS: dict[str, Quantizer] = {"rtn": _rtn, "gptq": _gptq}
NEEDS_HESSIAN = {"rtn": False, "gptq": True}

__all__ = ["NEEDS_HESSIAN", "QUANTIZERS", "GPTQConfig", "QuantizedWeight", "UniformScheme", "gptq", "rtn"]
