"""GGUF's block quantization types, and llama.cpp's choice of type per tensor for a file type.

Block types (ggml-quants.c, the reference quantizers llama.cpp uses without an importance
matrix; block layouts as ggml-common.h declares them):

- Q8_0, Q4_0, Q5_0, Q5_1 (32 weights a block, one fp16 scale): the `gguf` package's own
  quantizers (`gguf.quants.quantize`).
- Q4_K, Q5_K (256 weights: 8 sub-blocks of 32 with a 6-bit scale and a 6-bit min each, two
  fp16 super-block scales) and Q6_K (256 weights: 16 sub-blocks of 16, an int8 scale each,
  one fp16 super-block scale): `gguf` only dequantizes these, so they are written here, the
  algorithm of `quantize_row_q{4,5,6}_K_ref` vectorised over blocks:
    1. each sub-block's (scale, min) by `make_qkx2_quants` (K4/K5: a weighted least-squares
       fit of an affine grid over 21 / 16 trial ranges) or `make_qx_quants` (K6: a
       symmetric grid over 19 trial scales, the |x|^2-weighted best);
    2. the sub-block scales (and mins) quantized to 6 (K6: 8) bits against the largest;
    3. the weights re-rounded against the scales as stored, then packed.
  Arithmetic is float32 and rounding half-to-even, as in C; sums may add in another order
  than C's loops, so a rare tie can pick another trial than llama.cpp does (the bytes are
  still valid blocks, decoded by `gguf` to exactly what `decoded` says).

File types (llama.cpp `src/llama-quant.cpp`, `llama_tensor_get_type` with default options:
no importance matrix, output tensor quantized, not "pure"): see `tensor_type`.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

Type = GGMLQuantizationType
QK_K = 256  # weights in a K-quant super-block
GROUP_MAX_EPS = 1e-15  # ggml: a (sub-)block whose largest |x| is below this is all zeros
CHUNK = 1 << 18  # weights a K-quant fit handles at once (bounds the temporaries; the unit of `pool`)
F32 = np.float32


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even (its float trick), as an int64 tensor."""
    return torch.round(x).long()


def rdiv(a: float, t: torch.Tensor) -> torch.Tensor:
    """a / t rounded once, as C divides (torch computes scalar / tensor as a * (1 / t))."""
    return torch.full_like(t, a) / t


def as_fp16(x: torch.Tensor) -> torch.Tensor:
    """What GGML_FP32_TO_FP16 then GGML_FP16_TO_FP32 make of float32 values."""
    return x.half().float()


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] float32 -> [n, 2] uint8, little-endian fp16."""
    return x.half().reshape(-1, 1).view(torch.uint8)


# --- sub-block fits -------------------------------------------------------------------------------


def ordered_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the first dimension left to right, as C's loops add: t [k, ...] -> [...].
    (torch's reductions add in another order, and the fits compare sums that differ in the
    last bits: this keeps their choices llama.cpp's.)"""
    acc = t[0].clone()
    for row in t[1:]:
        acc += row
    return acc


def make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, *, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine grid x ~ scale * L - offset, L in [0, nmax], per column of x [k, n] (weights w
    [k, n]). Start from the min-max grid; then for s = 0..nstep round x against the range
    (nmax + rmin + rdelta * s) / (max - min), fit (scale, min) to those codes by weighted least
    squares, and keep the fit if its weighted squared error is the least so far. As in C, the
    trials measure from the best min so far, so each depends on the ones before it.
    -> (L [k, n] float codes, scale [n], offset [n] >= 0)."""
    lo = x.min(dim=0).values.clamp(max=0)  # [n] the grid always reaches 0
    hi = x.max(dim=0).values  # [n]
    flat = hi == lo  # [n] nothing to fit: all codes 0
    hi = torch.where(flat, lo + 1, hi)
    sum_w, sum_x = ordered_sum(w), ordered_sum(w * x)  # [n]

    def error(scale: torch.Tensor, low: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        diff = L * scale  # [k, n] (scale * L + min - x)^2, weighted, in C's order
        diff += low
        diff -= x
        diff *= diff
        diff *= w
        return ordered_sum(diff)  # [n]

    iscale = rdiv(nmax, hi - lo)  # [n]
    L = torch.round((x - lo) * iscale).clamp_(0, nmax)  # [k, n]
    scale, low = rdiv(1, iscale), lo  # [n]
    best = error(scale, low, L)
    for step in range(nstep + 1):
        iscale = rdiv(F32(rmin) + F32(rdelta) * F32(step) + F32(nmax), hi - low)  # [n] from the best min so far
        La = torch.round((x - low) * iscale).clamp_(0, nmax)  # [k, n]
        wL = w * La
        sum_l, sum_l2, sum_xl = ordered_sum(wL), ordered_sum(wL * La), ordered_sum(wL * x)  # [n]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0  # a grid above 0: refit the scale alone, min 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = error(this_scale, this_min, La)
        better = (D > 0) & (err < best)  # [n] NaN errors compare false
        L = torch.where(better, La, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return L, scale, -torch.where(flat, lo, low)


def make_qx_quants(x: torch.Tensor, *, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric grid x ~ scale * (L - nmax), L in [0, 2 nmax), per column of x [k, n], the
    weights x^2 (rmse_type 1): the grid that maps the largest |x| to -nmax, then the trial
    scales -(nmax + 0.1 s) / max, s = -9..9, each with its least-squares scale; in turn, a
    trial replaces the best so far when its sum(w x l)^2 / sum(w l^2) is larger.
    -> (L [k, n] float codes, scale [n])."""
    top = x.gather(0, x.abs().argmax(dim=0, keepdim=True)).squeeze(0)  # [n] signed, the first largest |x|
    zero = top.abs() < GROUP_MAX_EPS  # [n]
    top = torch.where(zero, torch.ones_like(top), top)
    trials = np.array([0, *range(-9, 0), *range(1, 10)], dtype=F32)  # [T] the first: nmax itself
    iscale = -torch.from_numpy(F32(nmax) + F32(0.1) * trials) / top[:, None]  # [n, T]
    iscale[:, 0] = rdiv(-nmax, top)
    codes = torch.round(x[:, :, None] * iscale).clamp_(-nmax, nmax - 1)  # [k, n, T] signed
    w = x * x  # [k, n]
    sumlx = ordered_sum((w * x)[:, :, None] * codes)  # [n, T]
    suml2 = ordered_sum(w[:, :, None] * codes * codes)
    pick = torch.zeros_like(top, dtype=torch.long)  # [n]
    scale = torch.where(suml2[:, 0] > 0, sumlx[:, 0] / suml2[:, 0], torch.zeros_like(top))
    best = scale * sumlx[:, 0]
    for t in range(1, len(trials)):
        slx, sl2 = sumlx[:, t], suml2[:, t]
        better = (sl2 > 0) & (slx * slx > best * sl2)
        pick = torch.where(better, t, pick)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    L = codes.gather(2, pick[None, :, None].expand(x.shape[0], -1, 1)).squeeze(2) + nmax  # [k, n]
    L = torch.where(zero, torch.zeros_like(L), L)
    return L, torch.where(zero, torch.zeros_like(scale), scale)


# --- K-quant blocks -----------------------------------------------------------------------------


def k_scales(scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 8 sub-block scales and mins [n, 8] of a Q4_K/Q5_K block as 6-bit multiples of two
    fp16 super-block scales. -> (d [n], dmin [n] as stored, sc [n, 8], m [n, 8], packed [n, 12])."""
    max_scale, max_min = scales.max(dim=1).values, mins.max(dim=1).values  # [n]
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))  # +0, never -0, as C's
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_scale = torch.where(max_scale > 0, rdiv(63, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, rdiv(63, max_min), torch.zeros_like(max_min))
    sc = nearest_int(inv_scale[:, None] * scales).clamp(0, 63)  # [n, 8]
    m = nearest_int(inv_min[:, None] * mins).clamp(0, 63)  # [n, 8]
    packed = torch.cat(  # bytes 0-3: sc 0-3 + top bits of sc 4-7; 4-7: m likewise; 8-11: low bits of sc/m 4-7
        [sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6, (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4],
        dim=1,
    )  # [n, 12]
    return as_fp16(max_scale / 63), as_fp16(max_min / 63), sc, m, packed.to(torch.uint8)


def fit_k_affine(x: torch.Tensor, *, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, ...]:
    """Q4_K / Q5_K on super-blocks x [n, 256]: -> (header [n, 16] bytes, L [n, 256], decoded [n, 256])."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32).T.contiguous()  # [32, n*8] sub-blocks as columns
    av_x = (ordered_sum(sub * sub) / 32).double().sqrt().float()  # [n*8] correctly rounded, as sqrtf
    w = av_x + sub.abs()  # [32, n*8] ggml's weights without an importance matrix
    L, scale, offset = make_qkx2_quants(sub, w, nmax=nmax, rmin=rmin, rdelta=0.1, nstep=nstep)
    d, dmin, sc, m, packed = k_scales(scale.reshape(n, 8), offset.reshape(n, 8))
    step = (d[:, None] * sc.float()).reshape(n * 8)  # [n*8] as the decoder computes it
    shift = (dmin[:, None] * m.float()).reshape(n * 8)
    requant = torch.round((sub + shift) / step).clamp_(0, nmax)  # [32, n*8]
    L = torch.where(step != 0, requant, L)  # a zero step keeps the fit's codes (they decode alike)
    decoded = (step * L - shift).T.reshape(n, QK_K)
    header = torch.cat([fp16_bytes(d), fp16_bytes(dmin), packed], dim=1)  # [n, 16]
    return header, L.T.reshape(n, QK_K).long(), decoded


def nibbles(L: torch.Tensor) -> torch.Tensor:
    """Codes [n, 256] -> [n, 128] bytes: each 64 codes as 32 bytes, low nibble the first 32."""
    pairs = (L & 15).reshape(-1, 4, 2, 32)  # [n, 4 runs of 64, halves, 32]
    return (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(-1, 128).to(torch.uint8)


def q4_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block_q4_K: d, dmin (fp16), scales[12], qs[128]. x [n, 256] -> (bytes [n, 144], decoded)."""
    header, L, decoded = fit_k_affine(x, nmax=15, rmin=-1.0, nstep=20)
    return torch.cat([header, nibbles(L)], dim=1), decoded


def q5_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block_q5_K: d, dmin, scales[12], qh[32] (the 5th bits), qs[128]. -> (bytes [n, 176], decoded)."""
    header, L, decoded = fit_k_affine(x, nmax=31, rmin=-0.5, nstep=15)
    high = (L >> 4).reshape(-1, 8, 32)  # [n, 8 sub-blocks, 32]: bit b of qh[j] is sub-block b's code j
    qh = (high << torch.arange(8).reshape(1, 8, 1)).sum(1).to(torch.uint8)  # [n, 32]
    return torch.cat([header, qh, nibbles(L)], dim=1), decoded


def q6_k(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """block_q6_K: ql[128], qh[64], scales[16] (int8), d (fp16). x [n, 256] -> (bytes [n, 210], decoded)."""
    n = x.shape[0]
    sub = x.reshape(n * 16, 16).T.contiguous()  # [16, n*16] sub-blocks as columns
    L, scale = make_qx_quants(sub, nmax=32)  # L in [0, 64)
    scale = scale.reshape(n, 16)
    top = scale.gather(1, scale.abs().argmax(dim=1, keepdim=True)).squeeze(1)  # [n] signed largest
    zero = top.abs() < GROUP_MAX_EPS  # [n] the whole block is stored as zeros
    iscale = rdiv(-128, torch.where(zero, torch.ones_like(top), top))  # [n]
    d = torch.where(zero, torch.zeros_like(top), as_fp16(rdiv(1, iscale)))  # [n]
    sc = nearest_int(iscale[:, None] * scale).clamp(max=127)  # [n, 16], >= -128
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    step = (d[:, None] * sc.float()).reshape(n * 16)  # [n*16]
    requant = torch.round(sub / step).clamp_(-32, 31) + 32  # [16, n*16]
    L = torch.where(step != 0, requant, L)
    L = torch.where(zero.repeat_interleave(16), torch.zeros_like(L), L)
    decoded = (step * (L - 32)).T.reshape(n, QK_K)
    L = L.T.reshape(n, QK_K).long()
    quarters = L.reshape(n, 2, 4, 32)  # [n, halves of 128, quarters of 32, 32]
    low = quarters & 15
    ql = torch.cat([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], dim=2)  # [n, 2, 64]
    qh = ((quarters >> 4) << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2)  # [n, 2, 32]
    parts = [ql.reshape(n, 128), qh.reshape(n, 64), sc.to(torch.int8).view(torch.uint8), fp16_bytes(d)]
    return torch.cat([p.to(torch.uint8) for p in parts], dim=1), decoded


K_QUANTS = {Type.Q4_K: q4_k, Type.Q5_K: q5_k, Type.Q6_K: q6_k}
BY_GGUF = (Type.Q8_0, Type.Q4_0, Type.Q5_0, Type.Q5_1)  # types the gguf package quantizes itself
FLOAT = {Type.F32: np.float32, Type.F16: np.float16}


def block_size(qtype: Type) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: Type, cols: int) -> int:
    size, nbytes = GGML_QUANT_SIZES[qtype]
    return cols // size * nbytes


def quantize(W: torch.Tensor, qtype: Type, *, pool: Executor | None = None) -> np.ndarray:
    """W [rows, cols] -> the tensor's GGUF data: uint8 [rows, row_bytes] for block types, the
    float array itself for F32/F16. Raises ValueError for non-finite weights or a row length
    the type's block does not divide. `pool` quantizes the K-quants' row chunks in parallel
    (the bytes do not depend on it)."""
    W = W.detach().float().cpu()
    if not bool(torch.isfinite(W).all()):
        raise ValueError("weights hold NaN or infinity")
    if qtype in FLOAT:
        return W.numpy().astype(FLOAT[qtype])
    rows, cols = W.shape
    if cols % block_size(qtype):
        raise ValueError(f"{qtype.name} needs rows of a multiple of {block_size(qtype)} weights, not {cols}")
    if qtype in BY_GGUF:
        return gguf_quants.quantize(W.numpy(), qtype)
    if qtype not in K_QUANTS:
        raise ValueError(f"no quantizer for {qtype.name}")
    step = max(1, CHUNK // cols)
    chunks = [W[r : r + step].reshape(-1, QK_K) for r in range(0, rows, step)]  # [rows*cols/256, 256] each

    def blocks(x: torch.Tensor) -> torch.Tensor:
        return K_QUANTS[qtype](x)[0]

    parts = list(pool.map(blocks, chunks) if pool is not None else map(blocks, chunks))
    return torch.cat(parts).reshape(rows, row_bytes(qtype, cols)).numpy()


def dequantize(data: np.ndarray, qtype: Type) -> torch.Tensor:
    """The weights [rows, cols] a tensor's GGUF data decodes to (our decoder, for checking)."""
    if qtype in FLOAT:
        return torch.from_numpy(np.asarray(data, dtype=np.float32).copy())
    nbytes = GGML_QUANT_SIZES[qtype][1]
    rows = data.shape[0]
    blocks = torch.from_numpy(np.require(data, np.uint8, ["C", "W"])).reshape(-1, nbytes)  # [n, nbytes]
    return DECODERS[qtype](blocks).reshape(rows, -1)


def fp16_at(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def low_high(qs: torch.Tensor) -> torch.Tensor:
    """Bytes [n, b] -> nibbles [n, 2b]: all low nibbles, then all high ones (ggml's 32-block order)."""
    return torch.cat([qs & 15, qs >> 4], dim=1).long()


def fifth_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """A little-endian bit field [n, count / 8] bytes -> [n, count] bits."""
    return ((qh.long()[:, :, None] >> torch.arange(8)) & 1).reshape(qh.shape[0], count)


def decode_q8_0(b: torch.Tensor) -> torch.Tensor:
    return fp16_at(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()


def decode_q4_0(b: torch.Tensor) -> torch.Tensor:
    return fp16_at(b, 0) * (low_high(b[:, 2:]) - 8).float()


def decode_q5_0(b: torch.Tensor) -> torch.Tensor:
    return fp16_at(b, 0) * ((low_high(b[:, 6:]) | fifth_bits(b[:, 2:6], 32) << 4) - 16).float()


def decode_q5_1(b: torch.Tensor) -> torch.Tensor:
    return fp16_at(b, 0) * (low_high(b[:, 8:]) | fifth_bits(b[:, 4:8], 32) << 4).float() + fp16_at(b, 2)


def k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes [n, 12] -> 6-bit sub-block scales and mins [n, 8] (get_scale_min_k4)."""
    p = packed.long()
    sc = torch.cat([p[:, 0:4] & 63, (p[:, 8:12] & 15) | (p[:, 0:4] >> 6) << 4], dim=1)
    m = torch.cat([p[:, 4:8] & 63, (p[:, 8:12] >> 4) | (p[:, 4:8] >> 6) << 4], dim=1)
    return sc, m


def decode_k_affine(b: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: d * sc * L - dmin * m per sub-block of 32; codes [n, 256]."""
    sc, m = k_scale_min(b[:, 4:16])
    step = (fp16_at(b, 0) * sc.float())[:, :, None]  # [n, 8, 1]
    shift = (fp16_at(b, 2) * m.float())[:, :, None]
    return (step * codes.reshape(-1, 8, 32).float() - shift).reshape(-1, QK_K)


def k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs [n, 128] -> codes [n, 256] (inverse of `nibbles`)."""
    pairs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([pairs & 15, pairs >> 4], dim=2).reshape(-1, QK_K).long()


def decode_q4_k(b: torch.Tensor) -> torch.Tensor:
    return decode_k_affine(b, k_nibbles(b[:, 16:144]))


def decode_q5_k(b: torch.Tensor) -> torch.Tensor:
    high = ((b[:, 16:48].long()[:, None, :] >> torch.arange(8).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)
    return decode_k_affine(b, k_nibbles(b[:, 48:176]) | high << 4)


def decode_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = b[:, :128].long().reshape(n, 2, 2, 32)  # [n, halves, (q1|q3, q2|q4), 32]
    qh = b[:, 128:192].long().reshape(n, 2, 1, 32) >> (2 * torch.arange(4)).reshape(1, 1, 4, 1)  # [n, 2, 4, 32]
    low = torch.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
    codes = (low | (qh & 3) << 4).reshape(n, 16, 16) - 32  # [n, sub-blocks, 16]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    return ((fp16_at(b, 208) * sc)[:, :, None] * codes.float()).reshape(n, QK_K)


DECODERS = {
    Type.Q8_0: decode_q8_0,
    Type.Q4_0: decode_q4_0,
    Type.Q5_0: decode_q5_0,
    Type.Q5_1: decode_q5_1,
    Type.Q4_K: decode_q4_k,
    Type.Q5_K: decode_q5_k,
    Type.Q6_K: decode_q6_k,
}


# --- llama.cpp's file types: which block type each tensor gets --------------------------------


@dataclass(frozen=True)
class FileType:
    name: str  # as llama-quantize names it, e.g. "Q4_K_M"
    ftype: LlamaFileType  # general.file_type
    default: Type  # the type of most 2-D weights
    more_bits: bool = False  # the _M mixtures: Q6_K for attn_v and ffn_down of some layers


FILE_TYPES = {
    ft.name: ft
    for ft in (
        FileType("F16", LlamaFileType.MOSTLY_F16, Type.F16),
        FileType("Q8_0", LlamaFileType.MOSTLY_Q8_0, Type.Q8_0),
        FileType("Q6_K", LlamaFileType.MOSTLY_Q6_K, Type.Q6_K),
        FileType("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, Type.Q5_K, more_bits=True),
        FileType("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, Type.Q4_K, more_bits=True),
        FileType("Q4_0", LlamaFileType.MOSTLY_Q4_0, Type.Q4_0),
    )
}
# llama.cpp's tensor_type_fallback: a row length the type's 256-block does not divide
FALLBACK = {Type.Q4_K: Type.Q5_0, Type.Q5_K: Type.Q5_1, Type.Q6_K: Type.Q8_0}


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(
    file_type: FileType, *, role: str, layer: int = 0, n_layers: int = 1, cols: int, tied: bool, is_70b: bool = False
) -> Type:
    """llama.cpp's type for one 2-D weight of a dense Llama-like model (llama_tensor_get_type,
    no importance matrix, no overrides). role: "token_embd", "output" or a block tensor's
    llama.cpp name ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
    "ffn_down"); layer its block; cols its row length; tied: the embeddings are the output
    too; is_70b: llama.cpp's LLM_TYPE_70B (80 layers with grouped-query attention).

    - output (or the tied embeddings): Q8_0 when the file type's block does not divide the
      row, else Q6_K unless the file type is Q8_0 (and F16 stays F16);
    - attn_v and ffn_down of the layers `use_more_bits` picks: Q6_K in Q4_K_M and Q5_K_M;
      attn_v of a 70B model: Q5_K where it would be Q4_K (it is 8x smaller than attn_q);
    - everything else the file type's default;
    then llama.cpp's fallback for a row length the type's block does not divide (Q4_K ->
    Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 if that does not divide it either; where
    llama.cpp has no fallback (Q8_0, Q4_0) it refuses the file, here the tensor is F16).
    """
    qtype = file_type.default
    if qtype in FLOAT:
        return qtype
    if role == "output" or (tied and role == "token_embd"):
        if cols % block_size(qtype):
            qtype = Type.Q8_0
        elif qtype != Type.Q8_0:
            qtype = Type.Q6_K
    elif role == "attn_v":
        if file_type.more_bits and use_more_bits(layer, n_layers):
            qtype = Type.Q6_K
        if is_70b and qtype == Type.Q4_K:
            qtype = Type.Q5_K
    elif role == "ffn_down" and file_type.more_bits and use_more_bits(layer, n_layers):
        qtype = Type.Q6_K
    if cols % block_size(qtype):
        qtype = FALLBACK.get(qtype, Type.F16)
    return Type.F16 if cols % block_size(qtype) else qtype
