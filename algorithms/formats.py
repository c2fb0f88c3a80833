"""The uniform format's tensors in the layouts serving engines load. Pure tensor math; the
streaming of an export is pipeline/export.py's.

Both layouts below use lamina's bit stream (algorithms/packing.py): code j of a packed run
at bits [j * bits, (j + 1) * bits), lowest bit first, so the codes themselves are never
repacked, only transposed or relabelled.

- GPTQ (AutoGPTQ / GPTQModel checkpoint_format "gptq", as transformers and vLLM load it):
  `qweight` int32 [in * bits / 32, out] (packed along the input, one column per output),
  `qzeros` int32 [groups, out * bits / 32] holding zero - 1 (the format's historical
  offset, added back by every loader), `scales` float16 [groups, out], `g_idx` int32 [in].
- compressed-tensors `pack-quantized` (vLLM): `weight_packed` int32 [out, in * bits / 32]
  holding the signed code + 2**(bits-1), which is lamina's unsigned code; `weight_scale`
  [out, groups]; `weight_shape` [2]; for asymmetric grids `weight_zero_point` int32
  [out * bits / 32, groups], packed along the output.
"""

from __future__ import annotations

import torch

from algorithms.packing import codes_per_run, pack
from algorithms.types import QuantizedWeight


def pack_padded(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [rows, n] along n as one bit stream whose last word is filled with zero
    bits when n is not a multiple of a run: int32 [rows, ceil(n * bits / 32)]."""
    rows, n = codes.shape
    padded = -n % codes_per_run(bits)
    full = torch.cat([codes, codes.new_zeros(rows, padded)], dim=1)  # [rows, n + padded]
    return pack(full, bits)[:, : -(-n * bits // 32)].contiguous()


def gptq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One linear in GPTQ's layout, by suffix. Raises if a zero point is 0: the format
    stores zero - 1 in `bits` bits and so cannot hold it."""
    zeros = qw.zeros.to(torch.int64)  # [out, groups]
    if bool((zeros == 0).any()):
        count = int((zeros == 0).sum())
        raise ValueError(f"{count} groups have zero point 0, which GPTQ's format (it stores zero - 1) cannot hold")
    g_idx = qw.g_idx if qw.g_idx is not None else torch.arange(qw.in_features) // qw.group_size
    return {
        "qweight": qw.qweight.T.contiguous(),
        "qzeros": pack_padded((zeros - 1).T, qw.bits),
        "scales": qw.scales.T.contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def compressed_tensors_tensors(qw: QuantizedWeight, *, sym: bool) -> dict[str, torch.Tensor]:
    """One linear in compressed-tensors' pack-quantized layout, by suffix. Groups must be
    runs of consecutive columns: the format dropped `g_idx` (activation ordering "group")."""
    if qw.g_idx is not None:
        raise ValueError("groups in solve order (g_idx) cannot be stored: pack-quantized has no g_idx")
    tensors = {
        "weight_packed": qw.qweight.contiguous(),
        "weight_scale": qw.scales.contiguous(),
        "weight_shape": torch.tensor([qw.out_features, qw.in_features], dtype=torch.int64),
    }
    if not sym:
        tensors["weight_zero_point"] = pack_padded(qw.zeros.T, qw.bits).T.contiguous()
    return tensors
