"""Pure quantization math: functions from (weight, hessian, config) to a quantized weight.

No I/O, no Ray, no printing. Every quantizer has the signature
``quantize(W [out, in], H [in, in] | None, scheme, options, prepared=None) -> QuantizedWeight``,
where `prepared` is what PREPARERS[name](H, options) gives, when the caller shares it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from algorithms.gptq import GPTQConfig, Prepared, gptq, prepare
from algorithms.rtn import rtn
from algorithms.types import QuantizedWeight, UniformScheme


def _rtn(
    W: torch.Tensor, H: torch.Tensor | None, scheme: UniformScheme, options: GPTQConfig, prepared: object = None
) -> QuantizedWeight:
    return rtn(W, scheme, mse=options.mse)


def _gptq(
    W: torch.Tensor, H: torch.Tensor | None, scheme: UniformScheme, options: GPTQConfig, prepared: object = None
) -> QuantizedWeight:
    if H is None:
        raise ValueError("gptq needs the layer's input Hessian")
    return gptq(W, H, scheme, options, prepared if isinstance(prepared, Prepared) else None)


Quantizer = Callable[..., QuantizedWeight]

QUANTIZERS: dict[str, Quantizer] = {"rtn": _rtn, "gptq": _gptq}
NEEDS_HESSIAN = {"rtn": False, "gptq": True}
# what a quantizer derives from H alone, shared by the linears (and row ranges) that read it
PREPARERS: dict[str, Callable[[torch.Tensor, GPTQConfig], object]] = {"gptq": prepare}

__all__ = ["NEEDS_HESSIAN", "PREPARERS", "QUANTIZERS", "GPTQConfig", "QuantizedWeight", "UniformScheme", "gptq", "rtn"]
