"""AQLM and VPTQ across the workers: each linear's rows are cut into the planner's pieces
(`scheme.solve_rows`), the pieces spread over the workers by cost, and the fit of
algorithms/aqlm.py or algorithms/vptq.py driven from here, one thread per linear: every
step runs on all the pieces at once where they are held, the codebooks go out to the
workers with each step, and what the fit sums over rows (AQLM's gradients and CG
products, [M*K, g]; VPTQ's column sums) or samples from them (the k-means points) comes
back per piece and is combined in row order. Only codebooks, sums and samples travel;
rows, codes and Hessians stay on the workers. The pieces depend on the recipe alone, so
the artifact is the same on any number of workers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType

import torch

from algorithms.aqlm import AQLMConfig
from algorithms.aqlm import fit_pieces as fit_additive
from algorithms.codebook import CodebookScheme
from algorithms.vector import VectorScheme
from algorithms.vptq import Books, VPTQConfig
from algorithms.vptq import fit_pieces as fit_vectors
from pipeline import cluster
from pipeline.balance import balance
from pipeline.plan import SolveTask


@dataclass(frozen=True)
class RemotePieces:
    """All the pieces of one linear, held by `holders` (runner handles) with the first rows
    `firsts[h]` each: algorithms.aqlm.Pieces and algorithms.vptq.Pieces over Ray (each
    fit calls its own steps)."""

    ray: ModuleType
    linear: str
    holders: tuple
    firsts: tuple[tuple[int, ...], ...]
    n_points: int

    def _each(self, op: str, *args: object) -> list:
        return cluster.get(self.ray, [h.codebook_call.remote(self.linear, op, *args) for h in self.holders])

    def _in_row_order(self, op: str, *args: object) -> list:
        held = self._each(op, *args)
        pairs = [
            (f, r)
            for firsts, results in zip(self.firsts, held, strict=True)
            for f, r in zip(firsts, results, strict=True)
        ]
        return [r for _, r in sorted(pairs, key=lambda p: p[0])]

    def points(self) -> int:
        return self.n_points

    def sample(self, picks: torch.Tensor, *args: object) -> list:
        return self._in_row_order("sample", picks, *args)

    def initial_books(self, *args: object) -> object:
        """The k-means of the sample, on the first holder (not in the driver)."""
        return cluster.get(self.ray, self.holders[0].codebook_call.remote(self.linear, "initial_books", *args))

    def column_sums(self) -> list[torch.Tensor]:
        return self._in_row_order("column_sums")

    def prepare(self, scale: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        self._each("prepare", scale, bias)

    def quantize(self, books: Books) -> list[float]:
        return self._in_row_order("quantize", books)

    def assign(self, books: torch.Tensor) -> None:
        self._each("assign", books)

    def search(self, books: torch.Tensor, beam: int) -> None:
        self._each("search", books, beam)

    def fit_scales(self, books: torch.Tensor) -> None:
        self._each("fit_scales", books)

    def terms(self, books: torch.Tensor, P: torch.Tensor | None) -> list[torch.Tensor]:
        return self._in_row_order("terms", books, P)

    def losses(self, books: torch.Tensor) -> list[float]:
        return self._in_row_order("losses", books)


def fit_codebooks(
    ray: ModuleType,
    runners: list,
    block: int,
    tasks: list[SolveTask],
    hessians: object,
    *,
    tokens: int,
    scheme: CodebookScheme | VectorScheme,
    config: AQLMConfig | VPTQConfig,
) -> list:
    """Fit every linear of `tasks` (their row pieces) on `runners`; references to the
    solved pieces, one list per runner that held any, as Run.solve returns them."""
    shares = balance([t.cost for t in tasks], len(runners))
    held = [(runner, [tasks[k] for k in share]) for runner, share in zip(runners, shares, strict=True) if share]
    cluster.get(
        ray,
        [
            r.codebook_open.remote(
                block, [(t.linear, t.first, t.last) for t in ts], hessians, tokens=tokens, scheme=scheme, options=config
            )
            for r, ts in held
        ],
    )
    linears = sorted({t.linear for t in tasks})

    def one(linear: str) -> object:
        mine = [(r, tuple(sorted(t.first for t in ts if t.linear == linear))) for r, ts in held]
        mine = [(r, firsts) for r, firsts in mine if firsts]
        rows = sum(t.last - t.first for t in tasks if t.linear == linear)
        in_features = next(t.in_features for t in tasks if t.linear == linear)
        vectors = isinstance(scheme, VectorScheme)
        pieces = RemotePieces(
            ray=ray,
            linear=linear,
            holders=tuple(r for r, _ in mine),
            firsts=tuple(f for _, f in mine),
            n_points=0 if vectors else rows * in_features // scheme.in_group_size,
        )
        if vectors:
            return fit_vectors(pieces, scheme, config, rows, in_features)[0]
        return fit_additive(pieces, scheme, config)[0]

    with ThreadPoolExecutor(max_workers=len(linears), thread_name_prefix="codebooks") as pool:
        books = dict(zip(linears, pool.map(one, linears), strict=True))
    return [r.codebook_finish.remote(books, scheme) for r, _ in held]
