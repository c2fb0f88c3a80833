"""The native formats' tensors in the layouts serving engines load. Pure tensor math; the
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

- AWQ GEMM (AutoAWQ's WQLinear_GEMM, as transformers and vLLM load `quant_method: awq`,
  `version: gemm`; 4 bits only): `qweight` int32 [in, out / 8] and `qzeros` int32
  [groups, out / 8], each word eight 4-bit codes of consecutive outputs in the
  interleaved order AWQ_ORDER (nibble k holds output 8c + AWQ_ORDER[k]), zero points
  stored as they are; `scales` float16 [groups, out]; W = (q - zero) * scale.

The codebook format is stored in AQLM's Hugging Face layout already (algorithms/codebook.py),
so its export checks the tensors and passes them on:
- AQLM (transformers with the `aqlm` package): `codes` int8 | int16 [out, in / g, M],
  `codebooks` float16 [M, 2**nbits, 1, g], `scales` float16 [out, 1, 1, 1], and one
  `quantization_config` (`aqlm_config`) for every quantized linear of the model.

The vector format is stored in the `vptq` package's layout already (algorithms/vector.py),
so its export checks the tensors, renames the codebooks and casts the floats:
- VPTQ (`vptq.AutoModelForCausalLM`, transformers' VPTQ integration): the state dict of
  `vptq.VQuantLinear` with packed indices, whose codebooks are nn.Embeddings
  (`centroids.weight`, `res_centroids.weight`, `outlier_centroids.weight`), and a
  `quantization_config` (`vptq_config`) holding each quantized linear's constructor
  arguments (`vptq_layer`). VQuantLinear holds its codebooks and normalisation in the
  model's dtype (the loaders cast what they read to it), so the export writes them in
  that dtype: the float16 values exactly in a float32 or float16 model, rounded in a
  bfloat16 one (as loading float16 into it would round them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from algorithms.codebook import CodebookScheme, CodebookWeight
from algorithms.packing import codes_per_run, pack, unpack
from algorithms.types import QuantizedWeight
from algorithms.vector import VectorScheme, VectorWeight


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


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output each nibble of an AWQ word holds, lowest nibble first


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [rows, out] -> int32 [rows, out / 8] in AWQ's interleaved nibble order."""
    rows, out = codes.shape
    if out % 8:
        raise ValueError(f"AWQ's format packs 8 outputs per word: {out} outputs is not a multiple of 8")
    runs = codes.to(torch.int64).reshape(rows, out // 8, 8)[:, :, list(AWQ_ORDER)]  # [rows, out/8, 8]
    words = (runs << (4 * torch.arange(8))).sum(dim=-1)  # [rows, out/8], in [0, 2**32)
    return words.to(torch.uint32).view(torch.int32)


def awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, out / 8] in AWQ's order -> codes int32 [rows, out]."""
    rows, n = words.shape
    nibbles = (words.to(torch.int64)[:, :, None] >> (4 * torch.arange(8))) & 15  # [rows, n, 8]
    codes = torch.empty_like(nibbles)
    codes[:, :, list(AWQ_ORDER)] = nibbles
    return codes.reshape(rows, n * 8).to(torch.int32)


def awq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One linear in AWQ's GEMM layout, by suffix. Needs 4 bits and groups that are runs of
    consecutive columns (the format has no g_idx)."""
    if qw.bits != 4:
        raise ValueError(f"AWQ's GEMM format holds 4-bit codes, not {qw.bits}-bit")
    if qw.g_idx is not None:
        raise ValueError("groups in solve order (g_idx) cannot be stored: AWQ's format has no g_idx")
    codes = unpack(qw.qweight, qw.bits)  # [out, in]
    return {
        "qweight": awq_pack(codes.T),
        "qzeros": awq_pack(qw.zeros.T),
        "scales": qw.scales.T.contiguous(),
    }


def aqlm_tensors(cw: CodebookWeight) -> dict[str, torch.Tensor]:
    """One linear in AQLM's layout (the parameters of `aqlm.QuantizedLinear`), by suffix:
    the codebook format's own tensors, their shapes and dtypes checked."""
    s = cw.scheme  # raises for a codebook size that is not a power of two in 2..2**16
    out, groups = cw.codes.shape[:2]
    want = {
        "codes": ((out, groups, s.num_codebooks), s.code_dtype),
        "codebooks": ((s.num_codebooks, s.codebook_size, 1, s.in_group_size), torch.float16),
        "scales": ((out, 1, 1, 1), torch.float16),
    }
    tensors = cw.tensors()
    for name, (shape, dtype) in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"AQLM {s.name} {name}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    return {name: t.contiguous() for name, t in tensors.items()}


def aqlm_config(scheme: CodebookScheme, *, unquantized: Iterable[str]) -> dict:
    """quantization_config as transformers' AqlmConfig reads it. transformers replaces every
    nn.Linear of the model by aqlm's QuantizedLinear except those `linear_weights_not_to_quantize`
    names; `unquantized` are their module names (lm_head, linears kept in full precision).
    transformers 4 compares "<module>.weight" with each entry and transformers 5 matches
    module names (as a prefix, a regex or a suffix), so both spellings are listed.

    >>> aqlm_config(CodebookScheme(num_codebooks=1, nbits_per_codebook=16), unquantized=["lm_head"])
    ... # doctest: +NORMALIZE_WHITESPACE
    {'quant_method': 'aqlm', 'nbits_per_codebook': 16, 'num_codebooks': 1, 'in_group_size': 8,
     'out_group_size': 1, 'linear_weights_not_to_quantize': ['lm_head.weight', 'lm_head']}
    """
    modules = list(unquantized)
    return {
        "quant_method": "aqlm",
        **scheme.fields(),
        "linear_weights_not_to_quantize": [*(f"{m}.weight" for m in modules), *modules],
    }


EMBEDDINGS = ("centroids", "res_centroids", "outlier_centroids")  # nn.Embedding in VQuantLinear: "<name>.weight"


def vector_layout(scheme: VectorScheme, out_features: int, in_features: int) -> dict[str, tuple[tuple, torch.dtype]]:
    """The tensors of one linear of `scheme` in the vector format, by suffix: (shape, dtype).
    Raises ValueError for what vptq cannot read: outliers in vectors of length 1
    (VQuantLinear then ignores its outliers), or a row of packed indices whose padding is
    not less than its bits (vptq's unpack_index_tensor takes the padding to be words * 32
    mod bits)."""
    s = scheme
    n, gs = s.layout(out_features, in_features)  # raises for vectors or groups that do not fit
    bits = gs * (s.index_bits + s.res_bits)  # of one vector row of a group
    words = math.ceil(bits / 32)
    if words * 32 - bits >= bits:
        drop = f"it would drop {words * 32 % bits} padding bits, not {words * 32 - bits}"
        raise ValueError(f"vptq cannot unpack {gs} indices of {bits // gs} bits in {words} words ({drop})")
    layout = {
        "indices": ((s.group_num, out_features // s.vector_len, words), torch.int32),
        "centroids": ((s.group_num, s.num_centroids * s.vector_len), torch.float16),
        "perm": ((in_features,), torch.int16),
    }
    if s.num_res_centroids:
        layout["res_centroids"] = ((s.group_num, s.num_res_centroids * s.vector_len), torch.float16)
    if n:
        layout["outlier_indices"] = ((1, out_features // s.outlier_vector_len, n), torch.int16)
        layout["outlier_centroids"] = ((1, s.outlier_centroids * s.outlier_vector_len), torch.float16)
    if s.normalize:
        layout["weight_scale"] = layout["weight_bias"] = ((in_features,), torch.float16)
    return layout


def vptq_tensors(vw: VectorWeight, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One linear in vptq's layout (the state dict of `vptq.VQuantLinear`), by suffix: the
    vector format's own tensors, their shapes and dtypes checked, the codebooks renamed to
    their Embedding's weight and the float tensors cast to `dtype` (the model's)."""
    want = vector_layout(vw.scheme, vw.out_features, vw.in_features)
    tensors = vw.tensors()
    if set(tensors) != set(want):
        raise ValueError(f"vptq {vw.scheme.name}: tensors {sorted(tensors)}, expected {sorted(want)}")
    for name, (shape, kind) in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != kind:
            got = f"{t.dtype} {list(t.shape)}"
            raise ValueError(f"vptq {vw.scheme.name} {name}: expected {kind} {list(shape)}, got {got}")
    return {
        f"{name}.weight" if name in EMBEDDINGS else name: (t.to(dtype) if t.is_floating_point() else t).contiguous()
        for name, t in tensors.items()
    }


def vptq_layer(scheme: VectorScheme, out_features: int, in_features: int, *, bias: bool = False) -> dict:
    """VQuantLinear's constructor arguments for one linear, as vptq's config_for_layers
    holds them: [outlier, main] vector lengths and codebook sizes, -1 for none.

    >>> vptq_layer(VectorScheme(vector_len=4, num_centroids=256, normalize=False), 8, 16)
    ... # doctest: +NORMALIZE_WHITESPACE
    {'in_features': 16, 'out_features': 8, 'vector_lens': [-1, 4], 'num_centroids': [-1, 256],
     'num_res_centroids': [-1, -1], 'group_num': 1, 'group_size': 16, 'outlier_size': 0,
     'indices_as_float': False, 'enable_norm': False, 'enable_perm': True, 'is_indice_packed': True, 'bias': False}
    """
    s = scheme
    n, gs = s.layout(out_features, in_features)
    return {
        "in_features": in_features,
        "out_features": out_features,
        "vector_lens": [s.outlier_vector_len if n else -1, s.vector_len],
        "num_centroids": [s.outlier_centroids if n else -1, s.num_centroids],
        "num_res_centroids": [-1, s.num_res_centroids or -1],
        "group_num": s.group_num,
        "group_size": gs,
        "outlier_size": n,
        "indices_as_float": False,
        "enable_norm": s.normalize,
        "enable_perm": True,
        "is_indice_packed": True,
        "bias": bias,
    }


def vptq_config(layers: Mapping[str, dict], *, unquantized: Iterable[str]) -> dict:
    """quantization_config as vptq's loader and transformers' VptqConfig read it: `layers`,
    each quantized linear's `vptq_layer` by module name; `unquantized`, the module names of
    the other linears (lm_head, those kept in full precision), which transformers would
    otherwise replace too. Every linear is named in config_for_layers: transformers looks
    shared_layer_config up by the second part of a module's name ("layers"), not its own."""
    return {
        "quant_method": "vptq",
        "config_for_layers": dict(layers),
        "shared_layer_config": {},
        "modules_to_not_convert": list(unquantized),
    }
