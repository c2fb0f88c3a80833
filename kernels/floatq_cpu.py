"""The `cpu` backend of the float schemes (algorithms/floatq.py): torch's low-precision
matmuls where the scheme has one, else the weight dequantized once.

- int8 W8A8: the activations' int8 codes times the weight's in `torch._int_mm` (exact int32
  sums), then both scales: y = (q_x q_W^T) * s_x * s_W^T.
- fp8 W8A8: `torch._scaled_mm` on the E4M3 codes of both, scales per tensor or per row/column.
- fp8 weight-only, nvfp4 (no fp4 matmul here): the weight dequantized once and kept while
  the layer stays on the device; the activations (nvfp4's) quantized as the reference does.
The activation codes are the reference's (float_activations.activation_codes), so the
outputs differ from kernels/reference.py only by float32 summation order.

Both torch functions run on CPU tensors in torch 2.13; on CUDA they have alignment rules
(dimensions multiple of 16, m > 16 for _int_mm) that no test here could check, so this
backend serves CPU tensors only (kernels/backends.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from algorithms import floatq
from algorithms.float_activations import activation_codes, quantize_activations
from algorithms.floatq import ActivationScheme, FloatWeight


@dataclass(frozen=True)
class Laid:
    """path 'int_mm' | 'scaled_mm': weight holds the codes transposed [in, out] (a view of
    the stored [out, in]), scale the weight's float32 scales [1, out] or [1]; 'dense': weight
    is the dequantized float32 [out, in]."""

    path: str
    weight: torch.Tensor
    scale: torch.Tensor | None
    activations: ActivationScheme | None
    act_scale: torch.Tensor | None


def layout(fw: FloatWeight, device: torch.device) -> Laid:
    act, s = fw.scheme.activations, fw.activation_scale
    act_scale = None if s is None else s.to(device)
    if act is None or fw.scheme.kind == "nvfp4":
        return Laid("dense", floatq.dequantize(fw).to(device), None, act, act_scale)
    scale = fw.weight_scale.to(device).reshape(1, -1)  # [1, out] | [1, 1]
    path = "int_mm" if fw.scheme.kind == "int8" else "scaled_mm"
    return Laid(path, fw.weight.to(device).t(), scale if scale.numel() > 1 else scale.reshape(1), act, act_scale)


def linear(x: torch.Tensor, laid: Laid, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] in x's dtype."""
    if laid.path == "dense":
        if laid.activations is not None:
            x = quantize_activations(x, laid.activations, laid.act_scale)
        return torch.nn.functional.linear(x, laid.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    *lead, n = x.shape
    codes, sx = activation_codes(x.reshape(-1, n), laid.activations, laid.act_scale)  # [m, in], [m, 1] | [1]
    if laid.path == "int_mm":
        y = torch._int_mm(codes, laid.weight).float() * sx * laid.scale  # [m, out]
    else:
        y = _scaled_mm(codes, laid.weight, sx, laid.scale)  # [m, out]
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, -1).to(x.dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """fp8 a [m, k] @ b [k, n] with a's scales per row [m, 1] and b's per column [1, n]
    (per-tensor scales expanded to them: torch 2.13's CPU kernel for two scalar scales
    took 27 s where the row-wise one took 0.04 s, at 1024 x 576 x 1536 on this machine)."""
    m, n = a.shape[0], b.shape[1]
    sa, sb = sa.reshape(-1, 1).expand(m, 1).contiguous(), sb.reshape(1, -1).expand(1, n).contiguous()
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.float32)
