"""One decoder block with Llama-3-70B's exact shapes (hidden 8192, MLP 28672, 64 heads, 8 KV
heads; random bf16 weights generated here, a 1024-token vocabulary since the block does
not see it) through the real worker code: a BlockRunner calibrates it on a few chunks,
GPTQ solves all seven linears (row pieces of `--solve-rows`), the block is installed and
the chunks propagated. Measured time and peak RSS are printed next to what the planner
(pipeline/estimate.py) predicts for the same work on this machine's measured profile.

    python benchmarks/block70b.py --scale 8     # every size / 8: a dry run in seconds
    python benchmarks/block70b.py               # real shapes: about 25 minutes and 20 GB here

The checkpoint is written by a child process, so this process's peak RSS is the runner's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 8192, 28672, 64, 8, 128, 1024


def config(scale: int) -> dict:
    hidden = HIDDEN // scale
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": MLP // scale,
        "num_hidden_layers": 1,
        "num_attention_heads": hidden // HEAD_DIM,
        "num_key_value_heads": max(1, KV_HEADS // scale),
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }


def write_checkpoint(folder: Path, scale: int) -> None:
    """config.json and model.safetensors: random bf16 weights (std 0.02), unit norms."""
    from safetensors.torch import save_file

    from pipeline.estimate import ModelShape

    c = config(scale)
    shape = ModelShape.from_config(c)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for lin in shape.linears():
        w = torch.empty(lin.out_features, lin.in_features, dtype=torch.bfloat16)
        for r in range(0, lin.out_features, 1024):  # in row blocks: no full float32 copy
            rows = min(1024, lin.out_features - r)
            w[r : r + rows] = (torch.randn(rows, lin.in_features, generator=gen) * 0.02).bfloat16()
        tensors[f"model.layers.0.{lin.name}.weight"] = w
    h = c["hidden_size"]
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"model.layers.0.{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    tensors["model.embed_tokens.weight"] = (torch.randn(VOCAB, h, generator=gen) * 0.02).bfloat16()
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = (torch.randn(VOCAB, h, generator=gen) * 0.02).bfloat16()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(c))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=1, help="divide every size by this (1: Llama-3-70B's)")
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--seqs", type=int, default=1, help="sequences per chunk")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--solve-rows", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", help=argparse.SUPPRESS)  # the child: write the checkpoint here
    args = parser.parse_args()
    if args.write:
        write_checkpoint(Path(args.write), args.scale)
        return 0

    from algorithms import GPTQConfig, UniformScheme
    from pipeline.architectures import ARCHITECTURES
    from pipeline.estimate import ModelShape, estimate, gib, measure_profile
    from pipeline.plan import LinearPlan
    from workers.block import BlockRunner, peak_rss

    torch.set_num_threads(args.threads)
    profile = measure_profile("cpu", size=1024)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--scale", str(args.scale), "--write", tmp], check=True)
        t_write = time.perf_counter() - start
        c = json.loads((Path(tmp) / "config.json").read_text())
        shape = ModelShape.from_config(c)
        gen = np.random.default_rng(0)
        tokens = {i: gen.integers(0, VOCAB, (args.seqs, args.seq_len)) for i in range(args.chunks)}
        total_tokens = args.chunks * args.seqs * args.seq_len

        runner = BlockRunner(model_uri=tmp, layout=ARCHITECTURES["llama"], threads=args.threads)
        before = peak_rss()
        times = {}
        start = time.perf_counter()
        runner.set_inputs(tokens)
        runner.load_block(0)
        times["load"] = time.perf_counter() - start
        start = time.perf_counter()
        parts = runner.calibrate(args.chunks)
        hessians = runner.reduce(args.chunks, parts)
        times["calibrate"] = time.perf_counter() - start
        tasks = [
            (t.linear, t.first, t.last)
            for lin in shape.linears()
            for t in LinearPlan(lin.name, lin.out_features, lin.in_features).pieces(args.solve_rows)
        ]
        start = time.perf_counter()
        solved = runner.solve(
            0,
            tasks,
            hessians,
            tokens=total_tokens,
            algorithm="gptq",
            scheme=UniformScheme(bits=4, group_size=128),
            options=GPTQConfig(act_order=True),
        )
        times["solve"] = time.perf_counter() - start
        start = time.perf_counter()
        runner.install(UniformScheme(bits=4, group_size=128), solved)
        runner.forward()
        times["propagate"] = time.perf_counter() - start
        measured = peak_rss()

    run = estimate(
        shape,
        profile,
        workers=1,
        tokens=total_tokens,
        seq_len=args.seq_len,
        chunk_tokens=args.seqs * args.seq_len,
        solve_rows=args.solve_rows,
    )
    worker = dataclasses.replace(run.worker, copy=())  # no artifact is written here
    took = sum(times.values())
    print(f"one Llama-3-70B block / {args.scale}: {shape.block_params() / 1e6:.1f}M parameters, "
          f"{total_tokens} calibration tokens in {args.chunks} chunks, GPTQ 4-bit g128, {len(tasks)} solve tasks; "
          f"CPU, {args.threads} threads (profile: GEMM {profile.gemm / 1e9:.1f} GFLOP/s, "
          f"Cholesky {profile.factor / 1e9:.1f} GFLOP/s, {profile.column * 1e3:.2f} ms a column)")  # fmt: skip
    print(f"  checkpoint written in {t_write:.1f} s (a child process); peak RSS before the block {gib(before)}")
    print("  measured  " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f"; total {took:.1f} s")
    print(f"  predicted total {run.worker.seconds:.1f} s; ratio measured / predicted {took / run.worker.seconds:.2f}")
    print(f"  peak RSS measured {gib(measured)}, predicted {gib(worker.peak)}; "
          f"ratio {measured / worker.peak:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
