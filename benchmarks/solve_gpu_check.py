"""The solves of `resources.solve_device: gpu` against the CPU's, on a GPU machine: one
linear's rows (synthetic W, a correlated H, like benchmarks/gptq_layer.py) through
workers.block.solve_rows as BlockRunner.solve calls it, on the CPU, on the GPU, and on the
GPU with the factorization on the CPU (`inverse_on_cpu`). Prints each one's time, relative
error tr(D H D^T) / tr(W H W^T) and GPU peak memory, and exits non-zero if a GPU error is
more than 1% off the CPU's.

    PYTHONPATH=$PWD python benchmarks/solve_gpu_check.py [--size 4096] [--rows 1024]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from algorithms import PREPARERS, GPTQConfig, QuipConfig, QuipScheme, UniformScheme
from workers.block import moved, solve_rows


def correlated(n: int, gen: torch.Generator) -> torch.Tensor:
    X = torch.randn(4 * n, n, generator=gen) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n**0.5)
    return X.T @ X / len(X)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    runs = [("cpu", False), *((("cuda", False), ("cuda", True)) if cuda else (("cpu", True),))]
    if not cuda:
        print("no GPU here: the CPU paths only (the plumbing; the GPU's numbers need a GPU)")
    gen = torch.Generator().manual_seed(0)
    W, H = torch.randn(args.rows, args.size, generator=gen) * 0.02, correlated(args.size, gen)
    fits = {
        "gptq": (UniformScheme(bits=4, group_size=128), GPTQConfig(act_order=True)),
        "quip": (QuipScheme(codebook="e8p", bits=2), QuipConfig()),
    }
    failed = False
    for algorithm, (scheme, options) in fits.items():
        errors = {}
        for device, inverse_on_cpu in runs:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            start = time.perf_counter()
            where = "cpu" if inverse_on_cpu else device
            with torch.device(where):
                prepared = moved(PREPARERS[algorithm](H.to(where), options), device)
            with torch.device(device):
                arrays = solve_rows(W.to(device), 0, args.rows, H.to(device), algorithm, scheme, options, prepared)
            if cuda:
                torch.cuda.synchronize()
            took = time.perf_counter() - start
            num, den = arrays["error"]
            name = f"{device}{' + inverse on cpu' if inverse_on_cpu else ''}"
            errors[name] = num / den
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
            print(f"{algorithm:5} {name:24} {took:7.2f} s  error {num / den:.5f}  GPU peak {peak:8.1f} MiB")
        for name, error in errors.items():
            if abs(error / errors["cpu"] - 1) > 0.01:
                print(f"FAIL: {algorithm} on {name}: error {error:.5f} vs the CPU's {errors['cpu']:.5f}")
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
