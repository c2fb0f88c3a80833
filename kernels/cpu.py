"""The CPU backend: a small C kernel (kernels/cpu_uniform.c) compiled on first use with
the system's C compiler into the repo's ignored cache folder, and called through ctypes
(which releases the GIL, so ranges of output rows run on a few Python threads).

It keeps one uint8 code per weight (a quarter of an fp32 weight; the reference path
unpacks and dequantizes the whole weight on every call). Decode-sized batches run a fused
kernel that reads the codes once; larger batches dequantize tiles of rows that stay in
cache and multiply them with torch's matmul. Measured ratios: `lamina bench kernels`.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from algorithms.packing import unpack
from algorithms.types import QuantizedWeight

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("cpu_uniform.c")
_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(  # the checkout's ignored cache folder; for an installed package, the user's cache
    os.environ.get("LAMINA_KERNEL_CACHE")
    or (_ROOT / ".cache" / "kernels" if (_ROOT / "pyproject.toml").exists() else Path.home() / ".cache" / "lamina")
)
FUSED_MAX_ROWS = 8  # activation rows up to which the fused kernel beat the tiled one (measured: bench kernels)
TILE_ROWS = 256  # output rows dequantized per tile (measured best of 32..256 on 70B-sized weights)...
WHOLE_ELEMENTS = 2**22  # ...but weights up to this size are dequantized whole: one matmul beats tiles there
_lock = threading.Lock()
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def flags() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    return ["-O3", "-fPIC", "-shared"] + (["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else [])


@cache
def library() -> ctypes.CDLL:
    """The compiled kernel, built once per source and flags (by name: a hash of both) and
    renamed into place, so that processes building at once never load a partial file."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags()).encode()).hexdigest()[:16]
    target = CACHE / f"lamina_cpu_uniform-{key}.so"
    with _lock:
        if not target.exists():
            CACHE.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
                built = Path(tmp) / target.name
                run = subprocess.run(
                    [compiler, *flags(), str(SOURCE), "-o", str(built)], capture_output=True, text=True
                )
                if run.returncode:
                    raise RuntimeError(f"{compiler} failed: {run.stderr.strip()[-300:]}")
                os.replace(built, target)
                log.info("built the CPU kernel: %s", target)
    lib = ctypes.CDLL(str(target))
    lib.lamina_group_sums.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _ptr]
    lib.lamina_fused.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64]
    lib.lamina_dequantize.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr]
    for f in (lib.lamina_group_sums, lib.lamina_fused, lib.lamina_dequantize):
        f.restype = None
    return lib


def unavailable() -> str | None:
    """None if the kernel builds and loads here, else why not (one line)."""
    try:
        library()
    except (OSError, RuntimeError) as e:
        return f"the CPU kernel could not be built: {e}"
    return None


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="lamina-cpu-kernel")


def _split(call, n: int) -> None:
    """call(lo, hi) over [0, n) on torch's number of threads."""
    threads = max(1, min(torch.get_num_threads(), n // 64))
    if threads == 1:
        call(0, n)
        return
    bounds = [n * i // threads for i in range(threads + 1)]
    for f in [_pool(threads).submit(call, lo, hi) for lo, hi in itertools.pairwise(bounds)]:
        f.result()


@dataclass(frozen=True)
class CpuWeight:
    """A QuantizedWeight laid out for the CPU kernel: uint8 codes [out, in] with the input
    columns permuted so that every group is a run (`order`; None when they are already),
    fp32 scales and scale * zero [out, groups], and the group boundaries [groups + 1]."""

    codes: torch.Tensor
    scales: torch.Tensor
    scaled_zeros: torch.Tensor
    starts: torch.Tensor
    order: torch.Tensor | None

    @classmethod
    def of(cls, qw: QuantizedWeight) -> CpuWeight:
        codes = unpack(qw.qweight, qw.bits)[:, : qw.in_features]  # [out, in]
        scales, zeros = qw.scales.float(), qw.zeros.float()  # [out, groups]
        groups = scales.shape[1]
        if qw.g_idx is None:
            order = None
            starts = (torch.arange(groups + 1, dtype=torch.int64) * qw.group_size).clamp(max=qw.in_features)
        else:
            g = qw.g_idx.long()
            order = torch.argsort(g, stable=True)
            starts = torch.zeros(groups + 1, dtype=torch.int64)
            starts[1:] = torch.bincount(g, minlength=groups).cumsum(0)
            codes = codes[:, order]
            if torch.equal(order, torch.arange(qw.in_features)):
                order = None  # groups already in column order (e.g. only a partial last group)
        return cls(codes.contiguous(), scales.contiguous(), (scales * zeros).contiguous(), starts, order)


def layout(qw: QuantizedWeight, device: torch.device) -> CpuWeight:
    return CpuWeight.of(qw)


def linear(x: torch.Tensor, w: CpuWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out]; computed in fp32, returned in x's dtype."""
    lib = library()
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, shape[-1]).float()
    if w.order is not None:
        x2 = x2.index_select(1, w.order)
    x2 = x2.contiguous()
    (M, K), N, G = x2.shape, w.codes.shape[0], w.scales.shape[1]
    codes, scales, sz, starts = (t.data_ptr() for t in (w.codes, w.scales, w.scaled_zeros, w.starts))
    if M <= FUSED_MAX_ROWS:
        xsum = torch.empty(M, G)
        lib.lamina_group_sums(x2.data_ptr(), M, K, starts, G, xsum.data_ptr())
        y = torch.empty(M, N)
        _split(
            lambda lo, hi: lib.lamina_fused(
                x2.data_ptr(), M, K, codes, scales, sz, starts, G, xsum.data_ptr(), y.data_ptr(), N, lo, hi
            ),
            N,
        )
    else:
        step = N if N * K <= WHOLE_ELEMENTS else TILE_ROWS
        tile = torch.empty(min(step, N), K)
        yt = None if step == N else torch.empty(N, M)  # y transposed: a tile's rows are contiguous
        for t0 in range(0, N, step):
            rows = min(step, N - t0)
            _split(
                lambda lo, hi, t0=t0: lib.lamina_dequantize(
                    codes, K, scales, sz, starts, G, t0 + lo, t0 + hi, tile.data_ptr() + lo * K * 4
                ),
                rows,
            )
            if yt is None:
                y = torch.mm(x2, tile.t())
            else:
                torch.mm(tile[:rows], x2.t(), out=yt[t0 : t0 + rows])
        if yt is not None:
            y = yt.t().contiguous()  # callers (attention's views) expect a row-major result
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], N).to(dtype)
