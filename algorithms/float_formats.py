"""The float schemes (algorithms/floatq.py) in compressed-tensors' layouts, as vLLM loads them.

A FloatWeight already holds compressed-tensors' tensors under its names, so a linear's
export is its own tensors, checked:
- `float-quantized` (FP8; also FP8 weight-only, which vLLM runs as W8A16):
  `weight` float8_e4m3fn [out, in], `weight_scale` float32 [out, 1] | [1], and for static
  activations `input_scale` float32 [1];
- `int-quantized` (W8A8 int8): `weight` int8 [out, in], `weight_scale` float32 [out, 1] | [1],
  and for static activations `input_scale` float32 [1];
- `nvfp4-pack-quantized`: `weight_packed` uint8 [out, in / 2], `weight_scale` float8_e4m3fn
  [out, in / 16], `weight_global_scale` float32 [1], and for W4A4 `input_global_scale`
  float32 [1].
vLLM fuses q/k/v and gate/up and keeps one weight_global_scale (the max) and one input
scale per fused layer: NVFP4 linears that it fuses must share their global scale
(floatq.shared_global_scale), and static activation scales are the same for linears that
read the same input.

The config's quantization args are those of llm-compressor's presets of the same schemes
(FP8, FP8_DYNAMIC, W8A8, NVFP4, NVFP4A16), without the observers (calibration's, not the
checkpoint's).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from algorithms.floatq import NVFP4_GROUP, ActivationScheme, FloatScheme, FloatWeight

CT_FORMATS = {"fp8": "float-quantized", "int8": "int-quantized", "nvfp4": "nvfp4-pack-quantized"}
CT_STRATEGIES = {"token": "token", "tensor": "tensor", "channel": "channel", "group": "tensor_group"}


def _args(kind: str, strategy: str, dynamic: bool | str) -> dict:
    """compressed-tensors' QuantizationArgs of one side (weights or input activations)."""
    nvfp4 = kind == "nvfp4"
    args = {
        "num_bits": 4 if nvfp4 else 8,
        "type": "int" if kind == "int8" else "float",
        "symmetric": True,
        "group_size": NVFP4_GROUP if nvfp4 else None,
        "strategy": CT_STRATEGIES[strategy],
        "dynamic": dynamic,
    }
    return {**args, "scale_dtype": "torch.float8_e4m3fn"} if nvfp4 else args


def weight_args(scheme: FloatScheme) -> dict:
    return _args(scheme.kind, scheme.weight_strategy, False)


def activation_args(act: ActivationScheme | None) -> dict | None:
    """nvfp4's activations are compressed-tensors' dynamic "local": a static global scale,
    group scales per call."""
    if act is None:
        return None
    return _args(act.kind, act.strategy, "local" if act.kind == "nvfp4" else act.dynamic)


def compressed_tensors_float_config(scheme: FloatScheme, *, ignore: Iterable[str]) -> dict:
    """quantization_config as compressed-tensors' QuantizationConfig and vLLM read it: one
    config group for every nn.Linear except the `ignore` module names (lm_head and the
    linears kept in full precision)."""
    fmt = CT_FORMATS[scheme.kind]
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weight_args(scheme),
                "input_activations": activation_args(scheme.activations),
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def compressed_tensors_float_tensors(fw: FloatWeight) -> dict[str, torch.Tensor]:
    """One linear in its compressed-tensors layout, by suffix. Raises for a scheme with
    static activations whose scale calibration has not attached."""
    if fw.scheme.static_activations and fw.activation_scale is None:
        name = "input_global_scale" if fw.scheme.kind == "nvfp4" else "input_scale"
        raise ValueError(f"{fw.scheme.name}: static activations without their {name} (from calibration)")
    return {name: t.contiguous() for name, t in fw.tensors().items()}
