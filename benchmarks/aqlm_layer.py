"""Time to fit one layer with AQLM, phase by phase, against GPTQ 2-bit g64 on the same
layer in the same run, and the extrapolated time of a whole Llama-3-70B on N workers.

The initialisation runs on the whole layer; every later phase is linear in the rows
(codes and scales are per row; the codebook statistics are sums over rows), so on CPU one
round is timed on `--rows` of the rows and scaled up; on a GPU pass `--rows 0`.

    python benchmarks/aqlm_layer.py                         # 8192x8192, 2x8, 256 rows timed
    python benchmarks/aqlm_layer.py --device cuda --rows 0  # the whole layer on a GPU
    python benchmarks/aqlm_layer.py --scheme 1x16 --rows 64

The 70B extrapolation: each block's linears (q 8192x8192, k/v 1024x8192, o 8192x8192,
gate/up 28672x8192, down 8192x28672) get their fit time from the measured time per row
of this layer, scaled by in-width (8192 -> 28672 for down: the search and the Hessian
products grow as in * (M*K + in)); the planner's `balance` spreads a block's row pieces
over N workers in pieces of `--solve-rows` rows (the recipe's solve_rows; the pieces of a
linear share its codebooks and run in step), and blocks run one after another.
The published reference: AQLM's code needs about a day for a 7B model on one A100 and
one to two weeks for a 70B (Egiazarian et al. 2024, and the repository's README).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.aqlm import AQLMConfig, LocalPieces, fit_pieces, update_codebooks
from algorithms.codebook import CodebookScheme
from algorithms.gptq import GPTQConfig, gptq, prepare
from algorithms.types import UniformScheme
from pipeline.balance import balance

LLAMA_70B = {  # linear: (out, in), 80 blocks
    "q_proj": (8192, 8192),
    "k_proj": (1024, 8192),
    "v_proj": (1024, 8192),
    "o_proj": (8192, 8192),
    "gate_proj": (28672, 8192),
    "up_proj": (28672, 8192),
    "down_proj": (8192, 28672),
}
BLOCKS_70B = 80


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn, *args):
    sync(device)
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - start


def layer(out: int, inp: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with heavy-tailed rows and a correlated Hessian (as real layer inputs give)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * (0.5 + torch.rand(out, 1, generator=g)) * 0.02
    X = torch.randn(2 * inp, inp, generator=g) * (0.2 + torch.rand(inp, generator=g) * 2)
    X += 0.5 * X.roll(1, dims=1)
    return W.to(device), (X.T @ X / len(X)).to(device)


def measure(args: argparse.Namespace, out: int, inp: int, scheme: CodebookScheme, config: AQLMConfig) -> float:
    """Time the fit's phases and GPTQ's on this layer; print them; the AQLM layer's seconds."""
    W, H = layer(out, inp, args.device)
    rows = args.rows or out
    Wr = W[:rows]

    with torch.device(args.device):  # GPTQ's factories (eye, zeros) on the layer's device
        prepared, t_prepare = timed(args.device, prepare, H, GPTQConfig(act_order=True))
        grid = UniformScheme(bits=2, group_size=64, sym=False)
        _, t_gptq_rows = timed(args.device, lambda: gptq(Wr, H, grid, GPTQConfig(act_order=True), prepared))

    whole = LocalPieces.of(W, [(0, out)], H, scheme.in_group_size)
    _, t_init = timed(args.device, lambda: fit_pieces(whole, scheme, replace(config, max_iters=0)))  # on all rows
    pieces = LocalPieces.of(Wr, [(0, rows)], H, scheme.in_group_size)
    books, _ = fit_pieces(pieces, scheme, replace(config, max_iters=0))
    _, t_search = timed(args.device, pieces.search, books, config.beam_size)
    books, t_books = timed(args.device, lambda: update_codebooks(pieces, books, config.cg_iters).half().float())
    _, t_scales = timed(args.device, pieces.fit_scales, books)

    scale = out / rows
    per_round = (t_search + t_books + t_scales) * scale
    aqlm_layer = t_init + args.iters * per_round
    gptq_layer = t_prepare + t_gptq_rows * scale
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
          f"torch threads {torch.get_num_threads()}, layer {out}x{inp}, AQLM {scheme.name} g8 beam {args.beam}, "
          f"{rows} rows timed, x{scale:g} to the layer")  # fmt: skip
    print(f"  init (residual k-means)   {t_init:9.1f} s  (all rows: k-means runs on a sample, then assigns all)")
    print(f"  one round: code search    {t_search * scale:9.1f} s")
    print(f"             codebooks (CG) {t_books * scale:9.1f} s")
    print(f"             scales         {t_scales * scale:9.1f} s")
    print(f"  AQLM layer, {args.iters} rounds    {aqlm_layer:9.1f} s")
    print(f"  GPTQ 2-bit g64 layer      {gptq_layer:9.1f} s  (factorization {t_prepare:.1f} s)")
    print(f"  ratio AQLM / GPTQ         {aqlm_layer / gptq_layer:9.1f}x")

    return aqlm_layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8192x8192", help="OUTxIN")
    ap.add_argument("--rows", type=int, default=256, help="rows timed (0: all)")
    ap.add_argument("--scheme", default="2x8", help="MxBITS with groups of 8, e.g. 2x8 or 1x16")
    ap.add_argument("--iters", type=int, default=10, help="AQLM rounds assumed for the whole fit")
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--workers", default="8,16,64", help="worker counts for the 70B extrapolation")
    ap.add_argument("--layer-seconds", type=float, default=0, help="skip timing: extrapolate from this fit time")
    ap.add_argument("--solve-rows", type=int, default=8192, help="rows per piece (scheme.solve_rows)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out, inp = map(int, args.shape.split("x"))
    M, bits = map(int, args.scheme.split("x"))
    scheme = CodebookScheme(num_codebooks=M, nbits_per_codebook=bits, in_group_size=8)
    config = AQLMConfig(beam_size=args.beam)
    aqlm_layer = args.layer_seconds or measure(args, out, inp, scheme, config)
    per_row = aqlm_layer / out  # seconds per row at this width

    def fit_seconds(o: int, i: int) -> float:
        width = i * (M * 2**bits + i) / (inp * (M * 2**bits + inp))
        return per_row * o * width

    costs = {name: fit_seconds(o, i) for name, (o, i) in LLAMA_70B.items()}
    print(f"Llama-3-70B ({BLOCKS_70B} blocks), fit time per linear: "
          + ", ".join(f"{n} {s / 60:.1f} min" for n, s in costs.items()))  # fmt: skip
    step = args.solve_rows
    pieces = [fit_seconds(min(step, o - a), i) for o, i in LLAMA_70B.values() for a in range(0, o, step)]
    print(f"  pieces of {step} rows: {len(pieces)} per block, the largest {max(pieces) / 60:.1f} min")
    for n in [int(w) for w in args.workers.split(",")]:
        shares = balance([round(c * 1000) for c in pieces], n)
        block = max(sum(pieces[i] for i in share) for share in shares)
        print(f"  {n:4d} workers: {block / 60:7.1f} min per block, {BLOCKS_70B * block / 3600:7.1f} h for the model "
              "(fits only)")  # fmt: skip
    print("  published reference: ~1 day for a 7B on one A100; 1-2 weeks for a 70B (AQLM README)")


if __name__ == "__main__":
    main()
