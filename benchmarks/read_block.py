"""Read one Llama-3-70B-shaped block from S3: lamina's range reads against fsspec `get`.

Both are timed in the same run; `get` fetches the whole shard that holds the block.

The checkpoint is written once to a moto S3 server started on 127.0.0.1 by this script
(or to a local temp folder with `--store file`): `config.json`, `model.safetensors.index.json`
and one shard cut the way Hugging Face cuts them, so that it holds the MLP and norms of
block i-1, all of block i and the attention of block i+1, filled with random bf16 values.

Measured for block i, best of `--repeat` runs:
  lamina    `Checkpoint(uri)` (config, index, shard header), then
            `checkpoint.read(checkpoint.names("model.layers.{i}."))`: bytes fetched by the read
            (the Location's traffic counter), bytes the block needs, seconds, MB/s
  baseline  fsspec `get` of the whole shard to a local temp file, then safetensors loads
            the block's tensors from it: bytes fetched (the shard), seconds, MB/s
and whether both ways give equal tensors (torch.equal). MB are 10**6 bytes; "MB/s of block"
is the block's bytes over the whole time, "MB/s moved" the bytes fetched over it.

    python benchmarks/read_block.py --scale 8   # hidden 1024, intermediate 3584: seconds
    python benchmarks/read_block.py             # real shapes: a 1.7 GB block in a 3.0 GB shard
    LAMINA_READ_STREAMS=1 python benchmarks/read_block.py   # lamina with one range request at a time
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from storage.checkpoint import INDEX, Checkpoint
from storage.fs import READ_STREAMS, Location, open_location
from storage.options import configure

HIDDEN, INTERMEDIATE, LAYERS = 8192, 28672, 80  # Llama-3-70B
HEADS, KV_HEADS = 64, 8  # head dim 128; k_proj and v_proj project to hidden * KV_HEADS / HEADS
SHARD = "model-00001-of-00001.safetensors"
BUCKET = "lamina-bench"
# moto answers every GET, ranged or not, by copying the whole object under a per-object lock,
# so concurrent requests for one 3 GB shard queue for seconds each; with s3fs's 15 s default
# they time out and are sent again, and the retries pile up. Real S3 needs no such wait.
MOTO_READ_TIMEOUT_SECONDS = 600
MB = 1e6

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Timing:
    """One read of the block: bytes moved from the store and seconds per phase, in order."""

    fetched: int
    phases: dict[str, float]
    opening: int = 0  # bytes read before the block (config, index, headers), not in `fetched`

    @property
    def seconds(self) -> float:
        return sum(self.phases.values())


def block_shapes(hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """One Llama block's weights in state-dict order, the order Hugging Face cuts shards in."""
    kv = hidden * KV_HEADS // HEADS
    return {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


def shard_shapes(block: int, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    """The shard around `block`: up, down and norms of block-1, all of block, attention of block+1."""
    weights = list(block_shapes(hidden, intermediate).items())
    parts = [(block - 1, weights[5:]), (block, weights), (block + 1, weights[:4])]
    return {f"model.layers.{i}.{name}": shape for i, part in parts for name, shape in part}


def llama_config(hidden: int, intermediate: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "torch_dtype": "bfloat16",
    }


def write_checkpoint(location: Location, shapes: dict[str, tuple[int, ...]], config: dict) -> int:
    """Random bf16 tensors saved to a local shard and uploaded by fsspec `put` (streamed from
    disk, so the shard is never held twice in memory); then the index and config. Returns the
    shard's size in bytes."""
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator, dtype=torch.bfloat16) for name, shape in shapes.items()}
    total = sum(t.nbytes for t in tensors.values())
    with tempfile.TemporaryDirectory(prefix="lamina-bench-") as tmp:
        local = os.path.join(tmp, SHARD)
        save_file(tensors, local, metadata={"format": "pt"})
        del tensors
        location.fs.makedirs(location.root, exist_ok=True)
        location.fs.put_file(local, location.path(SHARD))
    index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(shapes, SHARD)}
    location.write_bytes(INDEX, json.dumps(index, indent=2).encode())
    location.write_bytes("config.json", json.dumps(config, indent=2).encode())
    return location.size(SHARD)


def lamina_read(uri: str, block: int) -> tuple[Timing, Tensors]:
    """Open the checkpoint (config, index, header), then read the block by byte ranges."""
    start = time.perf_counter()
    checkpoint = Checkpoint(uri)
    opened = time.perf_counter()
    opening = checkpoint.location.traffic["bytes_read"]
    checkpoint.location.traffic.clear()
    tensors = checkpoint.read(checkpoint.names(f"model.layers.{block}."))
    done = time.perf_counter()
    phases = {"open": opened - start, "read": done - opened}
    return Timing(fetched=checkpoint.location.traffic["bytes_read"], phases=phases, opening=opening), tensors


def baseline_get(uri: str, names: list[str], concurrency: int) -> tuple[Timing, Tensors]:
    """fsspec `get` of the whole shard to a local file, then safetensors loads the block from it.
    With concurrency > 1, s3fs fetches 50 MiB ranges that many at a time (its default is 10)."""
    location = open_location(uri)
    with tempfile.TemporaryDirectory(prefix="lamina-bench-get-") as tmp:
        local = os.path.join(tmp, SHARD)
        start = time.perf_counter()
        location.fs.get(location.path(SHARD), local, max_concurrency=concurrency)
        fetched = time.perf_counter()
        with safe_open(local, framework="pt") as f:  # get_tensor maps the file; clone reads it, as lamina's read does
            tensors = {name: f.get_tensor(name).clone() for name in names}
        done = time.perf_counter()
        size = os.path.getsize(local)
    return Timing(fetched=size, phases={"get": fetched - start, "load": done - fetched}), tensors


def equal(ours: Tensors, theirs: Tensors) -> bool:
    return ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def measure(
    *, uri: str, block: int, names: list[str], repeat: int, get_concurrency: int
) -> tuple[Timing, Timing, bool]:
    """Both reads, interleaved `repeat` times: the fastest of each, and whether every pair matched."""
    best: dict[str, Timing] = {}
    matched = True
    for _ in range(repeat):
        ours, our_tensors = lamina_read(uri, block)
        theirs, their_tensors = baseline_get(uri, names, get_concurrency)
        matched = matched and equal(our_tensors, their_tensors)
        del our_tensors, their_tensors  # one run's tensors at a time
        for key, timing in (("lamina", ours), ("baseline", theirs)):
            if key not in best or timing.seconds < best[key].seconds:
                best[key] = timing
    return best["lamina"], best["baseline"], matched


@contextlib.contextmanager
def loopback_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, reached through the standard AWS variables (as in tests)."""
    from moto.server import ThreadedMotoServer  # moto comes with lamina[test]

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=f"http://{host}:{port}",
        )
        configure({f"s3://{BUCKET}": {"config_kwargs": {"read_timeout": MOTO_READ_TIMEOUT_SECONDS}}}, resolved=True)
        open_location(f"s3://{BUCKET}").fs.mkdir(BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.stop()


@contextlib.contextmanager
def local_folder() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="lamina-bench-store-") as tmp:
        yield f"file://{tmp}"


def line(name: str, timing: Timing, needed: int, repeat: int) -> str:
    phases = " + ".join(f"{phase} {s:.2f} s" for phase, s in timing.phases.items())
    rates = f"{needed / MB / timing.seconds:6.1f} MB/s of block, {timing.fetched / MB / timing.seconds:6.1f} MB/s moved"
    opening = f"; opening read {timing.opening / 1e3:.1f} kB more" if timing.opening else ""
    return (
        f"{name:<9}{timing.fetched / MB:9.1f} MB fetched / {needed / MB:.1f} MB needed = "
        f"{timing.fetched / needed:.3f}   best of {repeat}: {timing.seconds:6.2f} s ({phases})   {rates}{opening}"
    )


def report(*, ours: Timing, theirs: Timing, needed: int, matched: bool, repeat: int) -> None:
    print(line("lamina", ours, needed, repeat))
    print(line("baseline", theirs, needed, repeat))
    print(
        f"ratio    lamina / baseline: time {ours.seconds / theirs.seconds:.3f}, "
        f"bytes fetched {ours.fetched / theirs.fetched:.3f}"
    )
    print(f"check    lamina and baseline tensors are {'equal' if matched else 'NOT EQUAL'} (torch.equal)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"memory   peak RSS of this process (with --store s3, moto's server runs inside it) {peak / 2**30:.1f} GiB")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="divide hidden and intermediate sizes by this")
    parser.add_argument("--repeat", type=int, default=3, help="report the best of this many timings")
    parser.add_argument("--block", type=int, default=40, help="the block to read (1 .. 78)")
    parser.add_argument("--store", choices=["s3", "file"], default="s3", help="moto S3 on loopback, or a temp folder")
    parser.add_argument(
        "--get-concurrency",
        type=int,
        default=1,
        help="ranged GETs s3fs's `get` runs at once (1: one streamed GET; s3fs's own default is 10)",
    )
    args = parser.parse_args()
    if HIDDEN % (args.scale * HEADS // KV_HEADS) or INTERMEDIATE % args.scale:
        parser.error(f"--scale {args.scale} must divide {HIDDEN // (HEADS // KV_HEADS)} and {INTERMEDIATE}")
    if not 1 <= args.block <= LAYERS - 2:
        parser.error(f"--block must be in 1 .. {LAYERS - 2}: the shard holds its neighbours")
    if args.repeat < 1 or args.get_concurrency < 1:
        parser.error("--repeat and --get-concurrency must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    hidden, intermediate = HIDDEN // args.scale, INTERMEDIATE // args.scale
    shapes = shard_shapes(args.block, hidden, intermediate)
    names = sorted(n for n in shapes if n.startswith(f"model.layers.{args.block}."))
    needed = sum(2 * torch.Size(shapes[n]).numel() for n in names)  # bf16
    with loopback_s3() if args.store == "s3" else local_folder() as root:
        uri = f"{root}/llama-3-70b"
        start = time.perf_counter()
        shard = write_checkpoint(open_location(uri), shapes, llama_config(hidden, intermediate))
        print(
            f"setup    Llama-3-70B shapes / {args.scale} (hidden {hidden}, intermediate {intermediate}), "
            f"block {args.block}: {len(names)} tensors, {needed / MB:.1f} MB; shard {shard / MB:.1f} MB "
            f"with blocks {args.block - 1} (part), {args.block}, {args.block + 1} (part); "
            f"written to {uri} in {time.perf_counter() - start:.1f} s; lamina reads up to {READ_STREAMS} "
            f"ranges at once (LAMINA_READ_STREAMS), baseline get {args.get_concurrency}"
        )
        ours, theirs, matched = measure(
            uri=uri, block=args.block, names=names, repeat=args.repeat, get_concurrency=args.get_concurrency
        )
    report(ours=ours, theirs=theirs, needed=needed, matched=matched, repeat=args.repeat)


if __name__ == "__main__":
    main()
