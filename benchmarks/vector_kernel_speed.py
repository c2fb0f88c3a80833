"""The vector-format Triton kernels (kernels/triton_vector.py) against the fp16 dense matmul
`x @ W.T` of the same shape, in the same run.

For each scheme (VPTQ's v8 k65536 and v4 k256, with and without a residual codebook;
normalisation on), weight shape (Llama-3-70B's q/o 8192x8192, gate/up 28672x8192 and down
8192x28672) and activation batch: a random weight (random index words, which are valid
streams at every width; N(0, 0.1) codebooks; a random perm) laid out once, then timed
(`triton.testing.do_bench`, median ms) through the GEMV (up to SWEEP_MAX_ROWS rows),
through dequantize + matmul, and through `linear`'s own choice ("ours"), next to the dense
matmul. Printed: those times, the ratio dense / ours, and the fraction of peak HBM
bandwidth "ours" reached for the bytes of indices, codebooks, perm, normalisation,
activations and output.

    python benchmarks/vector_kernel_speed.py                          # on a CUDA GPU
    python benchmarks/vector_kernel_speed.py --gemv-configs 64,64,1024,4 128,32,2048,4
    TRITON_INTERPRET=1 python benchmarks/vector_kernel_speed.py --quick   # dry run on CPU
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from algorithms.vector import VectorScheme, VectorWeight, to_int16
from kernels import triton_vector as tv

PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}  # published HBM bandwidth by device name
SWEEP_MAX_ROWS = 16  # the GEMV is timed up to this batch (linear uses it up to tv.GEMV_MAX_ROWS)


def parse_scheme(text: str) -> VectorScheme:
    """ "v8-k65536" or "v4-k256-16" (a residual codebook of 16)."""
    v, k, *res = text.split("-")
    return VectorScheme(vector_len=int(v[1:]), num_centroids=int(k[1:]), num_res_centroids=int(res[0]) if res else 0)


def random_weight(out: int, inp: int, scheme: VectorScheme, device: str) -> VectorWeight:
    gen = torch.Generator(device=device).manual_seed(0)
    v, K, Kr = scheme.vector_len, scheme.num_centroids, scheme.num_res_centroids
    words = math.ceil(inp * (scheme.index_bits + scheme.res_bits) / 32)
    return VectorWeight(
        scheme,
        indices=torch.randint(-(2**31), 2**31, (1, out // v, words), generator=gen, device=device, dtype=torch.int32),
        centroids=(torch.randn(1, K * v, generator=gen, device=device) * 0.1).half(),  # [1, K*v]
        perm=to_int16(torch.randperm(inp, generator=gen, device=device)),
        res_centroids=(torch.randn(1, Kr * v, generator=gen, device=device) * 0.02).half() if Kr else None,
        weight_scale=(torch.rand(inp, generator=gen, device=device) + 0.5).half(),
        weight_bias=(torch.randn(inp, generator=gen, device=device) * 0.01).half(),
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


def parse_configs(texts: list[str]) -> list[tv.GemvConfig | None]:
    """Each text "BLOCK_OUT,BLOCK_K,PROGRAMS,WARPS"; none: the default tiles."""
    configs = []
    for text in texts:
        *tiles, warps = (int(v) for v in text.split(","))
        configs.append(tv.GemvConfig(*tiles, warps=warps))
    return configs or [None]


def rows_of(args: argparse.Namespace, device: str) -> Iterator[str]:
    dtype = torch.float16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreted)"
    peak = next((bw for key, bw in PEAK_BYTES_PER_S.items() if key in name), None)
    gemvs = parse_configs(args.gemv_configs)
    yield f"vector kernels against the {dtype} dense matmul on {name}"
    yield (
        f"{'scheme':<14}{'shape':>12}{'batch':>6}{'gemv ms':>9}{'deq ms':>8}{'ours ms':>9}{'dense ms':>9}"
        "  dense/ours  bandwidth  best gemv config"
    )
    for scheme in (parse_scheme(s) for s in args.schemes.split(",")):
        for shape in args.shapes.split(","):
            out, inp = (int(v) for v in shape.lower().split("x"))
            vw = random_weight(out, inp, scheme, device)
            w = tv.layout(vw, device)
            dense = torch.randn(out, inp, device=device, dtype=dtype) * 0.01  # [out, in]
            weight_bytes = sum(t.numel() * t.element_size() for t in vw.tensors().values())
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, inp, device=device, dtype=dtype)  # [batch, in]
                gemv, which = None, "-"
                if batch <= SWEEP_MAX_ROWS:
                    configs = [c or tv._gemv_config() for c in gemvs]
                    times = [timed(lambda c=c, x=x, w=w: tv.linear(x, w, None, c), device) for c in configs]
                    gemv, which = min(times), str(times.index(min(times)))
                deq = timed(lambda x=x, w=w: tv.linear(x, w, None, tv._dequant_config()), device)
                ours = timed(lambda x=x, w=w: tv.linear(x, w, None), device)
                base = timed(lambda x=x, dense=dense: x @ dense.t(), device)
                moved = weight_bytes + (batch * inp + batch * out) * x.element_size()
                bw = f"{moved / (ours / 1e3) / peak:10.0%}" if peak else f"{'?':>10}"
                gemv_ms = f"{gemv:>9.4f}" if gemv is not None else f"{'-':>9}"
                yield (
                    f"{scheme.name:<14}{shape:>12}{batch:>6}{gemv_ms}{deq:>8.4f}{ours:>9.4f}{base:>9.4f}"
                    f"{base / ours:>11.2f}x {bw}  {which}"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8192x8192,28672x8192,8192x28672", help="OUTxIN shapes, comma-separated")
    parser.add_argument("--schemes", default="v8-k65536,v4-k256,v8-k65536-256", help="vV-kK[-KR], comma-separated")
    parser.add_argument("--batches", default="1,2,4,16,128", help="activation rows, comma-separated")
    parser.add_argument(
        "--gemv-configs", nargs="*", default=[], help="GEMV tiles to try: BLOCK_OUT,BLOCK_K,PROGRAMS,WARPS"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny shape and batches 1 and 9 (a dry run)")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.batches = "64x128", "1,9"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not tv.INTERPRETED:
        parser.error("no CUDA GPU: run with TRITON_INTERPRET=1 (and --quick)")
    for line in rows_of(args, device):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
