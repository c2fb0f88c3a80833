"""`lamina bench kernels`: our low-bit kernel against the dense matmul, in the same run.

For each weight shape (OUTxIN, Llama-3-70B's by default: q/o 8192x8192, gate/up
28672x8192, down 8192x28672) and activation batch, a random weight on the scheme's grid
(random packed words are valid codes at every bit width) runs through the chosen backend
and, as the baseline, the same-shaped dense weight through torch's matmul: fp16 on a GPU,
fp32 on CPU. Printed: both times (median), the speed-up dense / ours, and on a GPU the
fraction of peak memory bandwidth our kernel reached (bytes of packed weight, scales,
zeros, g_idx, activations and output over its time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from algorithms.types import QuantizedWeight
from kernels.quant_linear import QuantLinear

LLAMA_70B = ("8192x8192", "28672x8192", "8192x28672")
PEAK_BYTES_PER_S = {  # published HBM bandwidth by device name
    "H200": 4.8e12,
    "H100 NVL": 3.9e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,  # SXM (the name reads "NVIDIA H100 80GB HBM3")
    "A100-SXM4-80GB": 2.039e12,
    "A100-SXM4-40GB": 1.555e12,
    "A100-PCIE": 1.555e12,
    "L40S": 0.864e12,
}


@dataclass(frozen=True)
class Row:
    shape: str
    batch: int
    ours_ms: float
    dense_ms: float
    bandwidth: float | None  # fraction of peak, GPU only

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.ours_ms


def random_weight(out: int, inp: int, bits: int, group_size: int, act_order: bool, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    groups = -(-inp // group_size)
    words = inp * bits // 32
    g_idx = (torch.randperm(inp, generator=g) // group_size).to(torch.int32) if act_order else None
    return QuantizedWeight(
        qweight=torch.randint(-(2**31), 2**31 - 1, (out, words), generator=g, dtype=torch.int32),
        scales=(torch.rand(out, groups, generator=g) * 0.01 + 1e-3).half(),
        zeros=torch.randint(0, 2**bits, (out, groups), generator=g).to(torch.uint8),
        bits=bits,
        group_size=group_size,
        in_features=inp,
        g_idx=g_idx,
    )


def timed(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Median milliseconds of `fn` after a warm-up call."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(50, repeat * 10)))
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bandwidth() -> float | None:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BYTES_PER_S.items() if key in name), None)


def run(
    shapes: tuple[str, ...] = LLAMA_70B,
    batches: tuple[int, ...] = (1, 8, 32),
    *,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    backend: str = "auto",
    repeat: int = 5,
    device: str | None = None,
) -> tuple[str, list[Row]]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dense_dtype = torch.float16 if device == "cuda" else torch.float32
    peak = peak_bandwidth() if device == "cuda" else None
    rows, used = [], "?"
    for shape in shapes:
        out, inp = (int(v) for v in shape.lower().split("x"))
        qw = random_weight(out, inp, bits, group_size, act_order)
        layer = QuantLinear(qw, backend=backend).to(device)
        used = layer.backend(torch.device(device))
        dense = torch.randn(out, inp, dtype=dense_dtype, device=device) * 0.01
        weight_bytes = sum(t.numel() * t.element_size() for t in qw.tensors().values())
        for batch in batches:
            x = torch.randn(batch, inp, dtype=dense_dtype, device=device)
            with torch.inference_mode():
                ours = timed(lambda x=x, layer=layer: layer(x), device, repeat)
                base = timed(lambda x=x, dense=dense: x @ dense.t(), device, repeat)
            moved = weight_bytes + (batch * inp + batch * out) * x.element_size()
            rows.append(Row(shape, batch, ours, base, None if peak is None else moved / (ours / 1e3) / peak))
    return used, rows


def report(used: str, rows: list[Row], *, device: str, bits: int, group_size: int, act_order: bool) -> str:
    dense = "fp16" if device == "cuda" else "fp32"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        f"lamina bench kernels: {used} backend, int{bits} g{group_size}{' act-order' if act_order else ''}, "
        f"against the {dense} matmul, on {where}",
        f"{'shape (out x in)':<18}{'batch':>6}{'ours ms':>11}{dense + ' ms':>11}{'speed-up':>10}"
        + ("  bandwidth" if device == "cuda" else ""),
    ]
    for r in rows:
        bw = f"  {r.bandwidth:9.0%}" if r.bandwidth is not None else (f"  {'?':>9}" if device == "cuda" else "")
        lines.append(f"{r.shape:<18}{r.batch:>6}{r.ours_ms:>11.4g}{r.dense_ms:>11.4g}{r.speedup:>9.3g}x{bw}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", default=",".join(LLAMA_70B), help="OUTxIN weight shapes, comma-separated")
    p.add_argument("--batches", default="1,8,32", help="activation rows, comma-separated")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true", help="a shuffled g_idx, as GPTQ's act-order stores")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "triton"])
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median)")


def main(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    used, rows = run(
        tuple(args.shapes.split(",")),
        tuple(int(b) for b in args.batches.split(",")),
        bits=args.bits,
        group_size=args.group_size,
        act_order=args.act_order,
        backend=args.backend,
        repeat=args.repeat,
        device=device,
    )
    print(report(used, rows, device=device, bits=args.bits, group_size=args.group_size, act_order=args.act_order))
    return 0
