"""AQLM's fit on a GPU against the same fit on the CPU: with torch's deterministic
algorithms (as the workers set them), two GPU fits give the same bytes and the error
follows the CPU's round by round. Measured on an NVIDIA H200 (2026-11-26): identical
twice, and the same relative error history as the CPU, [1.0, 0.7294, 0.6772, 0.6601].

    python benchmarks/aqlm_gpu_check.py          # on a CUDA machine (PYTHONPATH=.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.aqlm import AQLMConfig, fit
from algorithms.codebook import CodebookScheme


def main() -> None:
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(1536, 1024, generator=g) * 0.02  # [out, in]
    X = torch.randn(4096, 1024, generator=g)  # [tokens, in]
    X += 0.5 * X.roll(1, 1)
    H = X.T @ X / len(X)  # [in, in]
    scheme, config = CodebookScheme(2, 8, 8), AQLMConfig(max_iters=3, rel_tol=0)
    start = time.perf_counter()
    a, gpu = fit(W.cuda(), H.cuda(), scheme, config)
    t_gpu = time.perf_counter() - start
    b, _ = fit(W.cuda(), H.cuda(), scheme, config)
    same = all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))
    start = time.perf_counter()
    _, cpu = fit(W, H, scheme, config)
    t_cpu = time.perf_counter() - start
    print(f"gpu twice identical: {same}; relative error by round: gpu {[round(h / gpu[0], 4) for h in gpu]}, "
          f"cpu {[round(h / cpu[0], 4) for h in cpu]}")  # fmt: skip
    print(f"gpu {t_gpu:.1f} s, cpu {t_cpu:.1f} s; final error gpu / cpu {gpu[-1] / cpu[-1]:.4f}")


if __name__ == "__main__":
    main()
