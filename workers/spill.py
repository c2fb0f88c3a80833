"""Hidden states of a worker's chunks kept in files instead of memory (resources.spill).

A worker holds the hidden states of all its chunks between blocks: [tokens, hidden]
float32, 1 GiB per 32k tokens at 70B widths. Spilled, it holds one chunk at a time while
it runs a block over them, and each chunk is one safetensors file under the spill folder
(local disk or object storage), read back when the next block needs it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, MutableMapping

import torch

from storage.fs import open_location
from storage.safetensors_io import read_header, read_tensors
from storage.writer import put_tensors


class SpilledChunks(MutableMapping[int, torch.Tensor]):
    """chunk id -> hidden states [seqs, T, hidden], one file each in a fresh sub-folder of
    `uri` owned by this worker; `clear()` removes the sub-folder."""

    def __init__(self, uri: str):
        self.location = open_location(uri).child(f"worker-{uuid.uuid4().hex[:12]}")
        self.chunks: set[int] = set()

    @staticmethod
    def file(chunk: int) -> str:
        return f"chunk-{chunk:06d}.safetensors"

    def __getitem__(self, chunk: int) -> torch.Tensor:
        if chunk not in self.chunks:
            raise KeyError(chunk)
        name = self.file(chunk)
        return read_tensors(self.location, read_header(self.location, name), ["hidden"])["hidden"]

    def __setitem__(self, chunk: int, hidden: torch.Tensor) -> None:
        put_tensors(self.location.uri, self.file(chunk), {"hidden": hidden})
        self.chunks.add(chunk)

    def __delitem__(self, chunk: int) -> None:
        self.chunks.remove(chunk)
        self.location.remove(self.file(chunk))

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.chunks))

    def __len__(self) -> int:
        return len(self.chunks)

    def clear(self) -> None:
        self.chunks.clear()
        self.location.remove()
