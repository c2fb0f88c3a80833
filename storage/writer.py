"""Writing artifact files: each file is written whole and its sha256 and size recorded,
so the manifest can be assembled without reading anything back."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors.torch import save

from storage.fs import Location, open_location


@dataclass(frozen=True)
class FileRecord:
    name: str
    sha256: str
    size: int


def put_bytes(location: Location, name: str, data: bytes, *, exclusive: bool = False) -> FileRecord:
    location.write_bytes(name, data, exclusive=exclusive)
    return FileRecord(name=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def put_json(location: Location, name: str, doc: dict, *, exclusive: bool = False) -> FileRecord:
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    return put_bytes(location, name, data, exclusive=exclusive)


def put_tensors(uri: str, name: str, tensors: dict[str, torch.Tensor]) -> FileRecord:
    """Serialize tensors as one safetensors file: equal tensors give equal bytes.

    The metadata is the single key transformers expects: safetensors stores metadata in a
    hash map whose order changes from process to process, so a second key would make the
    header's bytes depend on which worker wrote the file."""
    data = save({k: v.contiguous() for k, v in sorted(tensors.items())}, metadata={"format": "pt"})
    return put_bytes(open_location(uri), name, data)


def put_file(location: Location, name: str, local_path: str) -> FileRecord:
    """Upload a local file (one too large to hold in memory), hashed as it is read."""
    digest, size = hashlib.sha256(), 0
    with open(local_path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
    location.write_file(name, local_path)
    return FileRecord(name=name, sha256=digest.hexdigest(), size=size)
