"""Triton kernels for the incoherent format's E8P codes (QuIP#; see algorithms/quip.py and
algorithms/e8p.py): y = su * Had_out^T(Q z) with z = Had_in(sv * x), Q [out, in] the
rotated weight, each run of 8 of a row's inputs an E8P point times the row's scale.

The two Hadamard transforms run in torch (algorithms/hadamard.py: log2(p) butterflies and
one small h x h product per call); the kernels do what touches the codes:

- `gemv` (up to GEMV_MAX_ROWS activation rows): program (o, r) takes BLOCK_O outputs
  and, tile by tile of BLOCK_G code columns, decodes the [BLOCK_O, BLOCK_G, 8] points
  (the code's absolute vector from a 256 x 8 table, its sign bits with the parity flip,
  the +-1/4 shift) and reduces them against z, in fp32; the row scale multiplies the sum.
- more rows: `dequantize` writes Q [out, in] in z's dtype, then torch's matmul.

Neither uses tl.dot, so fp32, fp16 and bf16 run under TRITON_INTERPRET=1, which is how
the tests check them on CPU. The weight keeps its stored 16 bits per 8 weights.
Scalar (QuIP) weights take the reference path: their rotated grid is the uniform format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from algorithms import e8p, hadamard
from algorithms.quip import QuipWeight
from kernels.reference import incoherent_linear

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_ROWS = 4


@triton.jit
def _points(q_ptr, base_ptr, oo, gg, mask, G):
    """The E8P points of codes [BLOCK_O, BLOCK_G] at rows oo, code columns gg: fp32
    [BLOCK_O, BLOCK_G, 8] (zeros outside mask)."""
    c = tl.load(q_ptr + oo[:, None] * G + gg[None, :], mask=mask, other=0).to(tl.int32) & 0xFFFF
    a = c >> 8
    s = c & 255
    p = s ^ (s >> 4)
    p = p ^ (p >> 2)
    p = (p ^ (p >> 1)) & 1  # parity of the sign byte
    s = s ^ p  # an even number of flips
    i = tl.arange(0, 8)
    bit = (i // 2) + 4 * (i % 2)  # the sign bit of coordinate i (e8p.SIGN_BIT)
    neg = (s[:, :, None] >> bit[None, None, :]) & 1
    v = tl.load(base_ptr + a[:, :, None] * 8 + i[None, None, :], mask=mask[:, :, None], other=0.0)
    v = tl.where(neg == 1, -v, v) + (0.25 - 0.5 * p.to(tl.float32))[:, :, None]
    return tl.where(mask[:, :, None], v, 0.0)


@triton.jit
def _gemv_kernel(
    z_ptr, q_ptr, base_ptr, scale_ptr, y_ptr, OUT, G,
    BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """y[r, o] = scale[o] * sum_g <point(q[o, g]), z[r, 8g:8g+8]>, fp32."""
    pid_o, r = tl.program_id(0), tl.program_id(1)
    oo = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gg = g0 + tl.arange(0, BLOCK_G)
        mask = (oo[:, None] < OUT) & (gg[None, :] < G)
        pts = _points(q_ptr, base_ptr, oo, gg, mask, G)  # [BLOCK_O, BLOCK_G, 8]
        zmask = (gg[:, None] < G) & (i[None, :] < 8)
        z = tl.load(z_ptr + r * G * 8 + gg[:, None] * 8 + i[None, :], mask=zmask, other=0.0).to(tl.float32)
        acc += tl.sum(tl.sum(pts * z[None, :, :], axis=2), axis=1)
    scale = tl.load(scale_ptr + oo, mask=oo < OUT, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * OUT + oo, acc * scale, mask=oo < OUT)


@triton.jit
def _dequantize_kernel(
    q_ptr, base_ptr, scale_ptr, w_ptr, OUT, G,
    BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """Q[o, 8g + i] = scale[o] * point(q[o, g])[i], in w's dtype."""
    pid_o, pid_g = tl.program_id(0), tl.program_id(1)
    oo = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    gg = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    i = tl.arange(0, 8)
    mask = (oo[:, None] < OUT) & (gg[None, :] < G)
    pts = _points(q_ptr, base_ptr, oo, gg, mask, G)
    scale = tl.load(scale_ptr + oo, mask=oo < OUT, other=0.0).to(tl.float32)
    w = pts * scale[:, None, None]
    offs = oo[:, None, None] * G * 8 + gg[None, :, None] * 8 + i[None, None, :]
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask[:, :, None])


@dataclass(frozen=True)
class E8PTritonWeight:
    """The stored codes and what the kernels read beside them, on one device."""

    qw: QuipWeight  # su, sv, qidxs [out, in / 8] int16, scales [out, 1]
    base: torch.Tensor  # [256, 8] float32, the base points (coordinate 7's sign applied)
    scale: torch.Tensor  # [out] float32


def layout(qw: QuipWeight, device: torch.device | str) -> E8PTritonWeight | QuipWeight:
    qw = qw.to(device)
    if qw.qidxs is None:  # scalar QuIP: the reference path
        return qw
    a, base, _, _ = e8p._tables(str(torch.device(device)))
    return E8PTritonWeight(qw=qw, base=(a * base).contiguous(), scale=qw.scales.float().reshape(-1).contiguous())


def _blocks() -> tuple[int, int]:
    return (64, 64) if INTERPRETED else (32, 32)


def dequantize(w: E8PTritonWeight, dtype: torch.dtype) -> torch.Tensor:
    """The rotated weight Q [out, in] in `dtype`."""
    q = w.qw.qidxs.contiguous()
    out, G = q.shape
    Q = torch.empty(out, G * 8, dtype=dtype, device=q.device)
    bo, bg = _blocks()
    _dequantize_kernel[(triton.cdiv(out, bo), triton.cdiv(G, bg))](
        q, w.base, w.scale, Q, out, G, BLOCK_O=bo, BLOCK_G=bg
    )
    return Q


def rotated_product(z: torch.Tensor, w: E8PTritonWeight) -> torch.Tensor:
    """z [rows, in] -> z Q^T [rows, out] in z's dtype."""
    q = w.qw.qidxs.contiguous()
    out, G = q.shape
    if len(z) > GEMV_MAX_ROWS:
        return z @ dequantize(w, z.dtype).T
    y = torch.empty(len(z), out, dtype=torch.float32, device=z.device)
    bo, bg = _blocks()
    _gemv_kernel[(triton.cdiv(out, bo), len(z))](z.contiguous(), q, w.base, w.scale, y, out, G, BLOCK_O=bo, BLOCK_G=bg)
    return y.to(z.dtype)


def linear(x: torch.Tensor, w: E8PTritonWeight | QuipWeight, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(w, QuipWeight):
        return incoherent_linear(x, w, bias)
    qw = w.qw
    lead = x.shape[:-1]
    z = hadamard.apply(x.reshape(-1, x.shape[-1]) * qw.sv.to(x.dtype))  # [rows, in]
    y = hadamard.apply(rotated_product(z, w), transpose=True) * qw.su.to(x.dtype)  # [rows, out]
    y = y if bias is None else y + bias.to(x.dtype)
    return y.reshape(*lead, -1)
