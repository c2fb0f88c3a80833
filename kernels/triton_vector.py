"""Triton kernels for the vector format (VPTQ's layout; see algorithms/vector.py): W's
input columns are reordered by `perm`, and in the reordered weight Q each run of v
consecutive outputs of one column is a centroid of its group's codebook (plus one of the
residual codebook); the first `outlier_size` columns have their own codebook and vector
length; with normalisation, input j is scaled and shifted: W[:, j] = Q'[:, j] * s_j + b_j.

The weight is laid out once, at load (`layout`), as segments: the outlier columns (if
any), then the group_num groups. Every segment's indices are rows of a little-endian bit
stream, one row per group and vector row, `bits` per column (main | residual << main
bits): the stored packed int32 words as they are for the groups, and the outliers' int16
indices (already a 16-bit stream) padded to whole words and viewed as int32. The weight
keeps its stored size in memory; a kernel takes index e of a row from bits e*b .. e*b+b-1
of its words (two words when the index straddles them). The codebooks are float16
[group_num, K, vp], vp = v rounded up to a power of two (zeros past v), one vector load
per centroid. perm is int32 [in]; weight_scale and weight_bias are float32 [in], taken
in perm order (s_p[k] = weight_scale[perm[k]]).

The normalisation folds into the activations: y[o] = sum_j x_j (Q'[o, j] s_j + b_j)
= sum_k (x[perm[k]] s_p[k]) Q[o, k] + sum_j x_j b_j, a scale per input column and one
number per activation row added to every output.

Paths (all accumulate in fp32; none uses tl.dot, so fp16, bf16 and fp32 all run under
TRITON_INTERPRET=1, which is how the tests check them on CPU):

- `gemv` (up to GEMV_MAX_ROWS activation rows): program (i, s, b) of a segment takes
  BLOCK_R vector rows (BLOCK_R * v outputs, BLOCK_R = block_out / vp) of split s (a
  run of a group's columns, whole tiles of BLOCK_K) for activation rows block b. Per tile
  it unpacks the [BLOCK_R, BLOCK_K] indices, gathers their centroids (main + residual)
  into a fp32 [BLOCK_R, BLOCK_K, vp] tile of Q, gathers x at the tile's perm-mapped
  inputs times s_p, and reduces over the columns, once for each activation row. Each
  program writes fp32 partial sums [R, out] of its split; a small kernel adds all
  segments' splits in split order (deterministic: no atomics), adds the bias and casts
  to x's dtype.
- more rows: `dequantize` writes W^T [in, out] in x's dtype, a [BLOCK_K, BLOCK_R * v]
  tile per program, each reordered column k into row perm[k] (a whole, contiguous row of
  W^T, so scattering the rows costs no coalescing), then torch's matmul.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from algorithms.vector import VectorWeight, as_uint16

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_ROWS = 4  # the GEMV up to this many activation rows, then dequantize + torch's matmul


@triton.jit
def _codewords(
    idx_ptr, cb_ptr, rcb_ptr, c, rr, kk, mask, RV, WORDS,
    VP: tl.constexpr, BITS: tl.constexpr, IB: tl.constexpr, RB: tl.constexpr,
):  # fmt: skip
    """Q's columns kk of group c at vector rows rr, unscaled: fp32 [BLOCK_R, BLOCK_K, VP]
    (zeros outside `mask` and past v)."""
    bit = kk * BITS  # [BLOCK_K]: each index's first bit in its row's stream
    word = bit // 32
    shift = (bit % 32).to(tl.int64)
    at = (c * RV + rr[:, None]) * WORDS + word[None, :]  # [BLOCK_R, BLOCK_K]
    stream = tl.load(idx_ptr + at, mask=mask, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    if 32 % BITS != 0:  # an index may run into the next word
        nxt = tl.load(idx_ptr + at + 1, mask=mask & (word + 1 < WORDS)[None, :], other=0)
        stream = stream | (nxt.to(tl.uint32, bitcast=True).to(tl.int64) << 32)
    merged = stream >> shift[None, :]  # main | residual << IB in the low BITS bits
    main = (merged & ((1 << IB) - 1)).to(tl.int32)
    rt = tl.arange(0, VP)
    m3 = mask[:, :, None]
    first = (c * (1 << IB) + main) * VP  # [BLOCK_R, BLOCK_K]: the centroid's first element
    w = tl.load(cb_ptr + first[:, :, None] + rt[None, None, :], mask=m3, other=0.0).to(tl.float32)
    if RB > 0:
        res = ((merged >> IB) & ((1 << RB) - 1)).to(tl.int32)
        first = (c * (1 << RB) + res) * VP
        w += tl.load(rcb_ptr + first[:, :, None] + rt[None, None, :], mask=m3, other=0.0).to(tl.float32)
    return w


@triton.jit
def _gemv_kernel(
    x_ptr, perm_ptr, scale_ptr, shift_ptr, idx_ptr, cb_ptr, rcb_ptr, part_ptr,
    R, N, RV, WORDS, GS, FIRST, cols_per_split, splits_per_group, split0, stride_xr,
    V: tl.constexpr, VP: tl.constexpr, BITS: tl.constexpr, IB: tl.constexpr, RB: tl.constexpr,
    NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """part[split0 + s, r, o] = sum over split s's columns k of Q[o, k] x[r, perm[k]] s_p[k]
    (+ sum x[r, perm[k]] b_p[k]) for the program's outputs o and ROWS activation rows r
    (a power of two; rows past R are not stored)."""
    pid_r, pid_s, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_s // splits_per_group  # the group
    lo = (pid_s % splits_per_group) * cols_per_split
    hi = tl.minimum(lo + cols_per_split, GS)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # vector rows
    rt = tl.arange(0, VP)
    ri = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_R, VP), dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)  # the group's columns
        kmask = kk < hi
        mask = (rr < RV)[:, None] & kmask[None, :]  # [BLOCK_R, BLOCK_K]
        w = _codewords(idx_ptr, cb_ptr, rcb_ptr, c, rr, kk, mask, RV, WORDS, VP, BITS, IB, RB)
        col = FIRST + c * GS + kk  # reordered columns
        src = tl.load(perm_ptr + col, mask=kmask, other=0)  # their inputs
        if NORM:
            s = tl.load(scale_ptr + col, mask=kmask, other=0.0)
            b = tl.load(shift_ptr + col, mask=kmask, other=0.0)
        for i in tl.static_range(ROWS):
            r = tl.minimum(pid_b * ROWS + i, R - 1)  # rows past R repeat the last (and are not stored)
            x = tl.load(x_ptr + r * stride_xr + src, mask=kmask, other=0.0).to(tl.float32)  # [BLOCK_K]
            if NORM:
                dot = tl.sum(w * (x * s)[None, :, None], axis=1) + tl.sum(x * b)  # [BLOCK_R, VP]
            else:
                dot = tl.sum(w * x[None, :, None], axis=1)
            acc += tl.where((ri == i)[:, None, None], dot[None, :, :], 0.0)
    o = rr[:, None] * V + rt[None, :]  # [BLOCK_R, VP]: the outputs
    rows = pid_b * ROWS + ri
    mask = (rows < R)[:, None, None] & ((rr < RV)[:, None] & (rt < V)[None, :])[None, :, :]
    tl.store(part_ptr + ((split0 + pid_s) * R + rows[:, None, None]) * N + o[None, :, :], acc, mask=mask)


@triton.jit
def _reduce_kernel(
    part_ptr, bias_ptr, y_ptr, SPLITS, R, N, stride_yr,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """y[r, n] = sum over splits, in split order, of part[split, r, n] (+ bias)."""
    r, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        acc += tl.load(part_ptr + (split * R + r) * N + rn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * stride_yr + rn, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(
    perm_ptr, scale_ptr, shift_ptr, idx_ptr, cb_ptr, rcb_ptr, out_ptr,
    N, RV, WORDS, GS, FIRST, col_tiles,
    V: tl.constexpr, VP: tl.constexpr, BITS: tl.constexpr, IB: tl.constexpr, RB: tl.constexpr,
    NORM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """W^T[perm[k], o] = Q[o, k] s_p[k] + b_p[k] in out's dtype for a tile of BLOCK_R
    vector rows and BLOCK_K columns of one group."""
    pid_r, pid_k = tl.program_id(0), tl.program_id(1)
    c = pid_k // col_tiles
    kk = (pid_k % col_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rt = tl.arange(0, VP)
    kmask = kk < GS
    mask = (rr < RV)[:, None] & kmask[None, :]  # [BLOCK_R, BLOCK_K]
    w = _codewords(idx_ptr, cb_ptr, rcb_ptr, c, rr, kk, mask, RV, WORDS, VP, BITS, IB, RB)
    col = FIRST + c * GS + kk
    if NORM:
        s = tl.load(scale_ptr + col, mask=kmask, other=0.0)
        b = tl.load(shift_ptr + col, mask=kmask, other=0.0)
        w = w * s[None, :, None] + b[None, :, None]
    dst = tl.load(perm_ptr + col, mask=kmask, other=0)  # W^T's rows: the columns' inputs
    o = rr[:, None] * V + rt[None, :]  # [BLOCK_R, VP]
    mask = kmask[None, :, None] & ((rr < RV)[:, None] & (rt < V)[None, :])[:, None, :]
    tl.store(out_ptr + dst[None, :, None] * N + o[:, None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Segment:
    """Reordered columns first .. first + groups * group_size that share a vector length
    and an index stream: the outliers, or the groups."""

    indices: torch.Tensor  # [groups, out / v, words] int32: per vector row, `bits` per column
    centroids: torch.Tensor  # [groups, K, vp] float16, zeros past v
    res_centroids: torch.Tensor | None  # [groups, Kr, vp] float16
    first: int
    group_size: int
    vector_len: int
    bits: int  # per index in the stream
    index_bits: int  # log2(K): the main index is the low bits
    res_bits: int  # log2(Kr), 0 without a residual codebook

    @property
    def groups(self) -> int:
        return self.indices.shape[0]

    @property
    def vector_rows(self) -> int:
        return self.indices.shape[1]

    @property
    def vp(self) -> int:
        return self.centroids.shape[2]


@dataclass(frozen=True)
class VectorTritonWeight:
    """A VectorWeight laid out for the kernels (see the module's docstring)."""

    segments: tuple[Segment, ...]  # the outliers (if any), then the groups
    perm: torch.Tensor  # [in] int32: reordered column k is input perm[k]
    scale: torch.Tensor | None  # [in] float32, weight_scale[perm]
    shift: torch.Tensor | None  # [in] float32, weight_bias[perm]
    out_features: int

    @property
    def in_features(self) -> int:
        return self.perm.shape[0]


@dataclass(frozen=True)
class GemvConfig:
    """The GEMV: each program unpacks and gathers its tile of Q once for `rows` activation rows."""

    block_out: int  # outputs per program (block_out / vp vector rows; at least one)
    block_k: int  # columns per tile
    programs: int  # a segment's columns are split until about this many programs per row block
    rows: int = GEMV_MAX_ROWS  # activation rows per program (rounded up to a power of two)
    warps: int = 4


@dataclass(frozen=True)
class DequantConfig:
    """Many rows: dequantize W^T once per call into the activations' dtype, then torch's matmul."""

    block_out: int = 64
    block_k: int = 64
    warps: int = 4


def _gemv_config() -> GemvConfig:
    """Interpreted, few and large programs (the interpreter's cost grows with their number).
    The GPU tiles are a first guess, not yet measured (benchmarks/vector_kernel_speed.py)."""
    return GemvConfig(256, 256, 1) if INTERPRETED else GemvConfig(128, 64, 1024)


def _dequant_config() -> DequantConfig:
    return DequantConfig(256, 256) if INTERPRETED else DequantConfig()


def _log2(n: int, what: str) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")
    return n.bit_length() - 1


def _books(flat: torch.Tensor, v: int, device: torch.device | str) -> torch.Tensor:
    """Codebooks [G, K * v] as float16 [G, K, vp], zeros past v."""
    G = flat.shape[0]
    books = torch.zeros(G, flat.shape[1] // v, triton.next_power_of_2(v), dtype=torch.float16)  # [G, K, vp]
    books[:, :, :v] = flat.reshape(G, -1, v).cpu()
    return books.to(device)


def layout(vw: VectorWeight, device: torch.device | str) -> VectorTritonWeight:
    """The weight in the kernels' layout on `device` (done once, at load)."""
    s = vw.scheme
    n, out = vw.outlier_size, vw.out_features
    if s.layout(out, vw.in_features) != (n, vw.group_size):
        raise ValueError(f"the tensors' layout does not fit scheme {s.name} on [{out}, {vw.in_features}]")
    v, ib, rb = s.vector_len, s.index_bits, s.res_bits
    if vw.centroids.shape[1] != s.num_centroids * v:
        raise ValueError(f"centroids {tuple(vw.centroids.shape)} do not hold {s.num_centroids} vectors of {v}")
    segments = []
    if n:
        vo = s.outlier_vector_len
        idx = vw.outlier_indices[0].to(torch.int16)  # [out/vo, n]: a 16-bit stream per vector row
        idx = torch.nn.functional.pad(idx, (0, n % 2)).contiguous().view(torch.int32)  # [out/vo, ceil(n/2)]
        segments.append(
            Segment(
                indices=idx[None].to(device),
                centroids=_books(vw.outlier_centroids, vo, device),
                res_centroids=None,
                first=0,
                group_size=n,
                vector_len=vo,
                bits=16,
                index_bits=_log2(vw.outlier_centroids.shape[1] // vo, "outlier_centroids"),
                res_bits=0,
            )
        )
    res = vw.res_centroids
    segments.append(
        Segment(
            indices=vw.indices.to(device=device, dtype=torch.int32).contiguous(),  # [G, out/v, words]
            centroids=_books(vw.centroids, v, device),
            res_centroids=None if res is None else _books(res, v, device),
            first=n,
            group_size=vw.group_size,
            vector_len=v,
            bits=ib + rb,
            index_bits=ib,
            res_bits=rb,
        )
    )
    perm = as_uint16(vw.perm).cpu()  # [in]
    norm = vw.weight_scale is not None
    return VectorTritonWeight(
        segments=tuple(segments),
        perm=perm.to(device=device, dtype=torch.int32),
        scale=vw.weight_scale.cpu().float()[perm].to(device) if norm else None,
        shift=vw.weight_bias.cpu().float()[perm].to(device) if norm else None,
        out_features=out,
    )


def _segment_args(seg: Segment) -> tuple[list, dict]:
    """The kernels' shared pointer, size and constexpr arguments for one segment."""
    rcb = seg.centroids if seg.res_centroids is None else seg.res_centroids
    sizes = [seg.indices, seg.centroids, rcb, seg.vector_rows, seg.indices.shape[2], seg.group_size, seg.first]
    consts = {"V": seg.vector_len, "VP": seg.vp, "BITS": seg.bits, "IB": seg.index_bits, "RB": seg.res_bits}
    return sizes, consts


def _norm(w: VectorTritonWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and shift pointers (perm's when there is no normalisation: never read)."""
    return (w.perm, w.perm) if w.scale is None else (w.scale, w.shift)


def _block_r(block_out: int, seg: Segment) -> int:
    """Vector rows per program: block_out / vp, rounded down to a power of two, at least one."""
    return 1 << (max(1, block_out // seg.vp).bit_length() - 1)


def dequantize(w: VectorTritonWeight, dtype: torch.dtype, config: DequantConfig | None = None) -> torch.Tensor:
    """W^T [in, out] in `dtype`, inputs in their own order."""
    c = config or _dequant_config()
    out = torch.empty(w.in_features, w.out_features, device=w.perm.device, dtype=dtype)
    for seg in w.segments:
        block_r = _block_r(c.block_out, seg)
        col_tiles = triton.cdiv(seg.group_size, c.block_k)
        sizes, consts = _segment_args(seg)
        _dequantize_kernel[(triton.cdiv(seg.vector_rows, block_r), seg.groups * col_tiles)](
            w.perm, *_norm(w), *sizes[:3], out, w.out_features, *sizes[3:], col_tiles,
            **consts, NORM=w.scale is not None, BLOCK_R=block_r, BLOCK_K=c.block_k, num_warps=c.warps,
        )  # fmt: skip
    return out


def _splits(columns: int, block_k: int, tiles: int, programs: int) -> tuple[int, int]:
    """(splits, columns per split) of a group's `columns` for `tiles` programs a split:
    about `programs` programs, each split whole tiles of block_k."""
    splits = max(1, min(triton.cdiv(columns, block_k), triton.cdiv(programs, tiles)))
    per_split = triton.cdiv(triton.cdiv(columns, splits), block_k) * block_k
    return triton.cdiv(columns, per_split), per_split


def _reduce(part: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """y [R, out] in `dtype` from the partial sums [splits, R, out]."""
    splits, R, N = part.shape
    y = torch.empty(R, N, device=part.device, dtype=dtype)
    block = 1024 if INTERPRETED else 256
    _reduce_kernel[(R, triton.cdiv(N, block))](
        part, part if bias is None else bias, y, splits, R, N, y.stride(0), HAS_BIAS=bias is not None, BLOCK=block
    )
    return y


def _gemv(x2: torch.Tensor, w: VectorTritonWeight, bias: torch.Tensor | None, c: GemvConfig) -> torch.Tensor:
    R, N = x2.shape[0], w.out_features
    rows = triton.next_power_of_2(min(R, c.rows))
    plans = []  # per segment: (it, row tiles, splits per group, columns per split)
    for seg in w.segments:
        tiles = triton.cdiv(seg.vector_rows, _block_r(c.block_out, seg))
        plans.append((seg, tiles, *_splits(seg.group_size, c.block_k, tiles * seg.groups, c.programs)))
    part = torch.empty(sum(seg.groups * splits for seg, _, splits, _ in plans), R, N, device=x2.device)
    split0 = 0  # part [splits, R, out] fp32: the segments' splits one after the other
    for seg, tiles, splits, per_split in plans:
        sizes, consts = _segment_args(seg)
        _gemv_kernel[(tiles, seg.groups * splits, triton.cdiv(R, rows))](
            x2, w.perm, *_norm(w), *sizes[:3], part, R, N, *sizes[3:], per_split, splits, split0, x2.stride(0),
            **consts, NORM=w.scale is not None, ROWS=rows, BLOCK_R=_block_r(c.block_out, seg), BLOCK_K=c.block_k,
            num_warps=c.warps,
        )  # fmt: skip
        split0 += seg.groups * splits
    return _reduce(part, bias, x2.dtype)


def _config(rows: int) -> GemvConfig | DequantConfig:
    """The path and tiles for `rows` activation rows."""
    return _gemv_config() if rows <= GEMV_MAX_ROWS else _dequant_config()


def linear(
    x: torch.Tensor,
    w: VectorTritonWeight,
    bias: torch.Tensor | None,
    config: GemvConfig | DequantConfig | None = None,
) -> torch.Tensor:
    """x [..., in] (fp16, bf16 or fp32, on the weight's device) -> [..., out] in x's dtype.
    Up to GEMV_MAX_ROWS activation rows the GEMV, more: dequantize, then torch's matmul.
    `config` picks the path and its tiles (for tuning)."""
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
    config = config or _config(x2.shape[0])
    if isinstance(config, GemvConfig):
        y = _gemv(x2, w, bias, config)
    else:
        y = torch.nn.functional.linear(x2, dequantize(w, x2.dtype, config).t(), bias)
    return y.reshape(*shape[:-1], w.out_features)
