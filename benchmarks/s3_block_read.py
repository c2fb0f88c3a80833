"""Reading one Llama-3-70B block from S3: lamina's range reads against fsspec `get`.

A shard laid out the way Hugging Face shards a 70B checkpoint (the tail of block i-1, all
of block i, the head of block i+1; random bf16 values, real shapes) is written once to a
real S3 endpoint on loopback (moto's server). Then, in the same run:

- lamina: `Checkpoint(uri)` (config, index, shard header by range reads) and
  `read(block i's names)`: bytes fetched, seconds, MB/s; with its default of up to
  READ_STREAMS concurrent part requests, and with one stream;
- baseline: fsspec `get` of the whole shard to local disk, then safetensors loads block
  i's tensors from it: bytes fetched, seconds, MB/s.

It prints bytes fetched / bytes needed for both and the time ratio lamina / baseline,
best of --repeat, and checks that both ways give equal tensors.

moto reads the whole object for every request, even a range: there, concurrent parts cost
one object read each, and the times favour one stream and penalise big objects. Real S3
and GCS serve ranges without that cost, and parallel range requests are how one client
goes past a single stream's ~100 MB/s; the bytes ratio holds everywhere.

    python benchmarks/s3_block_read.py             # real shapes: a 2.7 GB shard, ~1.7 GB block
    python benchmarks/s3_block_read.py --scale 8   # hidden and MLP sizes / 8, for a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

import storage.fs as fs_module
from storage.checkpoint import Checkpoint
from storage.fs import Location, open_location

HIDDEN, INTERMEDIATE, HEAD_DIM, KV_HEADS = 8192, 28672, 128, 8  # Llama-3-70B
LAYERS = 80
SHARD = "model-00017-of-00030.safetensors"


def block_shapes(i: int, scale: int) -> dict[str, tuple[int, ...]]:
    h, m, kv = HIDDEN // scale, INTERMEDIATE // scale, KV_HEADS * HEAD_DIM // scale
    p = f"model.layers.{i}."
    return {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.gate_proj.weight": (m, h),
        p + "mlp.up_proj.weight": (m, h),
        p + "mlp.down_proj.weight": (h, m),
    }


def shard_shapes(block: int, scale: int) -> dict[str, tuple[int, ...]]:
    """Tail of the block before (its MLP), the whole block, head of the block after (attention)."""
    before = {n: s for n, s in block_shapes(block - 1, scale).items() if ".mlp." in n or "post_attention" in n}
    after = {n: s for n, s in block_shapes(block + 1, scale).items() if ".self_attn." in n or "input_layernorm" in n}
    return {**before, **block_shapes(block, scale), **after}


def write_checkpoint(location: Location, block: int, scale: int) -> int:
    """config.json, index and one shard of random bf16 values; returns the shard's size."""
    generator = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=generator).to(torch.bfloat16) for n, s in shard_shapes(block, scale).items()}
    data = save(tensors, metadata={"format": "pt"})
    del tensors
    config = {
        "model_type": "llama",
        "hidden_size": HIDDEN // scale,
        "intermediate_size": INTERMEDIATE // scale,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 64,
        "num_key_value_heads": KV_HEADS,
        "torch_dtype": "bfloat16",
    }
    index = {"metadata": {}, "weight_map": dict.fromkeys(shard_shapes(block, scale), SHARD)}
    location.write_bytes("config.json", json.dumps(config).encode())
    location.write_bytes("model.safetensors.index.json", json.dumps(index).encode())
    location.write_bytes(SHARD, data)
    return len(data)


def lamina_read(uri: str, block: int) -> tuple[dict[str, torch.Tensor], int, float]:
    """Open the checkpoint and read block `block`: (tensors, bytes fetched, seconds)."""
    start = time.perf_counter()
    checkpoint = Checkpoint(uri)
    tensors = checkpoint.read(checkpoint.names(f"model.layers.{block}."))
    return tensors, checkpoint.location.traffic["bytes_read"], time.perf_counter() - start


def baseline_read(location: Location, block: int, folder: Path) -> tuple[dict[str, torch.Tensor], int, float]:
    """fsspec `get` of the shard, then the block's tensors from the local copy."""
    local = folder / SHARD
    local.unlink(missing_ok=True)
    start = time.perf_counter()
    location.fs.get(location.path(SHARD), str(local))
    with safe_open(str(local), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if n.startswith(f"model.layers.{block}.")}  # noqa: SIM118
    return tensors, local.stat().st_size, time.perf_counter() - start


def start_s3() -> tuple[object, str]:
    """moto's S3 server on a free loopback port, reached through the standard AWS variables."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    open_location("s3://bench").fs.mkdir("bench")
    return server, "s3://bench/llama-3-70b-shard"


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / 2**20 / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=1, help="divide hidden and MLP sizes by this (1 = real shapes)")
    p.add_argument("--block", type=int, default=40, help="which block the shard holds whole")
    p.add_argument("--repeat", type=int, default=3, help="best of this many timings")
    p.add_argument("--store", choices=["s3", "file"], default="s3", help="loopback S3 (default) or a local folder")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="lamina-bench-") as tmp:
        server, uri = start_s3() if args.store == "s3" else (None, str(Path(tmp) / "store"))
        location = open_location(uri)
        start = time.perf_counter()
        size = write_checkpoint(location, args.block, args.scale)
        upload = time.perf_counter() - start
        needed = sum(
            torch.Size(s).numel() * 2 for n, s in block_shapes(args.block, args.scale).items()
        )  # bf16: 2 bytes
        print(f"store {args.store}, scale 1/{args.scale}: shard {size / 2**20:.1f} MiB written in {upload:.1f} s")
        print(f"block {args.block}: {needed / 2**20:.1f} MiB of {len(block_shapes(args.block, args.scale))} tensors")

        ours = [lamina_read(uri, args.block) for _ in range(args.repeat)]
        streams, fs_module.READ_STREAMS = fs_module.READ_STREAMS, 1
        single = min(lamina_read(uri, args.block)[2] for _ in range(args.repeat))
        fs_module.READ_STREAMS = streams
        theirs = [baseline_read(location, args.block, Path(tmp)) for _ in range(args.repeat)]
        (lamina_tensors, fetched, _), (base_tensors, base_fetched, _) = ours[0], theirs[0]
        ours_s, theirs_s = min(r[2] for r in ours), min(r[2] for r in theirs)
        equal = set(lamina_tensors) == set(base_tensors) and all(
            torch.equal(lamina_tensors[n], base_tensors[n]) for n in lamina_tensors
        )
        print(
            f"lamina, {streams} streams: fetched {fetched / 2**20:8.1f} MiB = {fetched / needed:.4f} x needed, "
            f"{ours_s:6.2f} s, {mb_per_s(needed, ours_s):7.1f} MB/s of block"
        )
        print(f"lamina, one stream : {single:6.2f} s, {mb_per_s(needed, single):7.1f} MB/s of block")
        print(
            f"fsspec get + load  : fetched {base_fetched / 2**20:8.1f} MiB = {base_fetched / needed:.4f} x needed, "
            f"{theirs_s:6.2f} s, {mb_per_s(needed, theirs_s):7.1f} MB/s of block "
            f"({mb_per_s(base_fetched, theirs_s):.1f} MB/s of transfer)"
        )
        print(
            f"ratio lamina / baseline: time {ours_s / theirs_s:.2f} ({single / theirs_s:.2f} with one stream), "
            f"bytes {fetched / base_fetched:.3f}; "
            f"tensors equal: {equal}"
        )
        if server is not None:
            server.stop()
        if not equal:
            sys.exit("tensors differ between the two ways of reading")


if __name__ == "__main__":
    main()
