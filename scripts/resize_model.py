"""A copy of a Hugging Face checkpoint with a different number of decoder blocks: the first
`blocks` of the source, or (more than it has) its blocks repeated in order. Tests use a
few-block copy of the fixture to run the distributed machinery in seconds; benchmarks use
long copies to show what grows with the number of blocks.

    python scripts/resize_model.py SRC DEST --blocks 4
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def resize_model(src: Path, dest: Path, blocks: int) -> Path:
    """Write the resized checkpoint (one safetensors file) into `dest`; returns `dest`."""
    config = json.loads((src / "config.json").read_text())
    have = config["num_hidden_layers"]
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    tensors, by_block = {}, {}
    for name, file in sorted(index.items()):
        with safe_open(str(src / file), "pt") as f:
            t = f.get_tensor(name)
        match = BLOCK.fullmatch(name)
        if match:
            by_block.setdefault(int(match.group(1)), {})[match.group(2)] = t
        else:
            tensors[name] = t
    for i in range(blocks):
        for rest, t in by_block[i % have].items():
            tensors[f"model.layers.{i}.{rest}"] = t.clone()
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(("model", "config")):
            shutil.copy(f, dest / f.name)
    (dest / "config.json").write_text(json.dumps({**config, "num_hidden_layers": blocks}, indent=2))
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--blocks", type=int, required=True)
    args = p.parse_args()
    print(resize_model(args.src, args.dest, args.blocks))


if __name__ == "__main__":
    main()
