"""Which kernel runs a QuantLinear: the best available one, or the one a recipe forces.

- `triton`: fused dequantize + GEMV/GEMM on a CUDA GPU (kernels/triton_uniform.py); on a
  machine without one it runs only under TRITON_INTERPRET=1, which is for tests.
- `cpu`: the C kernel of kernels/cpu_uniform.c (needs a C compiler the first time).
- `reference`: dequantize, then matmul, in torch; runs anywhere.

`auto` takes the first of those that can run where the tensors live and logs the choice
(and, when it passes one over, why).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import cache
from typing import Literal

import torch

log = logging.getLogger(__name__)
Backend = Literal["reference", "cpu", "triton"]
Requested = Literal["auto", "reference", "cpu", "triton"]
BACKENDS: tuple[Backend, ...] = ("reference", "cpu", "triton")


@cache
def unavailable(backend: Backend, device: str = "cpu") -> str | None:
    """None if `backend` can run on `device` ('cpu' or 'cuda') here, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device != "cpu":
            return "the cpu kernel runs on CPU tensors only"
        from kernels import cpu

        return cpu.unavailable()
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if device == "cpu" and not interpreted:
        return "triton kernels need a CUDA GPU (on CPU only under TRITON_INTERPRET=1, for tests)"
    return None


@cache
def choose(requested: Requested = "auto", device: str = "cpu") -> Backend:
    """The backend to run on `device`; a forced one that cannot run raises ValueError."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown kernel backend {requested!r}; choose one of auto, {', '.join(BACKENDS)}")
        why = unavailable(requested, device)
        if why:
            raise ValueError(f"kernel backend {requested!r} cannot run on {device}: {why}")
        log.info("kernels: %s on %s (forced)", requested, device)
        return requested
    order: tuple[Backend, ...] = ("triton", "reference") if device == "cuda" else ("cpu", "reference")
    for backend in order:
        why = unavailable(backend, device)
        if why is None:
            log.info("kernels: %s on %s (auto)", backend, device)
            return backend
        log.warning("kernels: %s passed over on %s: %s", backend, device, why)
    raise AssertionError("the reference backend always runs")
