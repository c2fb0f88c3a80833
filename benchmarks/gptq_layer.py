"""Solve one Llama-70B-shaped layer with lamina's GPTQ against a reference of the paper's algorithm.

Both are timed in the same process on the same inputs, interleaved, best of `--repeat`:
  lamina     `gptq(W, H, UniformScheme(bits=4, group_size=128, sym=True), GPTQConfig(act_order=True))`,
             packed codes included (its Hessian is factored in float64, see algorithms.gptq.inverse_cholesky)
  reference  `reference_gptq` below: Frantar et al., "GPTQ: Accurate Post-Training Quantization
             for Generative Pre-trained Transformers" (ICLR 2023), Algorithm 1 with lazy batch
             updates of 128 columns and act-order, written the way the paper's own code writes
             it (float32 throughout), with the grid rules of algorithms/grid.py
and then how closely they agree: the fraction of identical codes, whether both put every
column in the same group (g_idx), and the relative Hessian-weighted error
tr((W-Q) H (W-Q)^T) / tr(W H W^T) of each, on ERROR_ROWS evenly spaced rows (rows are solved
independently, so a subset of rows compares the two exactly on those rows). The script exits
non-zero if they disagree by more than MIN_SAME_CODES / MAX_ERROR_GAP allow.

Inputs (not timed): W [out, in] normal with a few outlier columns, and H = X^T X / tokens from
TOKENS_PER_FEATURE * in synthetic activations with correlated channels and a few large ones.

    python benchmarks/gptq_layer.py --shapes 1024x1024   # seconds
    python benchmarks/gptq_layer.py                      # 8192x8192 and 28672x8192: many minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from algorithms.gptq import GPTQConfig, gptq
from algorithms.hessian import proxy_error
from algorithms.packing import unpack
from algorithms.types import QuantizedWeight, UniformScheme
from kernels.reference import dequantize

BITS, GROUP, BLOCK, DAMP = 4, 128, 128, 0.01  # GROUP divides BLOCK: a group's columns all lie in one block
MAXQ, ZERO = 2**BITS - 1, 2 ** (BITS - 1)  # a symmetric grid is centred on ZERO
SHAPES = ("8192x8192", "28672x8192")  # Llama-70B [out, in]: q_proj / o_proj, and gate_proj / up_proj
TOKENS_PER_FEATURE = 2
LOW_RANK = 16  # the shared part of the activations has rank in / LOW_RANK
OUTLIERS = 256  # one column of W and one channel of X in this many is an outlier
ERROR_ROWS = 1024
# the float32 (reference) and float64-factored (lamina) inverse Hessians flip a few codes (0.9997 equal at
# 4096x4096) and move the error in the 5th digit; fail below this fraction of equal codes, or with errors this far apart
MIN_SAME_CODES, MAX_ERROR_GAP = 0.99, 0.01

T = TypeVar("T")


@dataclass(frozen=True)
class Solved:
    """The reference's result, columns in stored order."""

    codes: torch.Tensor  # uint8 [out, in]
    Q: torch.Tensor  # [out, in], the dequantized weight
    g_idx: torch.Tensor  # [in], the group of each column


def minmax_grid(w: torch.Tensor) -> torch.Tensor:
    """Scale [rows] of the symmetric grid of w [rows, cols], as algorithms/grid.py chooses it:
    the min-max range containing 0, made symmetric, the scale rounded to float16 (its stored dtype)."""
    xmax = torch.maximum(w.min(dim=1).values.clamp(max=0).abs(), w.max(dim=1).values.clamp(min=0))  # [rows]
    xmax = torch.where(xmax == 0, 1.0, xmax)
    return (2 * xmax / MAXQ).half().clamp(min=torch.finfo(torch.float16).tiny).float()


def reference_gptq(W: torch.Tensor, H: torch.Tensor) -> Solved:
    """GPTQ (Frantar et al. 2023, Algorithm 1) with lazy batches of BLOCK columns and act-order:
    columns solved by descending diag(H), groups of GROUP columns in solve order, each group's
    grid chosen when the solve reaches its first column. W [out, in], H [in, in]."""
    W, H = W.clone(), H.clone()  # [out, in], [in, in]
    out, n = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # [in]
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(DAMP * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # [in, in]
    Q = torch.zeros_like(W)  # [out, in]
    codes = torch.zeros(out, n, dtype=torch.uint8)  # [out, in]
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        W1 = W[:, i1:i2].clone()  # [out, b]
        Q1 = torch.zeros_like(W1)  # [out, b]
        Err1 = torch.zeros_like(W1)  # [out, b]
        Hinv1 = Hinv[i1:i2, i1:i2]  # [b, b]
        for i in range(i2 - i1):
            if (i1 + i) % GROUP == 0:
                scale = minmax_grid(W1[:, i : i + GROUP])  # [out]
            w = W1[:, i]  # [out]
            q = torch.clamp(torch.round(w / scale) + ZERO, 0, MAXQ)  # [out]
            codes[:, i1 + i] = q.to(torch.uint8)
            Q1[:, i] = scale * (q - ZERO)
            err = (w - Q1[:, i]) / Hinv1[i, i]  # [out]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    stored = torch.argsort(perm)  # [in], solve position of each stored column
    return Solved(codes=codes[:, stored], Q=Q[:, stored], g_idx=stored // GROUP)


def synthetic_hessian(n: int, generator: torch.Generator) -> torch.Tensor:
    """H = X^T X / tokens [n, n] of synthetic layer inputs X [tokens, n]: a low-rank part shared
    by all channels (correlated features), an independent part (full rank, so H is positive
    definite), log-normal channel magnitudes, and one channel in OUTLIERS 20x larger."""
    tokens, rank = TOKENS_PER_FEATURE * n, n // LOW_RANK
    X = torch.randn(tokens, rank, generator=generator) @ torch.randn(rank, n, generator=generator)  # [tokens, n]
    X /= rank**0.5
    X += torch.randn(tokens, n, generator=generator)
    X *= torch.randn(n, generator=generator).exp()  # [n] channel magnitudes
    X[:, torch.randperm(n, generator=generator)[: n // OUTLIERS]] *= 20
    return X.T @ X / tokens


def synthetic_weight(out: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """W [out, n] ~ N(0, 0.02^2), with one column in OUTLIERS 10x larger."""
    W = 0.02 * torch.randn(out, n, generator=generator)  # [out, n]
    W[:, torch.randperm(n, generator=generator)[: n // OUTLIERS]] *= 10
    return W


def timed(solve: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = solve()
    return time.perf_counter() - start, result


def measure(W: torch.Tensor, H: torch.Tensor, repeat: int) -> tuple[float, float, QuantizedWeight, Solved]:
    """Both solves, interleaved `repeat` times: the fastest time of each, and the last results."""
    scheme, config = UniformScheme(bits=BITS, group_size=GROUP, sym=True), GPTQConfig(act_order=True, damp=DAMP)
    best_lamina = best_reference = float("inf")
    for _ in range(repeat):
        seconds, qw = timed(lambda: gptq(W, H, scheme, config))
        best_lamina = min(best_lamina, seconds)
        seconds, solved = timed(lambda: reference_gptq(W, H))
        best_reference = min(best_reference, seconds)
    return best_lamina, best_reference, qw, solved


def relative_errors(W: torch.Tensor, H: torch.Tensor, qw: QuantizedWeight, solved: Solved) -> tuple[float, float]:
    """tr((W-Q) H (W-Q)^T) / tr(W H W^T) of lamina and of the reference, on ERROR_ROWS evenly spaced rows."""
    rows = torch.arange(0, W.shape[0], max(1, W.shape[0] // ERROR_ROWS))[:ERROR_ROWS]  # [r]
    ours = dataclasses.replace(qw, qweight=qw.qweight[rows], scales=qw.scales[rows], zeros=qw.zeros[rows])
    W = W[rows]  # [r, in]
    total = proxy_error(W, torch.zeros_like(W), H)
    return proxy_error(W, dequantize(ours), H) / total, proxy_error(W, solved.Q[rows], H) / total


def report(*, W: torch.Tensor, H: torch.Tensor, repeat: int, setup: float) -> None:
    """Time both solves of one layer, print the times, ratio and agreement; exit non-zero if they disagree."""
    out, n = W.shape
    print(
        f"shape      [{out}, {n}] ([out, in]), {BITS} bits, group {GROUP}, symmetric, act-order (dynamic groups); "
        f"H from {TOKENS_PER_FEATURE * n} tokens; inputs built in {setup:.1f} s"
    )
    lamina, reference, qw, solved = measure(W, H, repeat)
    print(f"lamina     best of {repeat}: {lamina:8.2f} s")
    print(f"reference  best of {repeat}: {reference:8.2f} s")
    print(f"ratio      lamina / reference: {lamina / reference:.3f}")
    same = (unpack(qw.qweight, BITS) == solved.codes).sum().item() / W.numel()
    same_groups = qw.g_idx is not None and torch.equal(qw.g_idx.long(), solved.g_idx)
    ours, theirs = relative_errors(W, H, qw, solved)
    rows = min(out, ERROR_ROWS)
    print(
        f"agreement  codes identical {same:.5f}; g_idx {'equal' if same_groups else 'NOT EQUAL'}; "
        f"relative Hessian-weighted error on {rows} of {out} rows: lamina {ours:.6f}, reference {theirs:.6f} "
        f"(ratio {ours / theirs:.4f})"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"memory     peak RSS of this process so far {peak / 2**30:.1f} GiB", flush=True)
    if not same_groups or same < MIN_SAME_CODES or abs(ours / theirs - 1) > MAX_ERROR_GAP:
        sys.exit(
            f"lamina and the reference disagree on [{out}, {n}]: codes identical {same:.4f} "
            f"(need {MIN_SAME_CODES}), error ratio {ours / theirs:.4f} (need within {MAX_ERROR_GAP}), "
            f"g_idx {'equal' if same_groups else 'different'}"
        )


def parse_shape(text: str) -> tuple[int, int]:
    out, _, n = text.partition("x")
    if not (out.isdigit() and n.isdigit()) or int(n) % GROUP or not int(out):
        raise argparse.ArgumentTypeError(f"{text!r}: want OUTxIN with IN a multiple of {GROUP}, e.g. 1024x1024")
    return int(out), int(n)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in SHAPES], help="[out, in] as OUTxIN"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeat", type=int, default=1, help="report the best of this many timings")
    args = parser.parse_args()
    if args.threads < 1 or args.repeat < 1:
        parser.error("--threads and --repeat must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    hessians: dict[int, torch.Tensor] = {}  # [in, in] by in: layers with one input share its Hessian
    for out, n in args.shapes:
        start = time.perf_counter()
        if n not in hessians:
            hessians[n] = synthetic_hessian(n, torch.Generator().manual_seed(n))
        W = synthetic_weight(out, n, torch.Generator().manual_seed(out * n))  # [out, in]
        report(W=W, H=hessians[n], repeat=args.repeat, setup=time.perf_counter() - start)


if __name__ == "__main__":
    main()
