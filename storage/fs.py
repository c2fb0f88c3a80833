"""URIs to filesystems: one place that turns 'file://', plain paths, 'memory://',
's3://' and 'gs://' into an fsspec filesystem and a path on it."""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import fsspec
from fsspec import AbstractFileSystem

PART_BYTES = 8 * 2**20  # multipart upload part size (S3's minimum is 5 MiB)
REMOTE_OPTIONS: dict[str, dict] = {"s3": {"use_listings_cache": False}, "gs": {"use_listings_cache": False}}


class StorageError(Exception):
    """A storage problem worth one clear line to the user (missing, truncated, corrupt)."""


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: the unit every reader and writer works on."""

    fs: AbstractFileSystem
    root: str
    uri: str
    traffic: Counter = field(default_factory=Counter, compare=False, repr=False)  # bytes_read, bytes_written

    def path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"{self.uri}: refusing unsafe file name {name!r}")
        return posixpath.join(self.root, name)

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name) if name else self.root)

    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            data = self.fs.cat_file(self.path(name), start=start, end=end)
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: missing file {name}") from None
        self.traffic["bytes_read"] += len(data)
        return data

    def size(self, name: str) -> int:
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: missing file {name}") from None

    def write_bytes(self, name: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write a whole file; on object stores anything over PART_BYTES goes multipart.

        exclusive: create the file only if it does not exist (an S3 conditional write,
        O_EXCL locally), else raise FileExistsError; for small control files."""
        path = self.path(name)
        parent = posixpath.dirname(path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        if exclusive:
            self.fs.pipe_file(path, data, mode="create")
            self.traffic["bytes_written"] += len(data)
            return
        with self.fs.open(path, "wb", block_size=PART_BYTES) as f:
            for offset in range(0, len(data), PART_BYTES):
                f.write(data[offset : offset + PART_BYTES])
        self.traffic["bytes_written"] += len(data)

    def child(self, name: str) -> Location:
        """The sub-folder `name` as a Location of its own."""
        return Location(fs=self.fs, root=self.path(name), uri=f"{self.uri.rstrip('/')}/{name}")

    def list_files(self) -> list[str]:
        """Names of all files below the folder, relative to it, sorted."""
        if not self.fs.exists(self.root):
            return []
        found = self.fs.find(self.root)
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in found)


def open_location(uri: str) -> Location:
    """'s3://bucket/x', 'file:///x', 'memory://x' or a plain (relative) path -> Location.

    S3 endpoint, region and credentials come from the standard provider chain
    (AWS_ENDPOINT_URL, AWS_* variables, ~/.aws, instance roles); listings are never cached,
    since other processes (the workers) write into the same folders."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    fs, root = fsspec.core.url_to_fs(uri, **REMOTE_OPTIONS.get(protocol, {}))
    return Location(fs=fs, root=root.rstrip("/") or "/", uri=uri)
