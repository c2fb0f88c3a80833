"""Time to fit one layer with VPTQ, phase by phase, against GPTQ 2-bit g64 on the same
layer in the same run, and the extrapolated time of a whole Llama-3-70B on N workers.

The codebook (normalisation sums, ordering, k-means on up to 2**20 sampled vectors) is
fitted once per layer whatever its height; the assignment (GPTQ over the columns, each
vector to its nearest centroid) is linear in the rows, so on CPU it is timed on `--rows`
of them and scaled up; on a GPU pass `--rows 0`.

    python benchmarks/vptq_layer.py                                 # 4096x4096, v8 k4096, 256 rows timed
    python benchmarks/vptq_layer.py --device cuda --rows 0 --shape 8192x8192 --scheme v8-k65536
    python benchmarks/vptq_layer.py --scheme v8-k65536-256 --rows 64

The 70B extrapolation: each linear of a block (q 8192x8192, k/v 1024x8192, o 8192x8192,
gate/up 28672x8192, down 8192x28672) costs the layer's measured codebook time (once per
linear: the k-means sample is capped) plus its assignment time per row, scaled by
in-width (the assignment's nearest-centroid search is linear in it, the Hessian update
quadratic: in * (K*v + in) / inp * (K*v + inp)); the pieces of `--solve-rows` rows are
spread over N workers by the planner's `balance`, and blocks run one after another. The
published reference: VPTQ's README quotes about 17 hours for Llama-3.1-405B.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.gptq import GPTQConfig, gptq, prepare
from algorithms.types import UniformScheme
from algorithms.vector import VectorScheme
from algorithms.vptq import LocalPieces, VPTQConfig, fit_books
from benchmarks.aqlm_layer import BLOCKS_70B, LLAMA_70B, layer, timed
from pipeline.balance import balance


def scheme_of(name: str) -> VectorScheme:
    """v8-k65536 or v8-k65536-256 (with a residual codebook)."""
    parts = name.split("-")
    res = int(parts[2]) if len(parts) > 2 else 0
    return VectorScheme(vector_len=int(parts[0][1:]), num_centroids=int(parts[1][1:]), num_res_centroids=res)


def measure(args: argparse.Namespace, out: int, inp: int, scheme: VectorScheme) -> tuple[float, float]:
    """Time the fit's phases and GPTQ's on this layer; print them; (codebook seconds,
    assignment seconds for the whole layer)."""
    W, H = layer(out, inp, args.device)
    rows = args.rows or out
    rows -= rows % scheme.vector_len
    config = VPTQConfig()

    with torch.device(args.device):  # GPTQ's factories (eye, zeros) on the layer's device
        prepared, t_prepare = timed(args.device, prepare, H, GPTQConfig(act_order=True))
        grid = UniformScheme(bits=2, group_size=64, sym=False)
        _, t_gptq_rows = timed(args.device, lambda: gptq(W[:rows], H, grid, GPTQConfig(act_order=True), prepared))

    whole = LocalPieces.of(W, [(0, out)], H, scheme, config)
    books, t_books = timed(args.device, fit_books, whole, scheme, config, out, inp)  # on all rows
    part = LocalPieces.of(W[:rows], [(0, rows)], H, scheme, config)
    part.prepare(books.scale, books.bias)
    _, t_assign = timed(args.device, part.quantize, books)

    scale = out / rows
    vptq_layer = t_books + t_assign * scale
    gptq_layer = t_prepare + t_gptq_rows * scale
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
          f"torch threads {torch.get_num_threads()}, layer {out}x{inp}, VPTQ {scheme.name}, "
          f"{rows} rows assigned, x{scale:g} to the layer")  # fmt: skip
    print(f"  codebook (sums, k-means)  {t_books:9.1f} s  (all rows)")
    print(f"  assignment (GPTQ + nearest) {t_assign * scale:7.1f} s")
    print(f"  VPTQ layer                {vptq_layer:9.1f} s")
    print(f"  GPTQ 2-bit g64 layer      {gptq_layer:9.1f} s  (factorization {t_prepare:.1f} s)")
    print(f"  ratio VPTQ / GPTQ         {vptq_layer / gptq_layer:9.1f}x")
    return t_books, t_assign * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x4096", help="OUTxIN")
    ap.add_argument("--rows", type=int, default=256, help="rows assigned and timed (0: all)")
    ap.add_argument("--scheme", default="v8-k4096", help="vV-kK or vV-kK-RES, e.g. v8-k65536-256")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--workers", default="8,16,64", help="worker counts for the 70B extrapolation")
    ap.add_argument("--solve-rows", type=int, default=8192, help="rows per piece (scheme.solve_rows)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out, inp = map(int, args.shape.split("x"))
    scheme = scheme_of(args.scheme)
    t_books, t_assign = measure(args, out, inp, scheme)
    kv = scheme.num_centroids * scheme.vector_len

    def assign_seconds(o: int, i: int) -> float:
        return t_assign / out * o * i * (kv + i) / (inp * (kv + inp))

    costs = {name: t_books + assign_seconds(o, i) for name, (o, i) in LLAMA_70B.items()}
    print(f"Llama-3-70B ({BLOCKS_70B} blocks), fit time per linear: "
          + ", ".join(f"{n} {s / 60:.1f} min" for n, s in costs.items()))  # fmt: skip
    step = args.solve_rows
    pieces = [assign_seconds(min(step, o - a), i) for o, i in LLAMA_70B.values() for a in range(0, o, step)]
    for n in [int(w) for w in args.workers.split(",")]:
        shares = balance([round(c * 1000) for c in pieces], n)
        block = max(sum(pieces[i] for i in share) for share in shares) + t_books  # k-means: one worker per linear
        print(f"  {n:4d} workers: {block / 60:7.1f} min per block, {BLOCKS_70B * block / 3600:7.1f} h for the model "
              "(fits only)")  # fmt: skip
    print("  published reference: ~17 h for Llama-3.1-405B (VPTQ README)")


if __name__ == "__main__":
    main()
