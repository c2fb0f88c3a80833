"""The vector format (VPTQ's layout): its scheme and weight type.

The columns of W [out, in] are reordered by `perm` (stored column k of the reordered
weight is input perm[k]). The first `outlier_size` reordered columns are the outliers,
the rest are cut into `group_num` groups of `group_size` columns. Within a column, each
run of `vector_len` consecutive rows (outputs) is one vector, coded by the index of a
centroid of its group's codebook, plus (optionally) the index of a centroid of the
group's residual codebook; outlier columns have their own codebook and vector length.
Then, with normalisation, input column j is scaled and shifted:

    Q[o, outlier_size + c*group_size + k] = centroids[c, idx[c, o // v, k], o % v]
                                          + res_centroids[c, res_idx[c, o // v, k], o % v]
    W[:, perm[k]] = Q[:, k];   W[:, j] = W[:, j] * weight_scale[j] + weight_bias[j]

The tensors are the `vptq` package's (VQuantLinear with packed indices, vector_quant_dim
"out"), so that the native artifact and the vptq export hold the same bytes:
    indices:           [group_num, out / v, ceil(group_size * bits / 32)] int32: per vector
                       row and group, the group_size indices (main | residual << main bits,
                       `bits` = their sum) as one little-endian bit stream, 32 bits a word
    centroids:         [group_num, K * v] float16 (K = num_centroids)
    res_centroids:     [group_num, Kr * v] float16 (only with a residual codebook)
    outlier_indices:   [1, out / vo, outlier_size] int16 (as uint16; only with outliers)
    outlier_centroids: [1, Ko * vo] float16 (only with outliers)
    perm:              [in] int16 (as uint16)
    weight_scale, weight_bias: [in] float16 (only with normalisation)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

SUFFIXES = (
    "indices",
    "centroids",
    "res_centroids",
    "outlier_indices",
    "outlier_centroids",
    "perm",
    "weight_scale",
    "weight_bias",
)
PACK_ROWS = 4096  # vector rows packed or unpacked at once (their bits are held as int64)


def _power_of_two(name: str, n: int) -> None:
    if n < 2 or n & (n - 1) or n > 2**16:
        raise ValueError(f"{name} must be a power of two in 2..65536, got {n}")


@dataclass(frozen=True)
class VectorScheme:
    """vector_len, num_centroids: the main codebooks (log2(K) / v bits per weight);
    num_res_centroids: a residual codebook per group (0: none); group_num: codebooks per
    linear, each for its share of the (non-outlier) columns; outlier_percent: the share
    of columns, those with the largest Hessian diagonal, coded with their own codebook
    of outlier_centroids vectors of outlier_vector_len; normalize: each input column
    stored as (W[:, j] - mean) / std, its mean and std kept in float16."""

    vector_len: int = 8
    num_centroids: int = 65536
    num_res_centroids: int = 0
    group_num: int = 1
    outlier_percent: float = 0.0
    outlier_vector_len: int = 8
    outlier_centroids: int = 256
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.vector_len < 1 or self.outlier_vector_len < 1:
            raise ValueError("vector lengths must be >= 1")
        _power_of_two("num_centroids", self.num_centroids)
        if self.num_res_centroids:
            _power_of_two("num_res_centroids", self.num_res_centroids)
            if self.num_res_centroids > self.num_centroids:  # vptq unpacks residual indices with the main mask
                raise ValueError("num_res_centroids must not exceed num_centroids")
        if self.group_num < 1:
            raise ValueError(f"group_num must be >= 1, got {self.group_num}")
        if not 0 <= self.outlier_percent < 100:
            raise ValueError(f"outlier_percent must be in [0, 100), got {self.outlier_percent}")
        if self.outlier_percent:
            _power_of_two("outlier_centroids", self.outlier_centroids)
            if self.outlier_vector_len < 2:  # vptq's VQuantLinear ignores outliers of length 1
                raise ValueError("outlier_vector_len must be >= 2")

    @property
    def index_bits(self) -> int:
        return self.num_centroids.bit_length() - 1

    @property
    def res_bits(self) -> int:
        return self.num_res_centroids.bit_length() - 1 if self.num_res_centroids else 0

    @property
    def name(self) -> str:
        res = f"-{self.num_res_centroids}" if self.num_res_centroids else ""
        return f"v{self.vector_len}-k{self.num_centroids}{res}"

    def outlier_size(self, in_features: int) -> int:
        """Outlier columns of a linear: the share rounded down, then down again until the
        group count divides the rest."""
        n = math.floor(in_features * self.outlier_percent / 100)
        while n > 0 and (in_features - n) % self.group_num:
            n -= 1
        return n

    def layout(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(outlier_size, group_size) of a linear; raises if the vectors or the groups do
        not fit its shape."""
        if out_features % self.vector_len:
            raise ValueError(f"vector_len {self.vector_len} does not divide output size {out_features}")
        n = self.outlier_size(in_features)
        if n and out_features % self.outlier_vector_len:
            raise ValueError(f"outlier_vector_len {self.outlier_vector_len} does not divide output size {out_features}")
        if (in_features - n) % self.group_num:
            raise ValueError(f"group_num {self.group_num} does not divide input size {in_features}")
        return n, (in_features - n) // self.group_num

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Indices (packed per group), codebooks, perm and normalisation, over the weight."""
        n, gs = self.layout(out_features, in_features)
        bits = (
            self.group_num * (out_features // self.vector_len) * math.ceil(gs * (self.index_bits + self.res_bits) / 32)
        )
        bits = bits * 32 + self.group_num * (self.num_centroids + self.num_res_centroids) * self.vector_len * 16
        if n:
            bits += (
                out_features // self.outlier_vector_len
            ) * n * 16 + self.outlier_centroids * self.outlier_vector_len * 16
        bits += in_features * 16 * (3 if self.normalize else 1)
        return bits / (out_features * in_features)

    def fields(self) -> dict:
        """The scheme as lamina's quantization_config names it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_fields(cls, qc: dict) -> VectorScheme:
        """KeyError names a missing field, ValueError a bad one."""
        kinds = {f.name: f.type for f in fields(cls)}
        cast = {"int": int, "float": float, "bool": bool}
        return cls(**{name: cast[kind](qc[name]) for name, kind in kinds.items()})


def pack_indices(main: torch.Tensor, res: torch.Tensor | None, index_bits: int, res_bits: int = 0) -> torch.Tensor:
    """Indices [..., R, n] (and residual indices) as vptq's packed int32 [..., R, words]:
    element e's (main | res << index_bits) at bits e*b .. e*b+b-1 of the row's stream."""
    b = index_bits + res_bits
    merged = main.to(torch.int64) | (res.to(torch.int64) << index_bits if res is not None else 0)
    *lead, R, n = merged.shape
    words = math.ceil(n * b / 32)
    merged = merged.reshape(-1, R, n)
    out = torch.empty(merged.shape[0], R, words, dtype=torch.int32, device=merged.device)
    shifts = torch.arange(b, device=merged.device)
    weights = torch.ones(32, dtype=torch.int64, device=merged.device) << torch.arange(32, device=merged.device)
    for a in range(0, R, PACK_ROWS):
        m = merged[:, a : a + PACK_ROWS]  # [L, r, n]
        bits = ((m[..., None] >> shifts) & 1).reshape(*m.shape[:2], n * b)  # [L, r, n*b]
        bits = torch.nn.functional.pad(bits, (0, words * 32 - n * b)).reshape(*m.shape[:2], words, 32)
        word = (bits * weights).sum(-1)  # [L, r, words], 0 .. 2**32-1
        out[:, a : a + PACK_ROWS] = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return out.reshape(*lead, R, words)


def unpack_indices(
    packed: torch.Tensor, n: int, index_bits: int, res_bits: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_indices' inverse: (main, residual) int64 [..., R, n] (residual zeros without)."""
    b = index_bits + res_bits
    *lead, R, words = packed.shape
    flat = packed.reshape(-1, R, words).to(torch.int64) & 0xFFFFFFFF
    main = torch.empty(flat.shape[0], R, n, dtype=torch.int64, device=packed.device)
    res = torch.empty_like(main)
    shifts = torch.arange(32, device=packed.device)
    weights = torch.ones(b, dtype=torch.int64, device=packed.device) << torch.arange(b, device=packed.device)
    for a in range(0, R, PACK_ROWS):
        w = flat[:, a : a + PACK_ROWS]  # [L, r, words]
        bits = ((w[..., None] >> shifts) & 1).reshape(*w.shape[:2], words * 32)[..., : n * b]
        merged = (bits.reshape(*w.shape[:2], n, b) * weights).sum(-1)  # [L, r, n]
        main[:, a : a + PACK_ROWS] = merged & ((1 << index_bits) - 1)
        res[:, a : a + PACK_ROWS] = merged >> index_bits
    return main.reshape(*lead, R, n), res.reshape(*lead, R, n)


def as_uint16(t: torch.Tensor) -> torch.Tensor:
    """Stored int16 (uint16 bits) as int64 0..65535."""
    return t.to(torch.int64) & 0xFFFF


def to_int16(t: torch.Tensor) -> torch.Tensor:
    """Values 0..65535 as int16 holding their uint16 bits."""
    t = t.to(torch.int64)
    return torch.where(t >= 2**15, t - 2**16, t).to(torch.int16)


@dataclass(frozen=True)
class VectorWeight:
    """A linear weight in the vector format (tensors as in the module docstring)."""

    scheme: VectorScheme
    indices: torch.Tensor
    centroids: torch.Tensor
    perm: torch.Tensor
    res_centroids: torch.Tensor | None = None
    outlier_indices: torch.Tensor | None = None
    outlier_centroids: torch.Tensor | None = None
    weight_scale: torch.Tensor | None = None
    weight_bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.perm.shape[0]

    @property
    def out_features(self) -> int:
        return self.indices.shape[1] * self.scheme.vector_len

    @property
    def outlier_size(self) -> int:
        return 0 if self.outlier_indices is None else self.outlier_indices.shape[-1]

    @property
    def group_size(self) -> int:
        return (self.in_features - self.outlier_size) // self.indices.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s) for s in SUFFIXES if getattr(self, s) is not None}

    def to(self, device: str | torch.device) -> VectorWeight:
        return VectorWeight(self.scheme, **{s: t.to(device) for s, t in self.tensors().items()})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], scheme: VectorScheme) -> VectorWeight:
        return cls(scheme, **{s: tensors[s] for s in SUFFIXES if s in tensors})


def decode_columns(cw: VectorWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reordered, unnormalised weight Q [out, in] (columns in perm order)."""
    s = cw.scheme
    G, v, gs = cw.indices.shape[0], s.vector_len, cw.group_size
    main, res = unpack_indices(cw.indices, gs, s.index_bits, s.res_bits)  # [G, out/v, gs]
    books = cw.centroids.to(dtype).reshape(G, -1, v)  # [G, K, v]
    picked = torch.stack([books[c][main[c]] for c in range(G)])  # [G, out/v, gs, v]
    if cw.res_centroids is not None:
        res_books = cw.res_centroids.to(dtype).reshape(G, -1, v)  # [G, Kr, v]
        picked = picked + torch.stack([res_books[c][res[c]] for c in range(G)])
    Q = picked.permute(1, 3, 0, 2).reshape(cw.out_features, G * gs)  # [out, G*gs]
    if cw.outlier_indices is not None:
        vo = s.outlier_vector_len
        idx = as_uint16(cw.outlier_indices[0])  # [out/vo, n]
        outliers = cw.outlier_centroids.to(dtype).reshape(-1, vo)[idx]  # [out/vo, n, vo]
        Q = torch.cat([outliers.permute(0, 2, 1).reshape(cw.out_features, -1), Q], dim=1)
    return Q


def decode(cw: VectorWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dequantized weight [out, in]."""
    W = decode_columns(cw, dtype)[:, torch.argsort(as_uint16(cw.perm))]  # [out, in]
    if cw.weight_scale is not None:
        W = W * cw.weight_scale.to(dtype) + cw.weight_bias.to(dtype)
    return W
