"""The float presets' linears (kernels/quant_linear.FloatLinear) against the dense fp32
matmul of the same shape, measured in the same run: the `cpu` backend (torch._int_mm for
int8 W8A8, torch._scaled_mm for FP8 W8A8, the weight dequantized once otherwise) and the
torch reference (activations quantized, weight dequantized per call).

    python benchmarks/float_kernel_speed.py                       # 4096x4096, 1 / 16 / 512 tokens
    python benchmarks/float_kernel_speed.py --shapes 8192x28672 --tokens 1 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from algorithms.floatq import PRESETS, rtn_float
from kernels.quant_linear import quant_linear


def best(fn, repeat: int) -> float:
    fn()  # warm up (and lay the weight out)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096"], help="OUTxIN")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 512])
    p.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seconds are the best of {args.repeat}")
    print("| shape | tokens | preset | fp32 s | cpu s | cpu / fp32 | reference s | reference / fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        out, n = (int(v) for v in shape.split("x"))
        W = torch.randn(out, n) * 0.02  # [out, in]
        for name in args.presets:
            fw = rtn_float(W, None, PRESETS[name])
            if fw.scheme.static_activations:
                from algorithms.float_activations import with_activation_scale

                fw = with_activation_scale(fw, 4.0)
            cpu, ref = quant_linear(fw, backend="cpu"), quant_linear(fw, backend="reference")
            for m in args.tokens:
                x = torch.randn(m, n)  # [tokens, in]
                dense = best(lambda x=x, W=W: x @ W.T, args.repeat)
                fast = best(lambda x=x, f=cpu: f(x), args.repeat)
                slow = best(lambda x=x, f=ref: f(x), args.repeat)
                cells = [shape, m, name, f"{dense:.5f}", f"{fast:.5f}", f"{fast / dense:.2f}", f"{slow:.5f}"]
                print("| " + " | ".join(str(c) for c in [*cells, f"{slow / dense:.2f}"]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
