"""Triton kernels for the codebook format (additive quantization, AQLM's layout; see
algorithms/codebook.py): each group of g inputs of an output row is the sum of one
codeword from each of M codebooks of K = 2**nbits entries, times the row's scale.

The weight is laid out for the GPU once, at load (`layout`):
- codes     [M, G, out] in their stored dtype (int8 or int16, G = in / g): the codes of
  one group are contiguous across output rows (GPTQ's transposed layout), so a warp's
  lanes take neighbouring rows of the same group, and the codes (the bulk of the weight's
  bytes) are read at their stored width. The stored integer c - 2**nbits of a code
  c >= 2**(nbits-1) has c's low bits, so a kernel takes the code back as
  `stored & (K - 1)` (after sign extension to int32).
- codebooks [M, K, gp] float16, gp = g rounded up to a power of two (zeros past g): a
  codeword is gp contiguous halves, one vector load (16 bytes for g = 8).
- scales    [out] float16.

Paths (all accumulate in fp32; none uses tl.dot, so fp16, bf16 and fp32 all run under
TRITON_INTERPRET=1, which is how the tests check them on CPU):

- `lut` (decode with small codebooks, K <= LUT_MAX_K, one row, tall weights): first
  the table T[r, j, m, k] = x[r, group j] . codebooks[m, k] (fp32, R * G * M * K values:
  2 MiB for one row of 8192 inputs at 2x8), then y[r, o] = scale[o] * sum_{j, m}
  T[r, j, m, codes[m, j, o]]: one 4-byte gather per code instead of a g-wide codeword
  and a dot, and a warp's lanes (neighbouring rows, one group) gather from the same
  K-entry slice of T, a few cache lines, instead of a line each.
- `gemv` (up to GEMV_MAX_ROWS rows otherwise, e.g. 1x16): a tile of W^T
  [BLOCK_G groups, BLOCK_N rows, gp] is built in registers exactly as the reference
  does, sum_m codebooks[m, codes[m]], by gathering each code's codeword with one tl.load
  (the 1x16 codebooks, 1 MiB, stay in L2), once for all of the program's activation rows.
- both reduce a split of the groups per program into fp32 partial sums; a small kernel
  adds the splits in split order (deterministic), applies the scales and the bias and
  casts to x's dtype.
- more rows: `dequantize` writes W^T [in, out] in x's dtype, then torch's matmul.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from algorithms.codebook import CodebookWeight

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# measured on H200 (benchmarks/codebook_kernel_speed.py, 2x8 and 1x16, 8192 and 28672 rows):
LUT_MAX_K = 256  # the lookup-table GEMV for codebooks up to this size, one activation row
LUT_MIN_OUT = 16384  # and this many output rows or more (at 8192 its table cost more than it saved)
GEMV_MAX_ROWS = 8  # else the codeword GEMV up to here, then dequantize + torch's matmul


@triton.jit
def _weight_tile(
    codes_ptr, cb_ptr, rj, rn, N, G, K,
    M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, GP: tl.constexpr,
):  # fmt: skip
    """sum_m codebooks[m, codes[m, rj, rn]] as fp32 [BLOCK_G, BLOCK_N, GP] (W^T's groups),
    zeros outside the weight (and past g, from the codebooks' padding); no scales."""
    mask = (rj < G)[:, None] & (rn < N)[None, :]  # [BLOCK_G, BLOCK_N]
    rt = tl.arange(0, GP)
    w = tl.zeros((BLOCK_G, BLOCK_N, GP), dtype=tl.float32)
    for m in tl.static_range(M):
        stored = tl.load(codes_ptr + (m * G + rj[:, None]) * N + rn[None, :], mask=mask, other=0)
        code = stored.to(tl.int32) & (K - 1)  # the stored signed integer back in [0, K)
        first = (m * K + code) * GP  # [BLOCK_G, BLOCK_N]: the codeword's first element
        w += tl.load(cb_ptr + first[:, :, None] + rt[None, None, :], mask=mask[:, :, None], other=0.0).to(tl.float32)
    return w


@triton.jit
def _gemv_kernel(
    x_ptr, codes_ptr, cb_ptr, part_ptr, R, N, G, K, g, stride_xr, groups_per_split,
    M: tl.constexpr, ROWS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, GP: tl.constexpr,
):  # fmt: skip
    """part[split, r, n] = sum over the split's groups of W[n] . x[r] (fp32, unscaled) for
    ROWS activation rows r (a power of two; rows past R are not stored)."""
    pid_n, split, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = pid_r * ROWS + tl.arange(0, ROWS)
    rt = tl.arange(0, GP)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)  # one row: reduced over groups at the end
    j_lo = split * groups_per_split
    for j0 in range(j_lo, tl.minimum(j_lo + groups_per_split, G), BLOCK_G):
        rj = j0 + tl.arange(0, BLOCK_G)
        w = _weight_tile(codes_ptr, cb_ptr, rj, rn, N, G, K, M, BLOCK_G, BLOCK_N, GP)
        cols = rj[:, None] * g + rt[None, :]  # [BLOCK_G, GP]: the inputs of the groups
        cmask = (rj < G)[:, None] & (rt < g)[None, :]
        if ROWS == 1:
            x = tl.load(x_ptr + pid_r * stride_xr + cols, mask=cmask, other=0.0).to(tl.float32)
            acc1 += tl.sum(w * x[:, None, :], axis=2)
        else:
            for i in tl.static_range(ROWS):
                r = tl.minimum(pid_r * ROWS + i, R - 1)  # rows past R repeat the last (and are not stored)
                x = tl.load(x_ptr + r * stride_xr + cols, mask=cmask, other=0.0).to(tl.float32)
                dot = tl.sum(tl.sum(w * x[:, None, :], axis=2), axis=0)  # [BLOCK_N]
                acc += tl.where((tl.arange(0, ROWS) == i)[:, None], dot[None, :], 0.0)
    if ROWS == 1:
        acc = tl.sum(acc1, axis=0)[None, :]
    mask = (rr < R)[:, None] & (rn < N)[None, :]
    tl.store(part_ptr + (split * R + rr[:, None]) * N + rn[None, :], acc, mask=mask)


@triton.jit
def _table_kernel(
    x_ptr, cb_ptr, lut_ptr, G, g, stride_xr,
    M: tl.constexpr, K: tl.constexpr, BLOCK_G: tl.constexpr, GP: tl.constexpr,
):  # fmt: skip
    """lut[r, j, m, k] = x[r, j*g:(j+1)*g] . codebooks[m, k] (fp32) for BLOCK_G groups j."""
    r, pid_j = tl.program_id(0), tl.program_id(1)
    rj = pid_j * BLOCK_G + tl.arange(0, BLOCK_G)
    rt = tl.arange(0, GP)
    rk = tl.arange(0, K)
    jmask = rj < G
    x = tl.load(
        x_ptr + r * stride_xr + rj[:, None] * g + rt[None, :], mask=jmask[:, None] & (rt < g)[None, :], other=0.0
    )
    x = x.to(tl.float32)  # [BLOCK_G, GP]
    for m in tl.static_range(M):
        book = tl.load(cb_ptr + (m * K + rk[:, None]) * GP + rt[None, :]).to(tl.float32)  # [K, GP]
        t = tl.sum(x[:, None, :] * book[None, :, :], axis=2)  # [BLOCK_G, K]
        tl.store(lut_ptr + ((r * G + rj[:, None]) * M + m) * K + rk[None, :], t, mask=jmask[:, None])


@triton.jit
def _lut_gemv_kernel(
    lut_ptr, codes_ptr, part_ptr, R, N, G, groups_per_split,
    M: tl.constexpr, K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """part[split, r, n] = sum over the split's groups j and the codebooks m of
    lut[r, j, m, codes[m, j, n]] (fp32, unscaled)."""
    # the activation row varies fastest, so the programs of one code tile run together
    # and the rows after the first read it from L2
    r, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    j_lo = split * groups_per_split
    for j0 in range(j_lo, tl.minimum(j_lo + groups_per_split, G), BLOCK_G):
        rj = j0 + tl.arange(0, BLOCK_G)
        mask = (rj < G)[:, None] & (rn < N)[None, :]
        for m in tl.static_range(M):
            stored = tl.load(codes_ptr + (m * G + rj[:, None]) * N + rn[None, :], mask=mask, other=0)
            code = stored.to(tl.int32) & (K - 1)
            acc += tl.load(lut_ptr + ((r * G + rj[:, None]) * M + m) * K + code, mask=mask, other=0.0)
    tl.store(part_ptr + (split * R + r) * N + rn, tl.sum(acc, axis=0), mask=rn < N)


@triton.jit
def _reduce_kernel(
    part_ptr, s_ptr, bias_ptr, y_ptr, SPLITS, R, N, stride_yr,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """y[r, n] = scale[n] * sum over splits, in split order, of part[split, r, n] (+ bias)."""
    r, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        acc += tl.load(part_ptr + (split * R + r) * N + rn, mask=mask, other=0.0)
    acc *= tl.load(s_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * stride_yr + rn, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(
    codes_ptr, cb_ptr, s_ptr, out_ptr, N, G, K, g,
    M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, GP: tl.constexpr,
):  # fmt: skip
    """W^T [G * g, N] in out's dtype: a [BLOCK_G, BLOCK_N] tile of groups per program."""
    pid_j, pid_n = tl.program_id(0), tl.program_id(1)
    rj = pid_j * BLOCK_G + tl.arange(0, BLOCK_G)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = tl.arange(0, GP)
    w = _weight_tile(codes_ptr, cb_ptr, rj, rn, N, G, K, M, BLOCK_G, BLOCK_N, GP)
    w = w * tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :, None]
    k = rj[:, None] * g + rt[None, :]  # [BLOCK_G, GP]: W^T's rows
    mask = ((rj < G)[:, None] & (rt < g)[None, :])[:, None, :] & (rn < N)[None, :, None]
    tl.store(out_ptr + k[:, None, :] * N + rn[None, :, None], w.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class CodebookTritonWeight:
    """A CodebookWeight laid out for the kernels (see the module's docstring)."""

    codes: torch.Tensor  # [M, G, out] int8 | int16, the stored integers
    codebooks: torch.Tensor  # [M, K, gp] float16, zeros past g
    scales: torch.Tensor  # [out] float16
    in_group_size: int  # g

    @property
    def num_codebooks(self) -> int:
        return self.codes.shape[0]

    @property
    def groups(self) -> int:
        return self.codes.shape[1]

    @property
    def out_features(self) -> int:
        return self.codes.shape[2]

    @property
    def in_features(self) -> int:
        return self.groups * self.in_group_size

    @property
    def codebook_size(self) -> int:
        return self.codebooks.shape[1]


@dataclass(frozen=True)
class LutConfig:
    """Lookup-table GEMV (codebooks of at most LUT_MAX_K codewords)."""

    block_n: int  # output rows per program
    block_g: int  # groups per tile
    programs: int  # the groups are split until about this many programs per activation row
    warps: int = 4
    table_block_g: int = 4  # groups per program of the table kernel


@dataclass(frozen=True)
class GemvConfig:
    """Codeword GEMV: each program gathers its codewords once for `rows` activation rows."""

    block_n: int  # output rows per program
    block_k: int  # inputs per tile (block_k / g groups, at least one)
    programs: int  # the groups are split until about this many programs per row block
    rows: int = GEMV_MAX_ROWS  # activation rows per program (rounded up to a power of two)
    warps: int = 4


@dataclass(frozen=True)
class DequantConfig:
    """Many rows: dequantize W^T once per call into the activations' dtype, then torch's matmul."""

    block_n: int = 64
    block_k: int = 64
    warps: int = 4


def _lut_config() -> LutConfig:
    """On a GPU the best measured on H200; interpreted, few and large programs (the
    interpreter's cost grows with their number)."""
    return LutConfig(128, 64, 1, table_block_g=64) if INTERPRETED else LutConfig(128, 8, 4096)


def _gemv_config(rows: int) -> GemvConfig:
    if INTERPRETED:
        return GemvConfig(128, 512, 1)
    return GemvConfig(32, 128, 1024) if rows <= 2 else GemvConfig(128, 64, 1024)


def _dequant_config() -> DequantConfig:
    return DequantConfig(128, 512) if INTERPRETED else DequantConfig()


def layout(cw: CodebookWeight, device: torch.device | str) -> CodebookTritonWeight:
    """The weight in the kernels' layout on `device` (done once, at load)."""
    M, K, _, g = cw.codebooks.shape
    if cw.codes.shape[2] != M or cw.scales.numel() != cw.out_features:
        raise ValueError(f"codes {tuple(cw.codes.shape)} and scales {tuple(cw.scales.shape)} do not fit {M} codebooks")
    gp = triton.next_power_of_2(g)
    books = torch.zeros(M, K, gp, dtype=torch.float16)  # [M, K, gp]
    books[:, :, :g] = cw.codebooks.reshape(M, K, g).cpu()
    return CodebookTritonWeight(
        codes=cw.codes.permute(2, 1, 0).contiguous().to(device),  # [M, G, out]
        codebooks=books.to(device),
        scales=cw.scales.reshape(-1).to(device=device, dtype=torch.float16).contiguous(),  # [out]
        in_group_size=g,
    )


def _block_g(block_k: int, g: int) -> int:
    return triton.next_power_of_2(max(1, block_k // g))


def _splits(G: int, block_g: int, columns: int, programs: int) -> tuple[int, int]:
    """(splits, groups per split): about `programs` programs over `columns` column blocks,
    each split at least two tiles of block_g groups."""
    splits = max(1, min(triton.cdiv(G, block_g * 2), triton.cdiv(programs, columns)))
    groups_per_split = triton.cdiv(triton.cdiv(G, splits), block_g) * block_g
    return triton.cdiv(G, groups_per_split), groups_per_split


def dequantize(w: CodebookTritonWeight, dtype: torch.dtype, config: DequantConfig | None = None) -> torch.Tensor:
    """W^T [in, out] in `dtype`."""
    c = config or _dequant_config()
    N, G, g = w.out_features, w.groups, w.in_group_size
    out = torch.empty(w.in_features, N, device=w.codes.device, dtype=dtype)
    block_g = _block_g(c.block_k, g)
    _dequantize_kernel[(triton.cdiv(G, block_g), triton.cdiv(N, c.block_n))](
        w.codes, w.codebooks, w.scales, out, N, G, w.codebook_size, g,
        M=w.num_codebooks, BLOCK_G=block_g, BLOCK_N=c.block_n, GP=w.codebooks.shape[2], num_warps=c.warps,
    )  # fmt: skip
    return out


def _reduce(part: torch.Tensor, w: CodebookTritonWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """y [R, out] in `dtype` from the partial sums [splits, R, out]."""
    splits, R, N = part.shape
    y = torch.empty(R, N, device=part.device, dtype=dtype)
    block = 1024 if INTERPRETED else 256
    _reduce_kernel[(R, triton.cdiv(N, block))](
        part, w.scales, w.scales if bias is None else bias, y, splits, R, N, y.stride(0),
        HAS_BIAS=bias is not None, BLOCK=block,
    )  # fmt: skip
    return y


def _gemv(x2: torch.Tensor, w: CodebookTritonWeight, bias: torch.Tensor | None, c: GemvConfig) -> torch.Tensor:
    R, N, G, g = x2.shape[0], w.out_features, w.groups, w.in_group_size
    rows = triton.next_power_of_2(min(R, c.rows))
    block_g = _block_g(c.block_k, g)
    columns = triton.cdiv(N, c.block_n)
    splits, groups_per_split = _splits(G, block_g, columns, c.programs)
    part = torch.empty(splits, R, N, device=x2.device, dtype=torch.float32)  # [splits, R, out]
    _gemv_kernel[(columns, splits, triton.cdiv(R, rows))](
        x2, w.codes, w.codebooks, part, R, N, G, w.codebook_size, g, x2.stride(0), groups_per_split,
        M=w.num_codebooks, ROWS=rows, BLOCK_G=block_g, BLOCK_N=c.block_n, GP=w.codebooks.shape[2],
        num_warps=c.warps,
    )  # fmt: skip
    return _reduce(part, w, bias, x2.dtype)


def _lut_gemv(x2: torch.Tensor, w: CodebookTritonWeight, bias: torch.Tensor | None, c: LutConfig) -> torch.Tensor:
    R, N, G, M, K = x2.shape[0], w.out_features, w.groups, w.num_codebooks, w.codebook_size
    if K > LUT_MAX_K:
        raise ValueError(f"the lookup-table GEMV takes codebooks of up to {LUT_MAX_K} codewords, not {K}")
    lut = torch.empty(R, G, M, K, device=x2.device, dtype=torch.float32)  # [R, G, M, K]
    _table_kernel[(R, triton.cdiv(G, c.table_block_g))](
        x2, w.codebooks, lut, G, w.in_group_size, x2.stride(0),
        M=M, K=K, BLOCK_G=c.table_block_g, GP=w.codebooks.shape[2],
    )  # fmt: skip
    columns = triton.cdiv(N, c.block_n)
    splits, groups_per_split = _splits(G, c.block_g, columns, c.programs)
    part = torch.empty(splits, R, N, device=x2.device, dtype=torch.float32)  # [splits, R, out]
    _lut_gemv_kernel[(R, columns, splits)](
        lut, w.codes, part, R, N, G, groups_per_split,
        M=M, K=K, BLOCK_G=c.block_g, BLOCK_N=c.block_n, num_warps=c.warps,
    )  # fmt: skip
    return _reduce(part, w, bias, x2.dtype)


def _config(w: CodebookTritonWeight, rows: int) -> LutConfig | GemvConfig | DequantConfig:
    """The path and tiles for `rows` activation rows."""
    if rows == 1 and w.codebook_size <= LUT_MAX_K and w.out_features >= LUT_MIN_OUT:
        return _lut_config()
    return _gemv_config(rows) if rows <= GEMV_MAX_ROWS else _dequant_config()


def linear(
    x: torch.Tensor,
    w: CodebookTritonWeight,
    bias: torch.Tensor | None,
    config: LutConfig | GemvConfig | DequantConfig | None = None,
) -> torch.Tensor:
    """x [..., in] (fp16, bf16 or fp32, on the weight's device) -> [..., out] in x's dtype.
    Few activation rows: the lookup-table GEMV (small codebooks) or the codeword GEMV;
    more: dequantize, then torch's matmul. `config` picks the path and its tiles (for tuning)."""
    shape = x.shape
    if shape[-1] != w.in_features:
        raise ValueError(f"input has {shape[-1]} features, the weight {w.in_features}")
    x2 = x.reshape(-1, shape[-1])  # [R, in]
    if x2.shape[0] == 0:
        return x.new_empty(*shape[:-1], w.out_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.to(device=x2.device, dtype=x2.dtype).contiguous()
    config = config or _config(w, x2.shape[0])
    if isinstance(config, LutConfig):
        y = _lut_gemv(x2, w, bias, config)
    elif isinstance(config, GemvConfig):
        y = _gemv(x2, w, bias, config)
    else:
        y = torch.nn.functional.linear(x2, dequantize(w, x2.dtype, config).t(), bias)
    return y.reshape(*shape[:-1], w.out_features)
