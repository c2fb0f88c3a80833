"""Safetensors by range reads: the header is parsed from the first bytes of a file and
each tensor is fetched by its byte range, so reading one block of a sharded 70B
checkpoint transfers about that block's bytes, not the files.

Format: 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from storage.fs import Location, StorageError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn,  # FP8 and NVFP4 scales (the float format)
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20
FIRST_READ_BYTES = 64 * 2**10  # a 70B shard's header is ~20 KB: one request reads it whole


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset from the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    file: str
    data_start: int
    entries: dict[str, TensorEntry]
    raw: bytes  # the header bytes as stored, for fingerprints

    @property
    def data_bytes(self) -> int:
        return max((e.end for e in self.entries.values()), default=0)


def _entry(file: str, name: str, spec: object) -> TensorEntry:
    if not name or any(c in name for c in "/\\\0"):
        raise StorageError(f"{file}: refusing unsafe tensor name {name!r}")
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise StorageError(f"{file}: malformed header entry for tensor {name!r}")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPES:
        raise StorageError(f"{file}: tensor {name!r} has unsupported dtype {dtype!r}")
    ints = [*shape, *offsets]
    if not all(isinstance(v, int) and v >= 0 for v in ints) or len(offsets) != 2:
        raise StorageError(f"{file}: tensor {name!r} has a bad shape or offsets")
    begin, end = offsets
    expected = math.prod(shape) * torch.empty(0, dtype=DTYPES[dtype]).element_size()
    if end - begin != expected:
        raise StorageError(f"{file}: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(file: str, entries: dict[str, TensorEntry]) -> None:
    """Tensors must tile the data section: no overlaps, no holes (as safetensors writes them)."""
    at = 0
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != at:
            kind = "overlaps the tensor before it" if e.begin < at else "leaves a gap before it"
            raise StorageError(f"{file}: header lies about offsets: tensor {name!r} {kind}")
        at = e.end


def read_header(location: Location, file: str) -> SafetensorsHeader:
    """Parse and check a file's header (its size, then one range read of its first bytes);
    refuse truncated files and headers that lie."""
    size = location.size(file)
    if size < 8:
        raise StorageError(f"{location.uri}/{file}: truncated safetensors file ({size} bytes)")
    first = location.read_range(file, 0, min(size, FIRST_READ_BYTES))  # the length and, mostly, the header
    (n,) = struct.unpack("<Q", first[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise StorageError(f"{location.uri}/{file}: truncated or corrupt safetensors header")
    raw = (
        bytes(first[8 : 8 + n])
        if 8 + n <= len(first)
        else bytes(first[8:]) + location.read_bytes(file, len(first), 8 + n)
    )
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StorageError(f"{location.uri}/{file}: safetensors header is not valid JSON") from None
    if not isinstance(doc, dict):
        raise StorageError(f"{location.uri}/{file}: safetensors header is not a JSON object")
    doc.pop("__metadata__", None)
    entries = {name: _entry(f"{location.uri}/{file}", name, spec) for name, spec in doc.items()}
    _check_layout(f"{location.uri}/{file}", entries)
    header = SafetensorsHeader(file=file, data_start=8 + n, entries=entries, raw=raw)
    if header.data_start + header.data_bytes != size:
        raise StorageError(
            f"{location.uri}/{file}: truncated safetensors file: header describes "
            f"{header.data_start + header.data_bytes} bytes, the file has {size}"
        )
    return header


def _runs(header: SafetensorsHeader, names: list[str]) -> list[list[str]]:
    """The names, sorted by offset and cut into runs of byte-adjacent tensors."""
    runs: list[list[str]] = []
    for name in sorted(names, key=lambda n: header.entries[n].begin):
        if runs and header.entries[runs[-1][-1]].end == header.entries[name].begin:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


def read_tensors(location: Location, header: SafetensorsHeader, names: list[str]) -> dict[str, torch.Tensor]:
    """Fetch the named tensors with one range read per run of adjacent tensors; the tensors
    of a run are views of its one buffer (no copies)."""
    out: dict[str, torch.Tensor] = {}
    for run in _runs(header, names):
        begin, end = header.entries[run[0]].begin, header.entries[run[-1]].end
        data = location.read_range(header.file, header.data_start + begin, header.data_start + end)
        for name in run:
            e = header.entries[name]
            dtype = DTYPES[e.dtype]
            if e.nbytes:
                flat = torch.frombuffer(data, dtype=dtype, count=e.nbytes // dtype.itemsize, offset=e.begin - begin)
                if (e.begin - begin) % dtype.itemsize:  # a hand-made file may misalign; kernels want aligned
                    flat = flat.clone()
            else:
                flat = torch.empty(0, dtype=dtype)
            out[name] = flat.reshape(e.shape)
    return out
