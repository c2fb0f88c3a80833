"""Activation quantization of the float schemes (algorithms/floatq.py): what a W8A8 or W4A4
linear does to its input before the matmul, and the static scales calibration gives.

- dynamic per token: scale = max|x_row| / qmax per row (qmax 448 for fp8, 127 for int8, as
  vLLM's per-token kernels compute it; compressed-tensors' own simulation divides int8 by 127.5);
- static per tensor: the stored `input_scale` float32 [1] = calibration max|x| / qmax;
- fp8 dynamic per tensor: one scale for the whole x;
- nvfp4 (W4A4): the stored `input_global_scale` float32 [1] = 448 * 6 / calibration max|x|,
  and per 16 inputs of a row a group scale computed at run time as for the weights
  (compressed-tensors' dynamic "local").
Scales and rounding in float32, the result in x's dtype.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from algorithms.floatq import (
    NVFP4_GROUP,
    QMAX,
    ActivationScheme,
    FloatWeight,
    e2m1_values,
    global_scale,
    group_scales,
    nvfp4_codes,
    to_fp8,
)


def static_input_scale(absmax: float, activations: ActivationScheme) -> torch.Tensor:
    """The stored activation scale float32 [1] from calibration's max |x| over a linear's
    input: absmax / qmax (input_scale of fp8, int8), or nvfp4's input_global_scale."""
    if activations.dynamic:
        raise ValueError(f"{activations.name} activations are dynamic: they store no scale")
    if not absmax > 0 or absmax == float("inf"):
        raise ValueError(f"calibration max |x| must be positive and finite, got {absmax}")
    if activations.kind == "nvfp4":
        return global_scale(float(absmax))
    return torch.tensor([absmax / QMAX[activations.kind]], dtype=torch.float32)


def with_activation_scale(fw: FloatWeight, absmax: float) -> FloatWeight:
    """fw with the static activation scale of calibration's max |x| attached."""
    act = fw.scheme.activations
    if act is None:
        raise ValueError(f"{fw.scheme.name} has no activation quantization")
    scale = static_input_scale(absmax, act)
    return replace(fw, **{"input_global_scale" if act.kind == "nvfp4" else "input_scale": scale})


def activation_codes(
    x: torch.Tensor, act: ActivationScheme, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 / int8 activations x [..., in] -> (codes [..., in] as float8_e4m3fn | int8, their
    scales float32 [..., 1] (per token) or [1]); scale: the stored input_scale when static."""
    xf = x.float()
    qmax = QMAX[act.kind]
    if act.dynamic:
        absmax = xf.abs().amax(dim=-1, keepdim=True) if act.strategy == "token" else xf.abs().amax().reshape(1)
        scale = torch.where(absmax == 0, 1.0, absmax / qmax)  # [..., 1] | [1]
    elif scale is None:
        raise ValueError(f"static {act.name} activations need their input_scale from calibration")
    scale = scale.float()
    if act.kind == "fp8":
        return to_fp8(xf / scale), scale
    return torch.round(xf / scale).clamp(-128, 127).to(torch.int8), scale


def quantize_activations(x: torch.Tensor, act: ActivationScheme, scale: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] as the matmul sees it after quantization (quantized, then dequantized),
    in x's dtype; scale: the stored input_scale (static fp8, int8) or input_global_scale (nvfp4)."""
    if act.kind != "nvfp4":
        codes, s = activation_codes(x, act, scale)
        return (codes.float() * s).to(x.dtype)
    if scale is None:
        raise ValueError("nvfp4 activations need their input_global_scale from calibration")
    *lead, n = x.shape
    if n % NVFP4_GROUP:
        raise ValueError(f"nvfp4 activations: input size {n} is not a multiple of {NVFP4_GROUP}")
    xg = x.float().reshape(*lead, n // NVFP4_GROUP, NVFP4_GROUP)  # [..., groups, 16]
    g = scale.float().reshape(1)
    s = group_scales(xg.abs().amax(dim=-1), g)  # [..., groups] fp8
    values = e2m1_values(nvfp4_codes(xg, s, g)) * (s.float() / g)[..., None]  # [..., groups, 16]
    return values.reshape(*lead, n).to(x.dtype)
