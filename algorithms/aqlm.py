"""AQLM: Egiazarian et al., "Extreme Compression of Large Language Models via Additive
Quantization" (ICML 2024), the layer-wise phase (their Algorithm 1, steps 1-3).

Each row w_i [in] of W is cut into G = in / g groups; group j of row i is
s_i * sum_m C_m[b_ijm], with codebooks C_m [K, g] shared by all rows. The fit minimises
the Hessian-weighted error

    L = sum_i (w_i - ŵ_i) H (w_i - ŵ_i)^T,   H = X^T X / tokens  [in, in]

by alternating three steps, each of which never raises L:
  1. codes: for each group j in turn, a beam search over the M codebooks picks the codes
     that lower L most with every other group fixed (the paper's beam search);
  2. codebooks: with codes and scales fixed, L is a quadratic in the codebooks, solved by
     conjugate gradients from the current codebooks (the paper uses Adam; CG reaches the
     least-squares optimum of this quadratic in a few steps and needs no learning rate);
  3. scales: with the rest fixed each row's optimal scale is closed-form.
It starts from residual k-means of the row-normalised groups, weighted by diag(H), and
stops when an iteration lowers L by less than `rel_tol` of it, or after `max_iters`.

Rows only meet through the codebooks: given the codebooks, steps 1 and 3 are per row,
and the statistics of step 2 (gradients and CG products, [M*K, g]) are sums over rows.
Those sums are taken over row shards in a fixed order (`Shard`), so a fit split over
workers by rows is the same computation as in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from algorithms.codebook import CodebookScheme, CodebookWeight, decode_groups, store_codes
from algorithms.kmeans import assign, kmeans

SEARCH_SCORES = 2**21  # candidate scores held at once: rows searched together = this / (beam * K)
CG_TOL = 1e-5  # codebook updates stop once the residual of the normal equations falls by this factor
KMEANS_POINTS = 256  # k-means iterates on this many points per centroid, drawn from all groups,
KMEANS_MAX_POINTS = 2**20  # and at most this many (1x16: 16 per centroid; each Lloyd step is points x K)


@dataclass(frozen=True)
class AQLMConfig:
    """beam_size: hypotheses kept while searching a group's codes over the codebooks;
    max_iters / rel_tol: when the alternation stops; kmeans_iters: Lloyd steps per
    codebook at initialisation; cg_iters: conjugate-gradient steps per codebook update;
    seed: k-means' starting points."""

    beam_size: int = 4
    max_iters: int = 10
    rel_tol: float = 0.01
    kmeans_iters: int = 8
    cg_iters: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Shard:
    """Rows of W with their current codes and scales. codes [rows, G, M] int64 (0..K-1)."""

    W: torch.Tensor  # [rows, in] float32
    codes: torch.Tensor  # [rows, G, M]
    scales: torch.Tensor  # [rows] float32


def decode_rows(codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Unscaled rows [rows, in]."""
    return decode_groups(codes, books).reshape(len(codes), -1)


def scatter(codes: torch.Tensor, V: torch.Tensor, K: int) -> torch.Tensor:
    """The adjoint of decode_groups: V [rows, G, g] summed into the codewords that made
    each group, [M*K, g] (every codebook receives every group)."""
    rows, G, M = codes.shape
    offsets = torch.arange(M, device=codes.device) * K  # [M]
    idx = (codes + offsets).reshape(-1)  # [rows*G*M]
    src = V[:, :, None, :].expand(rows, G, M, V.shape[-1]).reshape(-1, V.shape[-1])  # [rows*G*M, g]
    return V.new_zeros(M * K, V.shape[-1]).index_add_(0, idx, src)


def loss(shard: Shard, books: torch.Tensor, H: torch.Tensor) -> float:
    R = shard.scales[:, None] * decode_rows(shard.codes, books) - shard.W  # [rows, in]
    return float(((R @ H) * R).sum())


# ---- step 1: codes ------------------------------------------------------------------
def search_codes(shard: Shard, books: torch.Tensor, H: torch.Tensor, beam: int) -> Shard:
    """Each group's codes by beam search over the codebooks, groups in order, the later
    groups seeing the earlier ones' new codes; a row's codes change only where L drops."""
    step = max(1, SEARCH_SCORES // (beam * books.shape[1]))
    parts = [
        _search_rows(shard.W[a : a + step], shard.codes[a : a + step], shard.scales[a : a + step], books, H, beam)
        for a in range(0, len(shard.W), step)
    ]
    return replace(shard, codes=torch.cat(parts))


def _search_rows(
    W: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, books: torch.Tensor, H: torch.Tensor, beam: int
) -> torch.Tensor:
    """The search for a few rows. For a group j whose unscaled value moves from u0 by a,
    L changes by 2 s a.(r H)_j + s^2 a^T H_jj a, with r = ŵ - w the row's residual."""
    M, K, g = books.shape
    rows, G, _ = codes.shape
    codes = codes.clone()
    groups = decode_groups(codes, books)  # [rows, G, g]
    RH = (s[:, None] * groups.reshape(rows, -1) - W) @ H  # [rows, in]
    s1, s2 = s[:, None, None], (s * s)[:, None, None]  # [rows, 1, 1]
    for j in range(G):
        sl = slice(j * g, (j + 1) * g)
        Hjj, rh = H[sl, sl], RH[:, None, sl]  # [g, g], [rows, 1, g]
        hyp = codes[:, j][:, None, :]  # [rows, 1, M] codes of each hypothesis
        d = W.new_zeros(rows, 1, g)  # [rows, B, g] hypothesis value - current value
        score = W.new_zeros(rows, 1)  # [rows, B] change of L
        for m in range(M):
            E = books[m]  # [K, g]
            base = d - E[hyp[..., m]]  # [rows, B, g] without codebook m's word
            bH = base @ Hjj  # [rows, B, g]
            const = 2 * s1[..., 0] * (base * rh).sum(-1) + s2[..., 0] * (bH * base).sum(-1)  # [rows, B]
            v = 2 * s1 * rh + 2 * s2 * bH  # [rows, B, g]
            q = ((E @ Hjj) * E).sum(-1)  # [K]
            scores = const[..., None] + v @ E.T + s2 * q  # [rows, B, K]
            B = scores.shape[1]
            top = scores.reshape(rows, B * K).topk(min(beam, B * K), dim=1, largest=False)  # sorted, best first
            h, c = top.indices // K, top.indices % K  # [rows, B']
            hyp = hyp.gather(1, h[..., None].expand(-1, -1, M)).clone()  # [rows, B', M]
            hyp[..., m] = c
            d = base.gather(1, h[..., None].expand(-1, -1, g)) + E[c]  # [rows, B', g]
            score = top.values
        better = score[:, 0] < 0  # [rows]
        codes[better, j] = hyp[better, 0]
        delta = torch.where(better[:, None], s[:, None] * d[:, 0], 0)  # [rows, g] change of ŵ_j
        RH += delta @ H[sl, :]
    return codes


# ---- step 2: codebooks --------------------------------------------------------------
def codebook_terms(shard: Shard, books: torch.Tensor, H: torch.Tensor, P: torch.Tensor | None) -> torch.Tensor:
    """The shard's share of the codebooks' normal equations A C = b: b - A C when P is
    None (half the negative gradient), else A P. Both [M*K, g]."""
    M, K, g = books.shape
    rows = len(shard.W)
    s = shard.scales[:, None]  # [rows, 1]
    if P is None:
        V = (shard.W - s * decode_rows(shard.codes, books)) @ H * s  # [rows, in]
    else:
        V = (s * decode_rows(shard.codes, P.reshape(M, K, g))) @ H * s  # [rows, in]
    return scatter(shard.codes, V.reshape(rows, -1, g), K)


def update_codebooks(pieces: Pieces, books: torch.Tensor, iters: int) -> torch.Tensor:
    """Conjugate gradients on A C = b from the current codebooks; the sums over pieces in
    row order. Never raises L (CG lowers the quadratic at every step from its start)."""
    M, K, g = books.shape
    C = books.reshape(M * K, g).clone()  # [M*K, g]
    r = sum_in_order(pieces.terms(books, None)).to(C.device)  # [M*K, g]
    p, rr = r.clone(), float((r * r).sum())
    floor = CG_TOL**2 * rr
    for _ in range(iters):
        if rr <= floor:  # converged: further float32 steps only lose orthogonality
            break
        Ap = sum_in_order(pieces.terms(books, p)).to(C.device)  # [M*K, g]
        pAp = float((p * Ap).sum())
        if pAp <= 0:
            break
        alpha = rr / pAp
        C += alpha * p
        r -= alpha * Ap
        rr, rr_old = float((r * r).sum()), rr
        p = r + (rr / rr_old) * p
    return C.reshape(M, K, g)


def sum_in_order(parts) -> torch.Tensor:
    total = None
    for part in parts:
        total = part if total is None else total + part
    return total


# ---- step 3: scales -----------------------------------------------------------------
def fit_scales(shard: Shard, books: torch.Tensor, H: torch.Tensor) -> Shard:
    """s_i = (d_i H w_i^T) / (d_i H d_i^T) with d_i the unscaled decoded row, rounded to
    float16; a row whose rounded scale would not lower L keeps its scale."""
    D = decode_rows(shard.codes, books)  # [rows, in]
    DH = D @ H  # [rows, in]
    num, den = (DH * shard.W).sum(1), (DH * D).sum(1)  # [rows]
    best = torch.where(den > 0, num / den.clamp(min=1e-30), shard.scales).half().float()  # [rows]

    def row_loss(s: torch.Tensor) -> torch.Tensor:
        return s * s * den - 2 * s * num  # L_i up to the constant w H w^T

    keep = row_loss(best) > row_loss(shard.scales)
    return replace(shard, scales=torch.where(keep, shard.scales, best))


# ---- initialisation -----------------------------------------------------------------
def initial_scales(W: torch.Tensor) -> torch.Tensor:
    """Each row's root mean square, rounded to float16 (1 for an all-zero row)."""
    rms = W.pow(2).mean(1).sqrt()  # [rows]
    return torch.where(rms > 0, rms, torch.ones_like(rms)).half().float()


def residual_kmeans(X: torch.Tensor, weights: torch.Tensor, K: int, M: int, config: AQLMConfig) -> torch.Tensor:
    """Codebook m clusters what codebooks 0..m-1 left of the points X [S, g] (weighted per
    coordinate): books [M, K, g], float16-rounded."""
    books, resid = [], X.clone()
    for m in range(M):
        C, idx = kmeans(resid, weights, K, iters=config.kmeans_iters, seed=config.seed + m)
        C = C.half().float()
        books.append(C)
        resid -= C[idx]
    return torch.stack(books)


def residual_codes(X: torch.Tensor, weights: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Each point's code in each codebook, in turn on what the earlier ones left: [S, M]."""
    codes, resid = [], X.clone()
    for C in books:
        idx = assign(resid, weights, C)
        codes.append(idx)
        resid -= C[idx]
    return torch.stack(codes, dim=1)


# ---- the pieces of a linear -----------------------------------------------------------
@dataclass
class LocalPieces:
    """Row pieces of one linear held here (all of them, or a worker's share): each method
    acts on every piece and returns per-piece results in row order, so that pieces held
    in several places are combined by concatenating their lists in row order. The pieces
    live on H's device; what the methods take and return lives on the CPU."""

    shards: list[Shard]  # by first row
    firsts: list[int]  # each shard's first row in the whole linear
    H: torch.Tensor  # [in, in]
    g: int  # in_group_size

    @classmethod
    def of(cls, W: torch.Tensor, ranges: list[tuple[int, int]], H: torch.Tensor, g: int) -> LocalPieces:
        """Rows first..last-1 of W [out, in] for each (first, last), as pieces in row order."""
        ranges = sorted(ranges)
        shards = []
        for first, last in ranges:
            rows = W[first:last].float()  # [rows, in]
            shards.append(Shard(W=rows, codes=rows.new_zeros(0, dtype=torch.int64), scales=initial_scales(rows)))
        return cls(shards=shards, firsts=[first for first, _ in ranges], H=H.float(), g=g)

    def points(self) -> int:
        """Groups held: rows * G over the pieces."""
        return sum(shard.W.numel() for shard in self.shards) // self.g

    def _here(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.H.device)

    def _points(self, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        """The row-normalised groups [rows*G, g] and their weights diag(H) per input."""
        rows, g = len(shard.W), self.g
        X = (shard.W / shard.scales[:, None]).reshape(-1, g)  # [rows*G, g]
        w = self.H.diagonal().clamp(min=0).reshape(1, -1, g).expand(rows, -1, g).reshape(-1, g)  # [rows*G, g]
        return X, w

    def sample(self, picks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per piece: (positions in `picks` of the points it holds, their X, their weights);
        point n of the linear is group n % G of row n // G."""
        out = []
        for shard, first in zip(self.shards, self.firsts, strict=True):
            G = shard.W.shape[1] // self.g
            lo, hi = first * G, (first + len(shard.W)) * G
            pos = ((picks >= lo) & (picks < hi)).nonzero()[:, 0]  # [n]
            X, w = self._points(shard)
            local = (picks[pos] - lo).to(X.device)
            out.append((pos, X[local].cpu(), w[local].cpu()))
        return out

    def assign(self, books: torch.Tensor) -> None:
        books = self._here(books)
        for k, shard in enumerate(self.shards):
            X, w = self._points(shard)
            codes = residual_codes(X, w, books).reshape(len(shard.W), -1, len(books))  # [rows, G, M]
            self.shards[k] = fit_scales(replace(shard, codes=codes), books, self.H)

    def search(self, books: torch.Tensor, beam: int) -> None:
        self.shards = [search_codes(shard, self._here(books), self.H, beam) for shard in self.shards]

    def fit_scales(self, books: torch.Tensor) -> None:
        self.shards = [fit_scales(shard, self._here(books), self.H) for shard in self.shards]

    def terms(self, books: torch.Tensor, P: torch.Tensor | None) -> list[torch.Tensor]:
        books, P = self._here(books), None if P is None else self._here(P)
        return [codebook_terms(shard, books, self.H, P).cpu() for shard in self.shards]

    def losses(self, books: torch.Tensor) -> list[float]:
        return [loss(shard, self._here(books), self.H) for shard in self.shards]

    def initial_books(self, X: torch.Tensor, weights: torch.Tensor, K: int, M: int, config: AQLMConfig) -> torch.Tensor:
        return residual_kmeans(self._here(X), self._here(weights), K, M, config).cpu()

    def weights(self, books: torch.Tensor, scheme: CodebookScheme) -> list[CodebookWeight]:
        return [pack(shard, self._here(books), scheme).to("cpu") for shard in self.shards]


class Pieces(Protocol):
    """All row pieces of a linear, wherever they are held (LocalPieces, or workers)."""

    def points(self) -> int: ...
    def initial_books(
        self, X: torch.Tensor, weights: torch.Tensor, K: int, M: int, config: AQLMConfig
    ) -> torch.Tensor: ...
    def sample(self, picks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...
    def assign(self, books: torch.Tensor) -> None: ...
    def search(self, books: torch.Tensor, beam: int) -> None: ...
    def fit_scales(self, books: torch.Tensor) -> None: ...
    def terms(self, books: torch.Tensor, P: torch.Tensor | None) -> list[torch.Tensor]: ...
    def losses(self, books: torch.Tensor) -> list[float]: ...


# ---- the fit ------------------------------------------------------------------------
def fit_pieces(pieces: Pieces, scheme: CodebookScheme, config: AQLMConfig) -> tuple[torch.Tensor, list[float]]:
    """The alternation over a linear's row pieces: the codebooks [M, K, g] and L after the
    initialisation and after each round. Sums over pieces are taken in row order, so the
    result depends on where the pieces are cut, never on where they are held.

    Initialisation: residual k-means on min(KMEANS_POINTS * K, KMEANS_MAX_POINTS) points
    drawn with the seed from all rows (all points if fewer), then every point's codes by
    residual assignment."""
    M, K, g = scheme.num_codebooks, scheme.codebook_size, scheme.in_group_size
    N = pieces.points()
    S = min(KMEANS_POINTS * K, KMEANS_MAX_POINTS)
    picks = torch.randperm(N, generator=torch.Generator().manual_seed(config.seed))[:S]
    X, w = torch.zeros(len(picks), g), torch.zeros(len(picks), g)  # [S, g]
    for pos, Xp, wp in pieces.sample(picks):  # CPU tensors, as every Pieces method returns
        X[pos], w[pos] = Xp, wp
    books = pieces.initial_books(X, w, K, M, config)  # [M, K, g], where the pieces are (a worker: GPU)

    def total(books: torch.Tensor) -> float:
        return sum(pieces.losses(books))

    pieces.assign(books)
    history = [total(books)]
    for _ in range(config.max_iters):
        pieces.search(books, config.beam_size)
        searched = total(books)
        updated = update_codebooks(pieces, books, config.cg_iters).half().float()
        if total(updated) < searched:  # float16 rounding can undo a tiny CG gain
            books = updated
        pieces.fit_scales(books)
        history.append(total(books))
        if history[-2] - history[-1] <= config.rel_tol * history[-2]:
            break
    return books, history


def fit(
    W: torch.Tensor, H: torch.Tensor, scheme: CodebookScheme, config: AQLMConfig = AQLMConfig()
) -> tuple[CodebookWeight, list[float]]:
    """Fit W [out, in] in the codebook format under H [in, in] (as one piece); returns the
    weight and L after initialisation and after each round."""
    scheme.groups(W.shape[1])
    pieces = LocalPieces.of(W, [(0, len(W))], H, scheme.in_group_size)
    books, history = fit_pieces(pieces, scheme, config)
    (weight,) = pieces.weights(books, scheme)
    return weight, history


def pack(shard: Shard, books: torch.Tensor, scheme: CodebookScheme) -> CodebookWeight:
    M, K, g = books.shape
    return CodebookWeight(
        codes=store_codes(shard.codes, scheme.nbits_per_codebook).contiguous(),
        codebooks=books.half().reshape(M, K, 1, g).contiguous(),
        scales=shard.scales.half().reshape(-1, 1, 1, 1).contiguous(),
    )


def aqlm(W: torch.Tensor, H: torch.Tensor, scheme: CodebookScheme, config: AQLMConfig = AQLMConfig()) -> CodebookWeight:
    return fit(W, H, scheme, config)[0]
