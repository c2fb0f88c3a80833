"""Pure quantization math: functions from (weight, hessian, config) to a quantized weight
(the uniform grid of types.py, the codebooks of codebook.py, the vectors of vector.py, or
QuIP's rotated codes of quip.py).

No I/O, no Ray, no printing. Every quantizer has the signature
``quantize(W [out, in], H [in, in] | None, scheme, options, prepared=None) -> QuantizedWeight``,
where `prepared` is what PREPARERS[name](H, options) gives, when the caller shares it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from algorithms.aqlm import AQLMConfig, aqlm
from algorithms.awq import AWQConfig, awq
from algorithms.codebook import CodebookScheme, CodebookWeight
from algorithms.floatq import FloatScheme, FloatWeight, from_uniform, rtn_float
from algorithms.gptq import GPTQConfig, Prepared, gptq, prepare
from algorithms.quip import QuipConfig, QuipScheme, QuipWeight, quip
from algorithms.quip import prepare as quip_prepare
from algorithms.rtn import rtn
from algorithms.types import QuantizedWeight, UniformScheme
from algorithms.vector import VectorScheme, VectorWeight
from algorithms.vptq import VPTQConfig, vptq

INT8_GRID = UniformScheme(bits=8, group_size=0, sym=True)  # the int8 W8A8 weights' grid: from_uniform converts it


def _rtn(
    W: torch.Tensor,
    H: torch.Tensor | None,
    scheme: UniformScheme | FloatScheme,
    options: GPTQConfig,
    prepared: object = None,
) -> QuantizedWeight | FloatWeight:
    if isinstance(scheme, FloatScheme):  # fp8, nvfp4, int8 (algorithms.floatq)
        return rtn_float(W, H, scheme, options, prepared)
    return rtn(W, scheme, mse=options.mse)


def _gptq(
    W: torch.Tensor,
    H: torch.Tensor | None,
    scheme: UniformScheme | FloatScheme,
    options: GPTQConfig,
    prepared: object = None,
) -> QuantizedWeight | FloatWeight:
    if H is None:
        raise ValueError("gptq needs the layer's input Hessian")
    prepared = prepared if isinstance(prepared, Prepared) else None
    if isinstance(scheme, FloatScheme):  # W8A8: GPTQ on the symmetric 8-bit per-channel grid, stored as int8
        return from_uniform(gptq(W, H, INT8_GRID, options, prepared), scheme)
    return gptq(W, H, scheme, options, prepared)


def _awq(
    W: torch.Tensor, H: torch.Tensor | None, scheme: UniformScheme, options: AWQConfig, prepared: object = None
) -> QuantizedWeight:
    if H is None:
        raise ValueError("awq needs the layer's input Hessian")
    return awq(W, H, scheme, options)


def _aqlm(
    W: torch.Tensor, H: torch.Tensor | None, scheme: CodebookScheme, options: AQLMConfig, prepared: object = None
) -> CodebookWeight:
    if H is None:
        raise ValueError("aqlm needs the layer's input Hessian")
    return aqlm(W, H, scheme, options)


def _vptq(
    W: torch.Tensor, H: torch.Tensor | None, scheme: VectorScheme, options: VPTQConfig, prepared: object = None
) -> VectorWeight:
    if H is None:
        raise ValueError("vptq needs the layer's input Hessian")
    return vptq(W, H, scheme, options)


def _quip(
    W: torch.Tensor, H: torch.Tensor | None, scheme: QuipScheme, options: QuipConfig, prepared: object = None
) -> QuipWeight:
    if H is None:
        raise ValueError("quip needs the layer's input Hessian")
    return quip(W, H, scheme, options, prepared)


Format = UniformScheme | CodebookScheme | VectorScheme | QuipScheme | FloatScheme  # how a quantized weight is stored
Weight = QuantizedWeight | CodebookWeight | VectorWeight | QuipWeight | FloatWeight
Quantizer = Callable[..., Weight]

# awq: its scaled weights clipped and rounded (algorithms.awq); smoothquant: its smoothed
# weights solved by GPTQ, as llm-compressor's W8A8 recipe does
QUANTIZERS: dict[str, Quantizer] = {
    "rtn": _rtn,
    "gptq": _gptq,
    "aqlm": _aqlm,
    "vptq": _vptq,
    "quip": _quip,
    "awq": _awq,
    "smoothquant": _gptq,
}
NEEDS_HESSIAN = {name: name != "rtn" for name in QUANTIZERS}
# what a quantizer derives from H alone, shared by the linears (and row ranges) that read it
PREPARERS: dict[str, Callable[[torch.Tensor, object], object]] = {
    "gptq": prepare,
    "quip": quip_prepare,
    "smoothquant": prepare,
}


def weight_from_tensors(tensors: dict[str, torch.Tensor], fmt: Format) -> Weight:
    """A stored linear's tensors (by suffix) as its weight type."""
    if isinstance(fmt, FloatScheme):
        return FloatWeight.from_tensors(tensors, fmt)
    if isinstance(fmt, QuipScheme):
        return QuipWeight.from_tensors(tensors, fmt)
    if isinstance(fmt, VectorScheme):
        return VectorWeight.from_tensors(tensors, fmt)
    if isinstance(fmt, CodebookScheme):
        return CodebookWeight.from_tensors(tensors)
    return QuantizedWeight.from_tensors(tensors, bits=fmt.bits, group_size=fmt.group_size)


__all__ = [
    "NEEDS_HESSIAN",
    "PREPARERS",
    "QUANTIZERS",
    "AQLMConfig",
    "AWQConfig",
    "CodebookScheme",
    "CodebookWeight",
    "FloatScheme",
    "FloatWeight",
    "Format",
    "GPTQConfig",
    "QuantizedWeight",
    "QuipConfig",
    "QuipScheme",
    "QuipWeight",
    "UniformScheme",
    "VPTQConfig",
    "VectorScheme",
    "VectorWeight",
    "Weight",
    "aqlm",
    "awq",
    "gptq",
    "quip",
    "rtn",
    "vptq",
    "weight_from_tensors",
]
