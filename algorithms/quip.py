"""QuIP and QuIP#: incoherence processing, then LDLQ rounding.

Chee et al., "QuIP: 2-Bit Quantization of Large Language Models With Guarantees"
(NeurIPS 2023) and Tseng et al., "QuIP#" (ICML 2024). With U = Had_out diag(su) and
V = Had_in diag(sv) (algorithms/hadamard.py; su, sv random signs), the weight and the
Hessian of its inputs are rotated,

    W~ = U W V^T,    H~ = V H V^T,    tr((W - W^) H (W - W^)^T) = tr((W~ - Q) H~ (W~ - Q)^T),

so the proxy loss is the same in both spaces, and rounding W~ loses less: the rotation
spreads every large weight and every large input over all coordinates (incoherence).
Q is found by LDLQ, which is GPTQ's column-by-column error feedback on (W~, H~):

- `codebook: scalar` (QuIP): a uniform grid (UniformScheme: bits, group size, symmetry),
  solved by algorithms.gptq on the rotated problem (columns in order: the rotation
  flattens the Hessian's diagonal, so act-order has nothing to sort by);
- `codebook: e8p` (QuIP#): each run of 8 rotated columns of a row is one point of the E8P
  lattice codebook (algorithms/e8p.py; 16 bits per 8 weights) times the row's scale
  (its RMS / 1.03); blocks of 8 columns are rounded to the nearest point and their
  error fed forward through the inverse Hessian's Cholesky factor (block LDLQ).

At inference, y = su * Had_out^T(Q (Had_in (sv * x))): the signs are stored with the
codes. su and sv come from the recipe's seed and the layer's sizes only, so every linear
that reads the same inputs (q/k/v, gate/up) shares sv and the rotated Hessian.

The stored tensors, by suffix:
    su, sv:        [out], [in] int8, +-1
    e8p:    qidxs  [out, in / 8] int16 (E8P codes as uint16), scales [out, 1] float16
    scalar: qweight, scales, qzeros (and g_idx) of the uniform format, on W~
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from algorithms import e8p, hadamard
from algorithms.gptq import GPTQConfig, gptq
from algorithms.gptq import Prepared as GPTQPrepared
from algorithms.gptq import prepare as gptq_prepare
from algorithms.types import SUPPORTED_BITS, QuantizedWeight, UniformScheme

CODEBOOKS = ("e8p", "scalar")
SUFFIXES = ("qidxs", "su", "sv")  # beside scales (and the scalar grid's qweight, qzeros, g_idx)
SALT_OUT, SALT_IN = 1, 2  # su and sv from the same seed, different streams


@dataclass(frozen=True)
class QuipScheme:
    """codebook: e8p (QuIP#, 2 bits) or scalar (QuIP: the uniform grid of bits, group_size, sym)."""

    codebook: str = "e8p"
    bits: int = 2
    group_size: int = 0
    sym: bool = False

    def __post_init__(self) -> None:
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {', '.join(CODEBOOKS)}, got {self.codebook!r}")
        if self.codebook == "scalar" and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")

    @property
    def grid(self) -> UniformScheme:
        return UniformScheme(bits=self.bits, group_size=self.group_size, sym=self.sym)

    @property
    def name(self) -> str:
        if self.codebook == "e8p":
            return "quip#-e8p"
        return f"quip-{self.bits}bit-g{self.group_size or 'row'}{'' if self.sym else '-asym'}"

    def misfit(self, out_features: int, in_features: int) -> str | None:
        """Why a linear of this shape cannot be stored (None: it can)."""
        for side, n in (("output", out_features), ("input", in_features)):
            try:
                hadamard.factor(n)
            except ValueError as e:
                return f"{side} {e}"
        if self.codebook == "e8p" and in_features % e8p.DIM:
            return f"input size {in_features} is not a multiple of {e8p.DIM} (E8P codes 8 weights)"
        if self.codebook == "scalar" and self.group_size and in_features % self.group_size:
            return f"group size {self.group_size} does not divide input size {in_features}"
        return None

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Codes, scales (and zeros, at `bits` bits as GPTQ's formats pack them) and the
        signs, over the weight."""
        signs = 8 * (out_features + in_features) / (out_features * in_features)
        if self.codebook == "e8p":
            return 16 / e8p.DIM + 16 / in_features + signs
        groups = self.grid.groups(in_features)
        return self.bits + groups * (16 + self.bits) / in_features + signs

    def fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_fields(cls, qc: dict) -> QuipScheme:
        return cls(**{f.name: qc[f.name] for f in fields(cls) if f.name in qc})


@dataclass(frozen=True)
class QuipConfig:
    """damp: fraction of the rotated Hessian's mean diagonal added to it; block_size: the
    lazy-batch width of the feedback; mse: the scalar grid's clipping search; seed: the signs."""

    damp: float = 0.01
    block_size: int = 128
    mse: bool = False
    seed: int = 0

    @property
    def gptq(self) -> GPTQConfig:
        return GPTQConfig(damp=self.damp, block_size=self.block_size, act_order=False, mse=self.mse)


@dataclass(frozen=True)
class QuipWeight:
    """A piece of rows (or all of them) of a linear stored as QuIP: the rotated weight's
    codes and the signs. `inner` is the scalar grid's weight; `qidxs` and `scales` E8P's."""

    scheme: QuipScheme
    su: torch.Tensor  # [rows] int8
    sv: torch.Tensor  # [in] int8
    inner: QuantizedWeight | None = None
    qidxs: torch.Tensor | None = None  # [rows, in / 8] int16
    scales: torch.Tensor | None = None  # [rows, 1] float16

    @property
    def in_features(self) -> int:
        return len(self.sv)

    @property
    def out_features(self) -> int:
        return len(self.su)

    def tensors(self) -> dict[str, torch.Tensor]:
        signs = {"su": self.su, "sv": self.sv}
        if self.inner is not None:
            return {**self.inner.tensors(), **signs}
        return {"qidxs": self.qidxs, "scales": self.scales, **signs}

    def to(self, device: str | torch.device) -> QuipWeight:
        return QuipWeight.from_tensors({k: v.to(device) for k, v in self.tensors().items()}, self.scheme)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], scheme: QuipScheme) -> QuipWeight:
        signs = {"su": tensors["su"], "sv": tensors["sv"]}
        if scheme.codebook == "e8p":
            return cls(scheme=scheme, qidxs=tensors["qidxs"], scales=tensors["scales"], **signs)
        inner = QuantizedWeight.from_tensors(tensors, bits=scheme.bits, group_size=scheme.group_size)
        return cls(scheme=scheme, inner=inner, **signs)


def rotated(qw: QuipWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The quantized weight in the rotated space, Q [rows, in]."""
    if qw.inner is not None:
        from kernels.reference import dequantize  # the uniform grid's one definition

        return dequantize(qw.inner, dtype)
    rows = len(qw.qidxs)
    points = e8p.decode(qw.qidxs).reshape(rows, -1)  # [rows, in]
    return (points * qw.scales.float()).to(dtype)


def rotate_weight(W: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """W~ = Had_out diag(su) W diag(sv) Had_in^T, float32 [out, in]."""
    A = W.float() * su.float()[:, None] * sv.float()[None, :]
    A = hadamard.apply(A)  # each row by Had_in
    return hadamard.apply(A.T.contiguous()).T.contiguous()  # each column by Had_out


def restore(Wt: torch.Tensor, su: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """The inverse of rotate_weight: diag(su) Had_out^T W~ Had_in diag(sv)."""
    A = hadamard.apply(Wt.float().T.contiguous(), transpose=True).T
    A = hadamard.apply(A.contiguous(), transpose=True)
    return A * su.to(A.device).float()[:, None] * sv.to(A.device).float()[None, :]


def rotate_hessian(H: torch.Tensor, sv: torch.Tensor) -> torch.Tensor:
    """H~ = Had_in diag(sv) H diag(sv) Had_in^T, float32 [in, in]."""
    s = sv.float()
    A = hadamard.apply(H.float() * s[:, None] * s[None, :])
    return hadamard.apply(A.T.contiguous())


def decode(qw: QuipWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight W^ [out, in] in the model's space (all rows of the linear)."""
    return restore(rotated(qw), qw.su, qw.sv).to(dtype)


def hessian_incoherence(H: torch.Tensor) -> float:
    """max_i H_ii / mean_i H_ii: 1 for a perfectly flat diagonal."""
    d = H.diagonal().double()
    return float(d.max() / d.mean())


def weight_incoherence(W: torch.Tensor) -> float:
    """QuIP's mu of a weight: max |W_ij| sqrt(out * in) / ||W||_F (1: every entry equal)."""
    W = W.double()
    return float(W.abs().max() * math.sqrt(W.numel()) / W.norm())


def signs(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return hadamard.signs(out_features, seed, SALT_OUT), hadamard.signs(in_features, seed, SALT_IN)


@dataclass(frozen=True)
class Prepared:
    """What QuIP derives from H alone, shared by the linears (and row pieces) that read it:
    the rotated Hessian and GPTQ's solve of it."""

    H: torch.Tensor  # [in, in], rotated
    solve: GPTQPrepared


def prepare(H: torch.Tensor, config: QuipConfig = QuipConfig()) -> Prepared:
    _, sv = signs(1, len(H), config.seed)
    Ht = rotate_hessian(H, sv.to(H.device))
    return Prepared(H=Ht, solve=gptq_prepare(Ht, config.gptq))


def ldlq_e8p(Wt: torch.Tensor, solve: GPTQPrepared, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDLQ over runs of 8 columns of Wt [rows, in] (already divided by the row
    scales): each run rounded to its nearest E8P points, its error E = D U_bb^-1 pushed
    onto the later columns through U (the inverse Hessian's upper Cholesky factor), as
    GPTQ does one column at a time. Returns (codes int32 [rows, in / 8], points [rows, in])."""
    W = Wt.float().clone()
    W[:, solve.dead] = 0
    rows, n = W.shape
    U = solve.Hinv  # [in, in], upper
    step = e8p.DIM
    block_size = max(step, block_size - block_size % step)
    codes = torch.zeros(rows, n // step, dtype=torch.int32, device=W.device)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()  # [rows, b]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(0, i2 - i1, step):
            w = W1[:, j : j + step]  # [rows, 8]
            c = e8p.nearest(w)
            q = e8p.decode(c)
            codes[:, (i1 + j) // step] = c
            Q[:, i1 + j : i1 + j + step] = q
            E = torch.linalg.solve_triangular(U1[j : j + step, j : j + step], w - q, upper=True, left=False)
            W1[:, j + step :] -= E @ U1[j : j + step, j + step :]
            Err1[:, j : j + step] = E
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes, Q


def quip_rows(
    W: torch.Tensor,
    first: int,
    last: int,
    H: torch.Tensor,
    scheme: QuipScheme,
    config: QuipConfig = QuipConfig(),
    prepared: Prepared | None = None,
) -> tuple[QuipWeight, torch.Tensor, torch.Tensor]:
    """Rows first..last-1 of the whole weight W [out, in], quantized in the rotated space.
    The rotation mixes all rows, so every piece rotates the whole weight (O(out in log)).
    Returns (the piece, its rotated rows W~ [rows, in], the rotated Hessian)."""
    prepared = prepared or prepare(H, config)
    su, sv = signs(*W.shape, config.seed)
    Wt = rotate_weight(W, su.to(W.device), sv.to(W.device))[first:last]  # [rows, in]
    su = su[first:last]
    if scheme.codebook == "scalar":
        inner = gptq(Wt, prepared.H, scheme.grid, config.gptq, prepared.solve)
        return QuipWeight(scheme=scheme, su=su, sv=sv, inner=inner), Wt, prepared.H
    rms = Wt.square().mean(dim=1, keepdim=True).sqrt()  # [rows, 1]
    scales = torch.where(rms > 0, rms / e8p.OPT_SCALE, torch.ones_like(rms)).half()  # [rows, 1]
    codes, _ = ldlq_e8p(Wt / scales.float(), prepared.solve, config.block_size)
    qidxs = torch.where(codes >= 2**15, codes - 2**16, codes).to(torch.int16).cpu()
    return QuipWeight(scheme=scheme, su=su, sv=sv, qidxs=qidxs, scales=scales.cpu()), Wt, prepared.H


def quip(
    W: torch.Tensor, H: torch.Tensor, scheme: QuipScheme, config: QuipConfig = QuipConfig(), prepared: object = None
) -> QuipWeight:
    """The whole linear W [out, in] with input Hessian H [in, in]."""
    qw, _, _ = quip_rows(W, 0, len(W), H, scheme, config, prepared if isinstance(prepared, Prepared) else None)
    return qw
