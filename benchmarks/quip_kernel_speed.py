"""The incoherent format's Triton path (kernels/triton_quip.py: E8P codes decoded in the
kernel, Hadamard transforms in torch) against the fp16 dense matmul `x @ W.T` of the same
shape, in the same run.

For each weight shape (Llama-3-70B's q/o 8192x8192, gate/up 28672x8192 and down
8192x28672: 28672 = 28 x 1024, a Paley factor) and activation batch: random E8P codes
laid out once, then timed (`triton.testing.do_bench`, median ms) as the whole layer
("ours": both transforms and the product), the product alone, and the two transforms
alone, next to the dense matmul. Printed: those times and the ratio dense / ours.

    python benchmarks/quip_kernel_speed.py                              # on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/quip_kernel_speed.py --quick   # dry run on CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms import hadamard
from benchmarks.vector_kernel_speed import timed
from kernels import triton_quip as tq
from tests.test_quip_kernels import random_e8p


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8192x8192,28672x8192,8192x28672", help="OUTxIN shapes, comma-separated")
    parser.add_argument("--batches", default="1,4,16,128", help="activation rows, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a tiny shape and batches 1 and 9 (a dry run)")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batches = "192x576", "1,9"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tq.INTERPRETED:
        parser.error("no CUDA GPU: run with TRITON_INTERPRET=1 (and --quick)")
    dtype = torch.float16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreted)"
    print(f"incoherent (E8P) Triton path against the {dtype} dense matmul on {name}")
    print(f"{'shape':>12}{'batch':>6}{'ours ms':>9}{'product':>9}{'transforms':>11}{'dense ms':>9}  dense/ours")
    for shape in args.shapes.split(","):
        out, inp = (int(v) for v in shape.lower().split("x"))
        w = tq.layout(random_e8p(out, inp, 0), device)
        dense = torch.randn(out, inp, device=device, dtype=dtype) * 0.01
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, inp, device=device, dtype=dtype)
            z = torch.randn(batch, inp, device=device, dtype=dtype)
            y = torch.randn(batch, out, device=device, dtype=dtype)
            ours = timed(lambda x=x, w=w: tq.linear(x, w, None), device)
            product = timed(lambda z=z, w=w: tq.rotated_product(z, w), device)
            transforms = timed(lambda z=z, y=y: (hadamard.apply(z), hadamard.apply(y, transpose=True)), device)
            base = timed(lambda x=x, dense=dense: x @ dense.t(), device)
            print(
                f"{shape:>12}{batch:>6}{ours:>9.4f}{product:>9.4f}{transforms:>11.4f}{base:>9.4f}{base / ours:>11.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
