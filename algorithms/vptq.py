"""VPTQ: Liu et al., "VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large
Language Models" (EMNLP 2024), the layer-wise algorithm, in the vector format of
algorithms/vector.py.

Vectors run along the output dimension: v consecutive rows of one input column (the only
direction the `vptq` package's kernels and loader implement). That is what lets VPTQ
keep GPTQ's column-by-column error feedback (the paper's "channel-independent
second-order optimisation"): a whole column is quantized at once, vector by vector, and
its error pushed onto the columns not yet quantized through the inverse Hessian's
Cholesky factor, exactly as GPTQ pushes a rounded column's.

  1. normalisation (optional): each input column j becomes (W[:, j] - mean_j) / std_j,
     float16 mean and std; the problem keeps its form with H scaled to S H S;
  2. order: the `outlier_size` columns with the largest Hessian diagonal first (they get
     the outlier codebook), then the rest by descending diagonal (act_order) or in order;
  3. codebooks: k-means of the vectors of each group's columns, each vector weighted by
     its column's Hessian diagonal (the paper's Hessian-weighted centroid initialisation:
     the diagonal term of the error the vector's rounding causes), on a sample drawn with
     the seed from all rows; the residual codebook by k-means of what the main one left;
  4. assignment: GPTQ over the reordered columns, each column's vectors set to their
     nearest centroid (all of a column's coordinates weigh the same, H_jj, so the plain
     nearest is the Hessian-weighted nearest), then the nearest residual centroid.

Rows are independent given the codebooks and the normalisation, and those come from
sums and samples over all rows taken in row order: a linear cut into row pieces (`Pieces`)
fits to the same bytes wherever its pieces are held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from algorithms.gptq import inverse_cholesky
from algorithms.kmeans import kmeans
from algorithms.vector import VectorScheme, VectorWeight, pack_indices, to_int16

KMEANS_POINTS = 256  # k-means iterates on this many vectors per centroid,
KMEANS_MAX_POINTS = 2**20  # and at most this many per codebook
NEAREST_SCORES = 2**24  # distances held at once while assigning a column's vectors


@dataclass(frozen=True)
class VPTQConfig:
    """damp: fraction of the mean Hessian diagonal added to it; block_size: GPTQ's lazy
    batch; act_order: quantize (non-outlier) columns by descending Hessian diagonal;
    kmeans_iters: Lloyd steps per codebook; seed: the k-means sample and starts."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    kmeans_iters: int = 10
    seed: int = 0


@dataclass(frozen=True)
class Books:
    """What all row pieces of a linear share: normalisation [in] (None without) and the
    codebooks, float16 values held as float32."""

    centroids: torch.Tensor  # [G, K, v]
    res_centroids: torch.Tensor | None = None  # [G, Kr, v]
    outlier_centroids: torch.Tensor | None = None  # [Ko, vo]
    scale: torch.Tensor | None = None  # [in]
    bias: torch.Tensor | None = None  # [in]

    def to(self, device: str | torch.device) -> Books:
        moved = {k: None if t is None else t.to(device) for k, t in self.__dict__.items()}
        return Books(**moved)


def column_order(H: torch.Tensor, outliers: int, act_order: bool) -> torch.Tensor:
    """The reordered columns [in]: the `outliers` with the largest diagonal (largest first),
    then the rest by descending diagonal (act_order) or in order."""
    by_diag = torch.argsort(H.diagonal(), descending=True, stable=True)
    rest = by_diag[outliers:] if act_order else torch.sort(by_diag[outliers:]).values
    return torch.cat([by_diag[:outliers], rest])


def normalisation(sums: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(std, mean) per column, float16-rounded, from the column sums [2, in] (sum, sum of
    squares, float64) over `rows` rows; a constant column gets std 1."""
    mean = sums[0] / rows
    var = (sums[1] / rows - mean * mean).clamp(min=0)
    std = var.sqrt().half().float()
    return torch.where(std > 0, std, torch.ones_like(std)), mean.half().float()


def nearest(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The nearest centroid of each vector: X [n, v], C [K, v] -> [n] int64."""
    Csq = (C * C).sum(1)  # [K]
    out = torch.empty(len(X), dtype=torch.int64, device=X.device)
    step = max(1, NEAREST_SCORES // len(C))
    for a in range(0, len(X), step):
        out[a : a + step] = (Csq - 2 * X[a : a + step] @ C.T).argmin(dim=1)
    return out


@dataclass
class Piece:
    """Rows of a linear (normalised and reordered once `prepare` ran) and their codes."""

    W: torch.Tensor  # [rows, in] float32, as given
    Wn: torch.Tensor | None = None  # [rows, in] normalised, columns in `order`
    codes: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LocalPieces:
    """Row pieces of one linear held here (all, or a worker's share); as in
    algorithms.aqlm, every method returns per-piece results in row order, and what it
    takes and returns lives on the CPU while the pieces live on H's device."""

    pieces: list[Piece]
    firsts: list[int]
    H: torch.Tensor  # [in, in]
    scheme: VectorScheme
    config: VPTQConfig
    out_features: int
    order: torch.Tensor | None = None  # [in]
    Hn: torch.Tensor | None = None  # [in, in], normalised, in `order`

    @classmethod
    def of(
        cls, W: torch.Tensor, ranges: list[tuple[int, int]], H: torch.Tensor, scheme: VectorScheme, config: VPTQConfig
    ) -> LocalPieces:
        """Rows first..last-1 of W [out, in] for each (first, last): every first a multiple
        of the vector lengths."""
        ranges = sorted(ranges)
        n_out, _ = scheme.layout(*W.shape)
        lengths = (scheme.vector_len, scheme.outlier_vector_len) if n_out else (scheme.vector_len,)
        if any(first % v for first, _ in ranges for v in lengths):
            raise ValueError(f"row pieces must start at multiples of the vector lengths {lengths}")
        pieces = [Piece(W=W[first:last].float()) for first, last in ranges]
        return cls(pieces, [first for first, _ in ranges], H.float(), scheme, config, out_features=len(W))

    @property
    def shards(self) -> list[Piece]:
        return self.pieces

    @property
    def in_features(self) -> int:
        return self.H.shape[0]

    def _here(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.H.device)

    def column_sums(self) -> list[torch.Tensor]:
        """Per piece: [2, in] float64, the sum and the sum of squares of each column."""
        return [torch.stack([p.W.double().sum(0), p.W.double().pow(2).sum(0)]).cpu() for p in self.pieces]

    def prepare(self, scale: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        """Normalise (with the linear's float16 std and mean) and reorder the pieces."""
        n_out, _ = self.scheme.layout(self.out_features, self.in_features)
        self.order = column_order(self.H, n_out, self.config.act_order)
        s = torch.ones(self.in_features, device=self.H.device) if scale is None else self._here(scale)
        b = torch.zeros(self.in_features, device=self.H.device) if bias is None else self._here(bias)
        for p in self.pieces:
            p.Wn = ((p.W - b) / s)[:, self.order]
        self.Hn = (s[:, None] * self.H * s[None, :])[self.order][:, self.order]

    def _vectors(self, p: Piece, columns: slice, v: int) -> torch.Tensor:
        """The vectors of the reordered columns `columns`: [rows/v * ncols, v], vector row major."""
        block = p.Wn[:, columns]  # [rows, n]
        return block.reshape(-1, v, block.shape[1]).permute(0, 2, 1).reshape(-1, v)

    def sample(self, picks: torch.Tensor, outliers: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per piece: (positions in `picks` of the vectors it holds, the vectors, their
        weights). Vector n of the linear's main columns is column n % (in - outlier_size)
        (after the outliers) of vector row n // that; of its outlier columns likewise."""
        n_out, _ = self.scheme.layout(self.out_features, self.in_features)
        v = self.scheme.outlier_vector_len if outliers else self.scheme.vector_len
        columns = slice(0, n_out) if outliers else slice(n_out, self.in_features)
        width = columns.stop - columns.start
        diag = self.Hn.diagonal()[columns].clamp(min=0)  # [width]
        out = []
        for p, first in zip(self.pieces, self.firsts, strict=True):
            lo, hi = first // v * width, (first + len(p.W)) // v * width
            pos = ((picks >= lo) & (picks < hi)).nonzero()[:, 0]  # [n]
            local = (picks[pos] - lo).to(self.H.device)
            X = self._vectors(p, columns, v)[local]  # [n, v]
            out.append((pos, X.cpu(), diag[local % width].cpu()))
        return out

    def initial_books(self, samples: dict, scale: torch.Tensor | None, bias: torch.Tensor | None) -> Books:
        """The k-means of the samples (see fit_pieces), here."""
        s, c = self.scheme, self.config
        books, residual = [], []
        for g, (X, w) in enumerate(samples["groups"]):
            X, w = self._here(X), self._here(w)[:, None].expand(X.shape)  # [S, v]
            C, idx = kmeans(X, w, s.num_centroids, iters=c.kmeans_iters, seed=c.seed + g)
            C = C.half().float()
            books.append(C)
            if s.num_res_centroids:
                R, _ = kmeans(X - C[idx], w, s.num_res_centroids, iters=c.kmeans_iters, seed=c.seed + g)
                residual.append(R.half().float())
        outlier = None
        if samples.get("outliers") is not None:
            X, w = (self._here(t) for t in samples["outliers"])
            outlier, _ = kmeans(X, w[:, None].expand(X.shape), s.outlier_centroids, iters=c.kmeans_iters, seed=c.seed)
            outlier = outlier.half().float()
        return Books(
            centroids=torch.stack(books),
            res_centroids=torch.stack(residual) if residual else None,
            outlier_centroids=outlier,
            scale=scale,
            bias=bias,
        ).to("cpu")

    def quantize(self, books: Books) -> list[float]:
        """GPTQ over every piece with the codebooks; per piece tr(ΔW H ΔW^T) afterwards."""
        books = books.to(self.H.device)
        with torch.device(self.H.device):
            Hinv = inverse_cholesky(self.Hn, self.config.damp).to(self.H.device)
        return [self._quantize(p, books, Hinv) for p in self.pieces]

    def _quantize(self, p: Piece, books: Books, Hinv: torch.Tensor) -> float:
        s = self.scheme
        n_out, gs = s.layout(self.out_features, self.in_features)
        W = p.Wn.clone()  # [rows, in], reordered
        rows, n = W.shape
        Q = torch.zeros_like(W)
        main = torch.zeros(n - n_out, rows // s.vector_len, dtype=torch.int64, device=W.device)
        res = torch.zeros_like(main)
        outl = torch.zeros(n_out, rows // s.outlier_vector_len, dtype=torch.int64, device=W.device)
        for i1 in range(0, n, self.config.block_size):
            i2 = min(i1 + self.config.block_size, n)
            W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device), Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                w = W1[:, i]  # [rows]
                if col < n_out:
                    X = w.reshape(-1, s.outlier_vector_len)
                    outl[col] = nearest(X, books.outlier_centroids)
                    q = books.outlier_centroids[outl[col]]
                else:
                    k, g = col - n_out, (col - n_out) // gs
                    X = w.reshape(-1, s.vector_len)
                    main[k] = nearest(X, books.centroids[g])
                    q = books.centroids[g][main[k]]
                    if books.res_centroids is not None:
                        res[k] = nearest(X - q, books.res_centroids[g])
                        q = q + books.res_centroids[g][res[k]]
                q = q.reshape(-1)  # [rows]
                Q[:, col] = q
                err = (w - q) / Hinv1[i, i]
                W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        p.codes = {"main": main, "res": res, "outliers": outl}
        D = Q - p.Wn  # normalised error, reordered columns
        return float(((D @ self.Hn) * D).sum())

    def weights(self, books: Books) -> list[VectorWeight]:
        """Each piece in the vector format."""
        s = self.scheme
        n_out, gs = s.layout(self.out_features, self.in_features)
        out = []
        for p in self.pieces:
            c = p.codes
            G, R = s.group_num, len(p.W) // s.vector_len
            main = c["main"].reshape(G, gs, R).permute(0, 2, 1)  # [G, R, gs]
            res = c["res"].reshape(G, gs, R).permute(0, 2, 1) if s.num_res_centroids else None
            out.append(
                VectorWeight(
                    scheme=s,
                    indices=pack_indices(main, res, s.index_bits, s.res_bits).cpu().contiguous(),
                    centroids=books.centroids.reshape(G, -1).half().cpu().contiguous(),
                    perm=to_int16(self.order).cpu(),
                    res_centroids=None
                    if books.res_centroids is None
                    else books.res_centroids.reshape(G, -1).half().cpu().contiguous(),
                    outlier_indices=None if not n_out else to_int16(c["outliers"].T[None]).cpu().contiguous(),
                    outlier_centroids=None
                    if books.outlier_centroids is None
                    else books.outlier_centroids.reshape(1, -1).half().cpu().contiguous(),
                    weight_scale=None if books.scale is None else books.scale.half().cpu(),
                    weight_bias=None if books.bias is None else books.bias.half().cpu(),
                )
            )
        return out


class Pieces(Protocol):
    """All row pieces of a linear, wherever they are held (LocalPieces, or workers)."""

    def column_sums(self) -> list[torch.Tensor]: ...
    def prepare(self, scale: torch.Tensor | None, bias: torch.Tensor | None) -> None: ...
    def sample(self, picks: torch.Tensor, outliers: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...
    def initial_books(self, samples: dict, scale: torch.Tensor | None, bias: torch.Tensor | None) -> Books: ...
    def quantize(self, books: Books) -> list[float]: ...


def _draw(pieces: Pieces, n: int, S: int, v: int, seed: int, outliers: bool) -> tuple[torch.Tensor, ...]:
    """S of the n vectors, drawn with `seed`: (picks, vectors [S, v], weights [S])."""
    picks = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:S]
    X, w = torch.zeros(len(picks), v), torch.zeros(len(picks))
    for pos, Xp, wp in pieces.sample(picks, outliers):
        X[pos], w[pos] = Xp, wp
    return picks, X, w


def fit_books(pieces: Pieces, scheme: VectorScheme, config: VPTQConfig, out_features: int, in_features: int) -> Books:
    """What a linear's row pieces share: normalisation and codebooks (the pieces are left
    normalised and reordered). Sums and samples are taken in row order."""
    n_out, gs = scheme.layout(out_features, in_features)
    scale = bias = None
    if scheme.normalize:
        scale, bias = normalisation(sum(pieces.column_sums()), out_features)
    pieces.prepare(scale, bias)
    width = in_features - n_out
    n = out_features // scheme.vector_len * width
    S = min(KMEANS_POINTS * scheme.num_centroids, KMEANS_MAX_POINTS) * scheme.group_num
    picks, X, w = _draw(pieces, n, S, scheme.vector_len, config.seed, outliers=False)
    group = picks % width // gs  # [S]
    samples: dict = {"groups": [(X[group == g], w[group == g]) for g in range(scheme.group_num)]}
    if n_out:
        n = out_features // scheme.outlier_vector_len * n_out
        S = min(KMEANS_POINTS * scheme.outlier_centroids, KMEANS_MAX_POINTS)
        samples["outliers"] = _draw(pieces, n, S, scheme.outlier_vector_len, config.seed + 1, outliers=True)[1:]
    return pieces.initial_books(samples, scale, bias)


def fit_pieces(
    pieces: Pieces, scheme: VectorScheme, config: VPTQConfig, out_features: int, in_features: int
) -> tuple[Books, float]:
    """The fit over a linear's row pieces: the shared Books and tr(ΔW H ΔW^T) of all rows
    (the pieces hold their codes)."""
    books = fit_books(pieces, scheme, config, out_features, in_features)
    return books, sum(pieces.quantize(books))


def fit(
    W: torch.Tensor, H: torch.Tensor, scheme: VectorScheme, config: VPTQConfig = VPTQConfig()
) -> tuple[VectorWeight, float]:
    """Fit W [out, in] under H [in, in] as one piece: the weight and tr(ΔW H ΔW^T)."""
    pieces = LocalPieces.of(W, [(0, len(W))], H, scheme, config)
    books, error = fit_pieces(pieces, scheme, config, *W.shape)
    (weight,) = pieces.weights(books)
    return weight, error


def vptq(W: torch.Tensor, H: torch.Tensor, scheme: VectorScheme, config: VPTQConfig = VPTQConfig()) -> VectorWeight:
    return fit(W, H, scheme, config)[0]
