"""End-to-end quantize time with 1 and 2 workers (or --workers ...) in the same Ray session,
split into load / calibrate / solve / write+propagate / publish, and the speedup against
one worker; with --blocks, on a copy of the fixture model cut or repeated to that many
blocks, and the driver's and workers' peak memory for each size (in a fresh driver
process per run, so that each driver peak is that run's own).

    python benchmarks/scaling.py                          # the fixture (30 blocks), protocol calibration
    python benchmarks/scaling.py --samples 16 --seq-len 256
    python benchmarks/scaling.py --workers 2 --blocks 8 32 128 --samples 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / ".cache" / "fixtures"
PHASES = ("load", "calibrate", "solve", "write+propagate", "publish")

ONE_RUN = """
import json, sys, time
from pipeline.driver import quantize
from pipeline.recipe import parse
from workers.block import peak_rss
doc = json.loads(sys.argv[1])
start = time.perf_counter()
before = peak_rss()
report = quantize(parse(doc), progress=False)
print(json.dumps({"seconds": report.seconds, "total": time.perf_counter() - start, "blocks": report.blocks,
                  "driver_before": before, "driver_peak": report.driver_peak_rss,
                  "worker_peak": report.worker_peak_rss}))
"""


def recipe(model: Path, output: Path, workers: int, args: argparse.Namespace) -> dict:
    return {
        "model": str(model),
        "output": str(output),
        "calibration": {
            "source": str(FIXTURES / "python-docs" / "library"),
            "glob": "*.rst.txt",
            "samples": args.samples,
            "seq_len": args.seq_len,
            "chunk_size": args.chunk_size,
        },
        "scheme": {"algorithm": "gptq", "bits": 4, "group_size": 64},
        "resources": {"workers": workers, "cpus_per_worker": 1},
    }


def run(doc: dict, address: str) -> dict:
    env = {**os.environ, "RAY_ADDRESS": address}
    out = subprocess.run(
        [sys.executable, "-c", ONE_RUN, json.dumps(doc)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"quantize failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--blocks", type=int, nargs="+", help="resize the model to these block counts (default: as is)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=8)
    args = p.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from scripts.resize_model import resize_model

    ray.init(num_cpus=max(args.workers), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    tmp = Path(tempfile.mkdtemp(prefix="lamina-scaling-"))
    model = FIXTURES / "smollm2-135m"
    print(f"{os.cpu_count()} CPUs, calibration {args.samples} x {args.seq_len} in chunks of {args.chunk_size}")
    columns = ["blocks", "workers", "total s", *PHASES, "speedup", "driver MiB (start / peak)", "worker peak MiB"]
    header = "| " + " | ".join(columns) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for blocks in args.blocks or [None]:
        source = model if blocks is None else resize_model(model, tmp / f"model-{blocks}", blocks)
        base = None
        for workers in args.workers:
            r = run(recipe(source, tmp / f"out-{blocks}-{workers}", workers, args), address)
            base = base or r["total"]
            phases = " | ".join(f"{r['seconds'][k]:.1f}" for k in PHASES)
            peaks = "/".join(mib(x) for x in r["worker_peak"])
            print(
                f"| {r['blocks']} | {workers} | {r['total']:.1f} | {phases} | {base / r['total']:.2f} | "
                f"{mib(r['driver_before'])} / {mib(r['driver_peak'])} | {peaks} |",
                flush=True,
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
