"""Triton kernels for the group-wise uniform formats (int2/3/4/8, with or without g_idx).

The weight is laid out for the GPU once, at load: the packed words transposed to
[words, out] (GPTQ's qweight layout: the words of one input slice are contiguous across
output columns, so loads coalesce), scales [groups, out] and integer zero points
[groups, out]. A tile of W^T [BLOCK_K, BLOCK_N] is unpacked and dequantized in
registers, exactly as the reference does: w = scale * (code - zero).

- `gemv` (1-4 activation rows, decode): one program per (column block, K split,
  activation row) reduces its K range into fp32 partial sums; the splits are added in
  split order by torch (deterministic), so a 70B-wide K keeps every SM busy.
- `gemm` (prefill): classic M x N tiles with `tl.dot`, fp32 accumulation; fp32
  activations use IEEE fp32 dot products (not TF32), so results match the reference.

On a machine without a GPU the same kernels run under TRITON_INTERPRET=1 (set before
triton is imported), which is how the tests check them on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from algorithms.packing import pack, unpack
from algorithms.types import QuantizedWeight

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_ROWS = 2  # measured on H200 (benchmarks/triton_tune.py): GEMV up to here,
GEMM_MAX_ROWS = 16  # the fused GEMM up to here, then dequantize + torch's matmul


@triton.jit
def _dequantized_tile(
    qw_ptr, s_ptr, z_ptr, g_ptr, k0, rn, N, K, WORDS, group_size,
    BITS: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """W^T[k0:k0+BLOCK_K, rn] as fp32 [BLOCK_K, BLOCK_N], zeros outside the weight; any
    bit width (3-bit codes may straddle words), any g_idx: each code loads its own word,
    scale and zero (the general path; see the *_words kernels for the fast one)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    kmask = rk < K
    mask = kmask[:, None] & (rn < N)[None, :]
    bit = rk * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    low = tl.load(qw_ptr + word[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    codes = low >> shift[:, None]
    if BITS == 3:  # a code may continue at the bottom of the next word
        nxt = word + 1
        high = tl.load(qw_ptr + nxt[:, None] * N + rn[None, :], mask=mask & (nxt < WORDS)[:, None], other=0)
        high = high.to(tl.uint32, bitcast=True)
        codes = codes | ((high << 1) << (31 - shift)[:, None])  # two shifts: never a shift by 32
    codes = codes & ((1 << BITS) - 1)
    if HAS_GIDX:  # noqa: SIM108 (a constexpr branch: one of them is compiled)
        g = tl.load(g_ptr + rk, mask=kmask, other=0)
    else:
        g = rk // group_size
    s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.float32)
    return s * (codes.to(tl.float32) - z)


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, part_ptr, M, N, K, WORDS, group_size, stride_xm, k_per_split,
    BITS: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # the activation row varies fastest, so the programs of one weight tile run together
    # and the rows after the first read it from L2
    m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
        w = _dequantized_tile(qw_ptr, s_ptr, z_ptr, g_ptr, k0, rn, N, K, WORDS, group_size, BITS, HAS_GIDX, BLOCK_K)
        acc += tl.sum(w * x[:, None], axis=0)
    tl.store(part_ptr + (split * M + m) * N + rn, acc, mask=rn < N)


@triton.jit
def _gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K, WORDS, group_size, stride_xm, stride_ym,
    BITS: tl.constexpr, HAS_GIDX: tl.constexpr, FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0
        )
        w = _dequantized_tile(qw_ptr, s_ptr, z_ptr, g_ptr, k0, rn, N, K, WORDS, group_size, BITS, HAS_GIDX, BLOCK_K)
        if FP32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm < M)[:, None] & (rn < N)[None, :],
    )


@triton.jit
def _word_tile(qw_ptr, s_ptr, z_ptr, rw, rn, mask, N, group_size, PER: tl.constexpr):
    """Packed words [rw, rn] (uint32) and their scales and zero points (fp32): every code of
    a word is in the word's group, since the group size is a multiple of PER = 32 / bits."""
    words = tl.load(qw_ptr + rw[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.uint32, bitcast=True)
    g = (rw * PER) // group_size
    s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0).to(tl.float32)
    return words, s, z


@triton.jit
def _code(words, j, BITS: tl.constexpr):
    """Code j of each word, as fp32."""
    return ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _gemv_words_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, M, N, K, WORDS, group_size, stride_xm, words_per_split,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """GEMV for 2, 4 and 8 bits without g_idx: each packed word is loaded once and its
    32/BITS codes are taken out by shifts. All codes of a word share a group (the group
    size is a multiple of 32/BITS), so scale and zero are loaded per word, and
    y = sum over words of s * (sum_j c_j x_j - z * sum_j x_j)."""
    PER: tl.constexpr = 32 // BITS
    m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
    w_lo = split * words_per_split
    for w0 in range(w_lo, tl.minimum(w_lo + words_per_split, WORDS), BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        mask = (rw < WORDS)[:, None] & nmask[None, :]
        words, s, z = _word_tile(qw_ptr, s_ptr, z_ptr, rw, rn, mask, N, group_size, PER)
        dot = tl.zeros((BLOCK_W, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for j in tl.static_range(PER):
            k = rw * PER + j
            xj = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            c = _code(words, j, BITS)
            dot += c * xj[:, None]
            xs += xj
        acc += s * (dot - z * xs[:, None])
    tl.store(part_ptr + (split * M + m) * N + rn, tl.sum(acc, axis=0), mask=nmask)


@triton.jit
def _gemm_words_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, M, N, K, WORDS, group_size, stride_xm, stride_ym,
    BITS: tl.constexpr, FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """GEMM for 2, 4 and 8 bits without g_idx: per tile of BLOCK_W words, code j of every
    word (input columns w * PER + j) is dequantized and multiplied with those columns of x."""
    PER: tl.constexpr = 32 // BITS
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for w0 in range(0, WORDS, BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        mask = (rw < WORDS)[:, None] & nmask[None, :]
        words, s, z = _word_tile(qw_ptr, s_ptr, z_ptr, rw, rn, mask, N, group_size, PER)
        for j in tl.static_range(PER):
            k = rw * PER + j
            x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
            w = s * (_code(words, j, BITS) - z)
            if FP32:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


@triton.jit
def _dequantize_kernel(
    qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K, WORDS, group_size,
    BITS: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """W^T [K, N] in out's dtype, through the general tile (any bits, any g_idx)."""
    pid_k, pid_n = tl.program_id(0), tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w = _dequantized_tile(
        qw_ptr, s_ptr, z_ptr, g_ptr, pid_k * BLOCK_K, rn, N, K, WORDS, group_size, BITS, HAS_GIDX, BLOCK_K
    )
    mask = (rk < K)[:, None] & (rn < N)[None, :]
    tl.store(out_ptr + rk[:, None] * N + rn[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_words_kernel(
    qw_ptr, s_ptr, z_ptr, out_ptr, N, K, WORDS, group_size,
    BITS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """W^T [K, N] in out's dtype, a word at a time (2, 4 and 8 bits without g_idx)."""
    PER: tl.constexpr = 32 // BITS
    pid_w, pid_n = tl.program_id(0), tl.program_id(1)
    rw = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    mask = (rw < WORDS)[:, None] & nmask[None, :]
    words, s, z = _word_tile(qw_ptr, s_ptr, z_ptr, rw, rn, mask, N, group_size, PER)
    for j in tl.static_range(PER):
        k = rw * PER + j
        w = s * (_code(words, j, BITS) - z)
        tl.store(
            out_ptr + k[:, None] * N + rn[None, :],
            w.to(out_ptr.dtype.element_ty),
            mask=(k < K)[:, None] & nmask[None, :],
        )


@dataclass(frozen=True)
class TritonWeight:
    """A QuantizedWeight laid out for the kernels (see the module's docstring)."""

    qweight: torch.Tensor  # int32 [words, out]
    scales: torch.Tensor  # fp16 [groups, out]
    zeros: torch.Tensor  # uint8 [groups, out]
    g_idx: torch.Tensor | None  # int32 [in], only when groups are not runs of group_size after `order`
    order: torch.Tensor | None  # int64 [in]: the activations' columns in the order of the stored codes
    bits: int
    group_size: int
    in_features: int

    @classmethod
    def of(cls, qw: QuantizedWeight, device: torch.device | str) -> TritonWeight:
        """An act-order weight whose groups all have group_size columns (GPTQ's g_idx) has
        its columns sorted by group once, here, so that groups are runs; the activations are
        permuted to match on each call (cheap) and the kernels never read g_idx."""
        qweight, g_idx, order = qw.qweight, qw.g_idx, None
        if g_idx is not None:
            g_idx = g_idx.cpu().long()  # the layout is worked out on CPU, once
            perm = torch.argsort(g_idx, stable=True)
            if torch.equal(g_idx[perm], torch.arange(qw.in_features) // qw.group_size):
                g_idx = None
                if not torch.equal(perm, torch.arange(qw.in_features)):
                    order = perm
                    qweight = pack(unpack(qw.qweight.cpu(), qw.bits)[:, perm], qw.bits)
        return cls(
            qweight=qweight.t().contiguous().to(device),
            scales=qw.scales.t().contiguous().to(device),
            zeros=qw.zeros.t().contiguous().to(device),
            g_idx=None if g_idx is None else g_idx.to(device=device, dtype=torch.int32).contiguous(),
            order=None if order is None else order.to(device),
            bits=qw.bits,
            group_size=qw.group_size,
            in_features=qw.in_features,
        )

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def g_ptr(self) -> torch.Tensor:
        """g_idx for the general kernels; without one any tensor (the kernels do not read it)."""
        return self.g_idx if self.g_idx is not None else self.qweight

    @property
    def wordwise(self) -> bool:
        """Whether the *_words kernels apply: whole codes per word, groups as runs of whole words."""
        per = 32 // self.bits
        return (
            self.bits in (2, 4, 8)
            and self.g_idx is None
            and (self.group_size % per == 0 or self.group_size >= self.in_features)
        )


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int  # input columns per tile (a multiple of 32 / bits on the word kernels)
    programs: int  # K is split until about this many programs per activation row
    warps: int = 4
    words: bool = True  # the word kernel where it applies (else the general one)


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int  # on the word kernel, at least 16 words (tl.dot's smallest K)
    warps: int = 4
    stages: int = 3
    words: bool = True


@dataclass(frozen=True)
class DequantConfig:
    """Large batches: dequantize W^T once per call into the activations' dtype, then torch's matmul."""

    block_k: int = 128
    block_n: int = 64
    warps: int = 4
    words: bool = True


def _gemv_config(N: int, K: int) -> GemvConfig:
    """On a GPU enough programs to fill it (measured best on H200 over the 70B shapes);
    interpreted, few and large programs (the interpreter's cost grows with their number)."""
    if INTERPRETED:
        return GemvConfig(128, 128, 1)
    return GemvConfig(32, 256, 4096)


def _gemm_config(M: int) -> GemmConfig:
    if INTERPRETED:
        return GemmConfig(128, 128, 128)
    return GemmConfig(16, 64, 256, warps=4, stages=3)


def _dequant_config() -> DequantConfig:
    return DequantConfig(128, 128) if INTERPRETED else DequantConfig()


def layout(qw: QuantizedWeight, device: torch.device) -> TritonWeight:
    return TritonWeight.of(qw, device)


def dequantize(w: TritonWeight, dtype: torch.dtype, config: DequantConfig | None = None) -> torch.Tensor:
    """W^T [in, out] in `dtype` (in the order of the stored codes, see TritonWeight.order)."""
    c = config or _dequant_config()
    K, N = w.in_features, w.out_features
    words = w.qweight.shape[0]
    per = 32 // w.bits
    out = torch.empty(K, N, device=w.qweight.device, dtype=dtype)
    if c.words and w.wordwise and c.block_k % per == 0:
        block_w = c.block_k // per
        _dequantize_words_kernel[(triton.cdiv(words, block_w), triton.cdiv(N, c.block_n))](
            w.qweight, w.scales, w.zeros, out, N, K, words, w.group_size,
            BITS=w.bits, BLOCK_W=block_w, BLOCK_N=c.block_n, num_warps=c.warps,
        )  # fmt: skip
    else:
        _dequantize_kernel[(triton.cdiv(K, c.block_k), triton.cdiv(N, c.block_n))](
            w.qweight, w.scales, w.zeros, w.g_ptr, out, N, K, words, w.group_size,
            BITS=w.bits, HAS_GIDX=w.g_idx is not None, BLOCK_K=c.block_k, BLOCK_N=c.block_n, num_warps=c.warps,
        )  # fmt: skip
    return out


def _gemv(x2: torch.Tensor, w: TritonWeight, c: GemvConfig) -> torch.Tensor:
    M, K, N = x2.shape[0], w.in_features, w.out_features
    words, per = w.qweight.shape[0], 32 // w.bits
    columns = triton.cdiv(N, c.block_n)
    splits = max(1, min(triton.cdiv(K, c.block_k * 2), triton.cdiv(c.programs, columns)))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), c.block_k) * c.block_k
    splits = triton.cdiv(K, k_per_split)
    part = torch.empty(splits, M, N, device=x2.device, dtype=torch.float32)
    grid = (M, columns, splits)
    if c.words and w.wordwise and c.block_k % per == 0:
        _gemv_words_kernel[grid](
            x2, w.qweight, w.scales, w.zeros, part, M, N, K, words, w.group_size, x2.stride(0),
            k_per_split // per, BITS=w.bits, BLOCK_N=c.block_n, BLOCK_W=c.block_k // per, num_warps=c.warps,
        )  # fmt: skip
    else:
        _gemv_kernel[grid](
            x2, w.qweight, w.scales, w.zeros, w.g_ptr, part, M, N, K, words, w.group_size, x2.stride(0),
            k_per_split, BITS=w.bits, HAS_GIDX=w.g_idx is not None, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
            num_warps=c.warps,
        )  # fmt: skip
    return (part[0] if splits == 1 else part.sum(0)).to(x2.dtype)


def _gemm(x2: torch.Tensor, w: TritonWeight, c: GemmConfig) -> torch.Tensor:
    M, K, N = x2.shape[0], w.in_features, w.out_features
    words, per = w.qweight.shape[0], 32 // w.bits
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(M, c.block_m), triton.cdiv(N, c.block_n))
    fp32 = x2.dtype == torch.float32
    if c.words and w.wordwise:
        _gemm_words_kernel[grid](
            x2, w.qweight, w.scales, w.zeros, y, M, N, K, words, w.group_size, x2.stride(0), y.stride(0),
            BITS=w.bits, FP32=fp32, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            BLOCK_W=max(16, c.block_k // per), num_warps=c.warps, num_stages=c.stages,  # tl.dot: K >= 16
        )  # fmt: skip
    else:
        # the general tile keeps a word, scale and zero per code: past 64 input columns a
        # tile ran out of shared memory on H200 (3 bits, 3 stages)
        block_k = c.block_k if INTERPRETED else min(c.block_k, 64)
        _gemm_kernel[grid](
            x2, w.qweight, w.scales, w.zeros, w.g_ptr, y, M, N, K, words, w.group_size, x2.stride(0), y.stride(0),
            BITS=w.bits, HAS_GIDX=w.g_idx is not None, FP32=fp32,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=block_k, num_warps=c.warps, num_stages=c.stages,
        )  # fmt: skip
    return y


def linear(
    x: torch.Tensor,
    w: TritonWeight,
    bias: torch.Tensor | None,
    config: GemvConfig | GemmConfig | DequantConfig | None = None,
) -> torch.Tensor:
    """x [..., in] (fp16, bf16 or fp32, on the weight's device) -> [..., out] in x's dtype.
    Up to GEMV_MAX_ROWS activation rows: GEMV; up to GEMM_MAX_ROWS: the fused GEMM; more:
    dequantize, then torch's matmul. `config` picks the path and its tiles (for tuning)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if w.order is not None:
        x2 = x2[:, w.order]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if config is None:
        config = _gemv_config(w.out_features, w.in_features) if M <= GEMV_MAX_ROWS else None
        config = config or (_gemm_config(M) if M <= GEMM_MAX_ROWS else _dequant_config())
    if isinstance(config, GemvConfig):
        y = _gemv(x2, w, config)
    elif isinstance(config, GemmConfig):
        y = _gemm(x2, w, config)
    else:
        y = x2 @ dequantize(w, x2.dtype, config)
    if bias is not None:
        y = y + bias.to(device=y.device, dtype=y.dtype)
    return y.reshape(*shape[:-1], w.out_features)
