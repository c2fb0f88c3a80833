"""A Hugging Face style checkpoint folder on any URI: config.json, safetensors shards
(single `model.safetensors` or sharded with `model.safetensors.index.json`) and
tokenizer files. Opening one reads only the config, the index and each shard's header."""

from __future__ import annotations

import hashlib
import json
from functools import cached_property

import torch

from storage.fs import Location, StorageError, open_location
from storage.safetensors_io import TensorEntry, read_header, read_tensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_json(location: Location, name: str) -> dict:
    try:
        doc = json.loads(location.read_bytes(name))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StorageError(f"{location.uri}/{name}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise StorageError(f"{location.uri}/{name}: expected a JSON object")
    return doc


class Checkpoint:
    """Read-only view of a checkpoint; every tensor read is a byte-range read."""

    def __init__(self, uri: str):
        self.location = open_location(uri)
        if not self.location.exists():
            raise StorageError(f"model source not found: {uri}")
        if not self.location.exists("config.json"):
            raise StorageError(f"{uri}: no config.json (not a Hugging Face style checkpoint)")
        self.config = read_json(self.location, "config.json")
        self.weight_map = self._weight_map()
        self.headers = {f: read_header(self.location, f) for f in sorted(set(self.weight_map.values()))}
        for name, file in self.weight_map.items():
            if name not in self.headers[file].entries:
                raise StorageError(f"{uri}: tensor {name} is listed in the index but missing from {file}")

    @property
    def uri(self) -> str:
        return self.location.uri

    def _weight_map(self) -> dict[str, str]:
        if self.location.exists(INDEX):
            weight_map = read_json(self.location, INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise StorageError(f"{self.uri}/{INDEX}: no weight_map")
            for file in set(weight_map.values()):
                self.location.path(file)  # refuses path traversal
            return dict(weight_map)
        if self.location.exists(SINGLE):
            return {name: SINGLE for name in read_header(self.location, SINGLE).entries}
        raise StorageError(f"{self.uri}: no safetensors weights ({SINGLE} or {INDEX})")

    def entry(self, name: str) -> TensorEntry:
        if name not in self.weight_map:
            raise StorageError(f"{self.uri}: missing tensor {name}")
        return self.headers[self.weight_map[name]].entries[name]

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each fetched by byte range from its shard."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            self.entry(name)
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, members in by_file.items():
            out.update(read_tensors(self.location, self.headers[file], members))
        return out

    def bytes_of(self, names: list[str]) -> int:
        return sum(self.entry(n).nbytes for n in names)

    @property
    def total_bytes(self) -> int:
        return sum(self.location.size(f) for f in self.headers)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over config.json and every shard's name, size and header: cheap to compute
        by range reads and changed by any change of tensor names, shapes, dtypes or layout."""
        h = hashlib.sha256(self.location.read_bytes("config.json"))
        for file, header in sorted(self.headers.items()):
            h.update(f"\0{file}\0{self.location.size(file)}\0".encode())
            h.update(header.raw)
        return h.hexdigest()

    def side_files(self) -> list[str]:
        """Tokenizer and generation files that travel with the weights."""
        keep = ("tokenizer", "special_tokens_map", "generation_config", "chat_template", "vocab", "merges")
        return [f for f in self.location.list_files() if "/" not in f and f.startswith(keep)]
