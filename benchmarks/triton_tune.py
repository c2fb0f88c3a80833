"""Tile sizes of the Triton kernels on the GPU at hand: each candidate configuration is
checked against the dequantized weight's matmul (fp32, same activations), then timed next
to the fp16 dense matmul of the same shape in the same run. Prints, per shape and batch,
the default configuration's time, the best candidate's, the dense time and the fraction of
peak memory bandwidth; `--json PATH` keeps every measurement.

    python benchmarks/triton_tune.py                         # Llama-3-70B shapes, int4 g128
    python benchmarks/triton_tune.py --bits 3 --act-order

Needs a CUDA GPU (under TRITON_INTERPRET=1 it only checks the candidates on tiny shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys

import torch

from kernels import reference
from kernels import triton_uniform as tu
from kernels.bench import LLAMA_70B, peak_bandwidth, random_weight


def gemv_candidates() -> list[tu.GemvConfig]:
    grid = itertools.product((True, False), (32, 64, 128), (128, 256), (1024, 4096), (4,))
    return [tu.GemvConfig(n, k, p, w, words) for words, n, k, p, w in grid]


def gemm_candidates(batch: int) -> list[tu.GemmConfig]:
    block_m = 16 if batch <= 16 else (32 if batch <= 32 else 64)
    words = itertools.product((True,), (64, 128), (128, 256), ((4, 3), (8, 4), (4, 4)))
    general = itertools.product((False,), (64, 128), (64,), ((4, 3), (8, 4)))
    return [tu.GemmConfig(block_m, n, k, w, s, ww) for ww, n, k, (w, s) in (*words, *general)]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dequant_candidates() -> list[tu.DequantConfig]:
    return [tu.DequantConfig(k, n, w) for k in (64, 128, 256) for n in (64, 128) for w in (4, 8)]


def bench(fn) -> float:
    if DEVICE == "cpu":  # interpreted dry run: one timing
        import time

        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def tune(shape: str, batch: int, bits: int, group: int, act_order: bool, quick: bool = False) -> dict:
    out, inp = (int(v) for v in shape.split("x"))
    qw = random_weight(out, inp, bits, group, act_order)
    w = tu.layout(qw, torch.device(DEVICE))
    on_gpu = dataclasses.replace(
        qw,
        **{
            name: t.to(DEVICE)
            for name in ("qweight", "scales", "zeros", "g_idx")
            if (t := getattr(qw, name)) is not None
        },
    )
    dense_w = reference.dequantize(on_gpu)  # fp32 [out, in]
    x = torch.randn(batch, inp, device=DEVICE, dtype=torch.float16)
    want = x.float() @ dense_w.t()
    dense16 = dense_w.half()
    moved = sum(t.numel() * t.element_size() for t in qw.tensors().values()) + (batch * (inp + out)) * 2
    peak = peak_bandwidth() if DEVICE == "cuda" else None

    def check(config) -> float:
        y = tu.linear(x, w, None, config).float()
        return float((y - want).abs().max() / want.abs().max())

    if batch <= tu.GEMV_MAX_ROWS:
        default = tu._gemv_config(out, inp)
    else:
        default = tu._gemm_config(batch) if batch <= tu.GEMM_MAX_ROWS else tu._dequant_config()
    if quick:  # the default of each path
        candidates = [tu._gemm_config(batch), tu._dequant_config()] + (
            [tu._gemv_config(out, inp)] if batch <= 4 else []
        )
    else:
        candidates = (gemv_candidates() if batch <= 4 else []) + gemm_candidates(batch) + dequant_candidates()
    results = []
    for config in [default, *candidates]:
        try:
            err = check(config)
            ms = bench(lambda config=config: tu.linear(x, w, None, config)) if err < 2e-3 else float("nan")
        except Exception as e:  # a tile that does not compile (shared memory) is a result, not a crash
            err, ms = float("nan"), float("nan")
            print(f"  {config}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        results.append({"config": dataclasses.asdict(config), "kind": type(config).__name__, "err": err, "ms": ms})
    dense_ms = bench(lambda: x @ dense16.t())
    timed = [r for r in results if r["ms"] == r["ms"]]
    best = min(timed, key=lambda r: r["ms"])
    bw = None if peak is None else moved / (best["ms"] / 1e3) / peak
    return {
        "shape": shape,
        "batch": batch,
        "default": results[0],
        "best": best,
        "dense_ms": dense_ms,
        "bandwidth_best": bw,
        "all": results,
        "errors": [r for r in results if not (r["err"] < 2e-3)],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(LLAMA_70B))
    p.add_argument("--batches", default="1,4,8,32,256")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument("--quick", action="store_true", help="only the default configuration of each path")
    args = p.parse_args()
    if DEVICE == "cpu" and not tu.INTERPRETED:
        print("triton_tune: no CUDA GPU (TRITON_INTERPRET=1 for a dry run on tiny shapes)", file=sys.stderr)
        return 2
    rows = []
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU, interpreted"
    print(f"device {name}, int{args.bits} g{args.group_size} act-order={args.act_order}")
    for shape in args.shapes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            r = tune(shape, batch, args.bits, args.group_size, args.act_order, args.quick)
            rows.append(r)
            d, b = r["default"], r["best"]
            print(
                f"{shape:>11} M={batch:<4} default {d['ms']:.4f} ms  best {b['ms']:.4f} ms {b['kind']} {b['config']}"
                f"  fp16 {r['dense_ms']:.4f} ms  speed-up {r['dense_ms'] / b['ms']:.2f}x"
                f"  bw {r['bandwidth_best'] or 0:.0%}  bad configs {len(r['errors'])}"
                + "".join(
                    f"\n      {a['kind']:<13} {a['ms']:.4f} ms  {a['config']}" for a in r["all"][1:] if args.quick
                ),
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
