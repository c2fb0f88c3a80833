"""The codebook-format Triton kernels (kernels/triton_codebook.py) against the fp16 dense
matmul `x @ W.T` of the same shape, in the same run.

For each scheme (AQLM's 1x16 and 2x8, groups of 8), weight shape (Llama-3-70B's q/o
8192x8192 and gate/up 28672x8192) and activation batch: a random weight (uniform codes,
N(0, 0.1) codebooks) laid out once, then timed (`triton.testing.do_bench`, median ms)
through the GEMV, through dequantize + matmul, and through `linear`'s own choice
("ours"), next to the dense matmul. Printed: those times, the speed-up dense / ours, and
the fraction of peak HBM bandwidth "ours" reached for the bytes of codes, codebooks,
scales, activations and output.

    python benchmarks/codebook_kernel_speed.py                       # on a CUDA GPU
    python benchmarks/codebook_kernel_speed.py --gemv-configs 16,256,1024,4 32,256,2048,4
    TRITON_INTERPRET=1 python benchmarks/codebook_kernel_speed.py --quick   # dry run on CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from algorithms.codebook import CodebookWeight, store_codes
from kernels import triton_codebook as tc

PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # published HBM bandwidth by device name


def random_weight(out: int, inp: int, scheme: str, device: str) -> CodebookWeight:
    """A scheme "MxBgG" (e.g. 2x8g8): M codebooks of 2**B codewords of G inputs."""
    books, rest = scheme.split("x")
    M, (nbits, g) = int(books), (int(v) for v in rest.split("g"))
    gen = torch.Generator(device=device).manual_seed(0)
    codes = torch.randint(0, 2**nbits, (out, inp // g, M), generator=gen, device=device)  # [out, G, M]
    return CodebookWeight(
        codes=store_codes(codes, nbits),
        codebooks=(torch.randn(M, 2**nbits, 1, g, generator=gen, device=device) * 0.1).half(),  # [M, K, 1, g]
        scales=(torch.rand(out, 1, 1, 1, generator=gen, device=device) + 0.5).half(),  # [out, 1, 1, 1]
    )


def timed(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of `fn`: do_bench on a GPU, a few wall-clock calls interpreted."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


SWEEP_MAX_ROWS = 16  # the GEMVs are timed up to this batch (past it they take milliseconds)


def best(fn: Callable[[object], object], configs: list, device: str) -> tuple[float, int]:
    """The fastest of `configs` through `fn`: (ms, its index)."""
    times = [timed(lambda c=c: fn(c), device) for c in configs]
    return min(times), times.index(min(times))


def parse_configs(texts: list[str], kind: type, default: object) -> list:
    """Each text "A,B,C,WARPS": kind(A, B, C, warps=WARPS)."""
    configs = []
    for text in texts:
        *tiles, warps = (int(v) for v in text.split(","))
        configs.append(kind(*tiles, warps=warps))
    return configs or [default]


def cell(ms: float | None, width: int) -> str:
    return f"{ms:>{width}.4f}" if ms is not None else f"{'-':>{width}}"


def rows_of(args: argparse.Namespace, device: str) -> Iterator[str]:
    dtype = torch.float16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreted)"
    peak = next((bw for key, bw in PEAK_BYTES_PER_S.items() if key in name), None)
    luts = parse_configs(args.lut_configs, tc.LutConfig, tc._lut_config())
    gemvs = parse_configs(args.gemv_configs, tc.GemvConfig, None)
    yield f"codebook kernels against the {dtype} dense matmul on {name}"
    yield (
        f"{'scheme':<7}{'shape':>12}{'batch':>6}{'lut ms':>9}{'gemv ms':>9}{'deq ms':>8}{'ours ms':>9}{'dense ms':>9}"
        "  dense/ours  bandwidth  best lut/gemv config"
    )
    for scheme in args.schemes.split(","):
        for shape in args.shapes.split(","):
            out, inp = (int(v) for v in shape.lower().split("x"))
            cw = random_weight(out, inp, scheme, device)
            w = tc.layout(cw, torch.device(device))
            dense = torch.randn(out, inp, device=device, dtype=dtype) * 0.01  # [out, in]
            weight_bytes = sum(t.numel() * t.element_size() for t in cw.tensors().values())
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, inp, device=device, dtype=dtype)  # [batch, in]
                lut = gemv = None
                which = ["-", "-"]
                if batch <= SWEEP_MAX_ROWS and w.codebook_size <= tc.LUT_MAX_K:
                    lut, i = best(lambda c, x=x, w=w: tc.linear(x, w, None, c), luts, device)
                    which[0] = str(i)
                if batch <= SWEEP_MAX_ROWS:
                    configs = [c or tc._gemv_config(batch) for c in gemvs]
                    gemv, i = best(lambda c, x=x, w=w: tc.linear(x, w, None, c), configs, device)
                    which[1] = str(i)
                deq = timed(lambda x=x, w=w: tc.linear(x, w, None, tc._dequant_config()), device)
                ours = timed(lambda x=x, w=w: tc.linear(x, w, None), device)
                base = timed(lambda x=x, dense=dense: x @ dense.t(), device)
                moved = weight_bytes + (batch * inp + batch * out) * x.element_size()
                bw = f"{moved / (ours / 1e3) / peak:10.0%}" if peak else f"{'?':>10}"
                yield (
                    f"{scheme:<7}{shape:>12}{batch:>6}{cell(lut, 9)}{cell(gemv, 9)}{deq:>8.4f}{ours:>9.4f}{base:>9.4f}"
                    f"{base / ours:>11.2f}x {bw}  {'/'.join(which)}"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8192x8192,28672x8192", help="OUTxIN weight shapes, comma-separated")
    parser.add_argument("--schemes", default="1x16g8,2x8g8", help="MxBgG schemes, comma-separated")
    parser.add_argument("--batches", default="1,4,16,128", help="activation rows, comma-separated")
    parser.add_argument(
        "--lut-configs", nargs="*", default=[], help="lookup-table GEMV tiles to try: BLOCK_N,BLOCK_G,PROGRAMS,WARPS"
    )
    parser.add_argument(
        "--gemv-configs", nargs="*", default=[], help="codeword GEMV tiles to try: BLOCK_N,BLOCK_K,PROGRAMS,WARPS"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny shape and batches 1 and 9 (a dry run)")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batches = "64x128", "1,9"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tc.INTERPRETED:
        parser.error("no CUDA GPU: run with TRITON_INTERPRET=1 (and --quick)")
    for line in rows_of(args, device):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
