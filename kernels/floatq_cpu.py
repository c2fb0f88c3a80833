"""The `cpu` backend of the float schemes (algorithms/floatq.py): torch's int8 matmul for
W8A8 int8, else the weight dequantized once.

- int8 W8A8: the activations' int8 codes times the weight's in `torch._int_mm` (exact int32
  sums), then both scales: y = (q_x q_W^T) * s_x * s_W^T (0.18x the fp32 matmul's time at
  4096 x 4096 and 512 tokens, benchmarks/float_kernel_speed.py).
- fp8 (W8A8 or weight-only), nvfp4: the weight dequantized once and kept while the layer
  stays on the device, the activations quantized as the reference does, then the fp32
  matmul. torch 2.13's CPU `_scaled_mm` on the fp8 codes gives the same numbers but took
  3x the fp32 matmul's time at 512 tokens and 17x at one (and 27 s for per-tensor scales).
The activation codes are the reference's (float_activations), so the outputs differ from
kernels/reference.py only by float32 summation order.

On CUDA `_int_mm` and `_scaled_mm` have alignment rules (dimensions multiple of 16, m > 16
for _int_mm) that no test here could check, so this backend serves CPU tensors only
(kernels/backends.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms import floatq
from algorithms.float_activations import activation_codes, quantize_activations
from algorithms.floatq import ActivationScheme, FloatWeight


@dataclass(frozen=True)
class Laid:
    """path 'int_mm': weight holds the int8 codes transposed [in, out] (a view of the stored
    [out, in]), scale the weight's float32 scales [1, out] or [1]; 'dense': weight is the
    dequantized float32 [out, in]."""

    path: str
    weight: torch.Tensor
    scale: torch.Tensor | None
    activations: ActivationScheme | None
    act_scale: torch.Tensor | None


def layout(fw: FloatWeight, device: torch.device) -> Laid:
    act, s = fw.scheme.activations, fw.activation_scale
    act_scale = None if s is None else s.to(device)
    if act is None or fw.scheme.kind != "int8":
        return Laid("dense", floatq.dequantize(fw).to(device), None, act, act_scale)
    scale = fw.weight_scale.to(device).reshape(1, -1)  # [1, out] | [1, 1]
    return Laid("int_mm", fw.weight.to(device).t(), scale if scale.numel() > 1 else scale.reshape(1), act, act_scale)


def linear(x: torch.Tensor, laid: Laid, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype."""
    if laid.path == "dense":
        if laid.activations is not None:
            x = quantize_activations(x, laid.activations, laid.act_scale)
        return torch.nn.functional.linear(x, laid.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    *lead, n = x.shape
    codes, sx = activation_codes(x.reshape(-1, n), laid.activations, laid.act_scale)  # [m, in], [m, 1] | [1]
    y = torch._int_mm(codes, laid.weight).float() * sx * laid.scale  # [m, out]
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, -1).to(x.dtype)
