"""URIs to filesystems: one place that turns 'file://', plain paths, 'memory://',
's3://' and 'gs://' into an fsspec filesystem and a path on it."""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import fsspec
from fsspec import AbstractFileSystem


class StorageError(Exception):
    """A storage problem worth one clear line to the user (missing, truncated, corrupt)."""


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: the unit every reader and writer works on."""

    fs: AbstractFileSystem
    root: str
    uri: str

    def path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"{self.uri}: refusing unsafe file name {name!r}")
        return posixpath.join(self.root, name)

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name) if name else self.root)

    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            return self.fs.cat_file(self.path(name), start=start, end=end)
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: missing file {name}") from None

    def size(self, name: str) -> int:
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: missing file {name}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.path(name)
        parent = posixpath.dirname(path)
        if parent:
            self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe_file(path, data)

    def list_files(self) -> list[str]:
        """Names of all files below the folder, relative to it, sorted."""
        if not self.fs.exists(self.root):
            return []
        found = self.fs.find(self.root)
        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in found)


def open_location(uri: str) -> Location:
    """'s3://bucket/x', 'file:///x', 'memory://x' or a plain (relative) path -> Location."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    fs, root = fsspec.core.url_to_fs(uri)
    return Location(fs=fs, root=root.rstrip("/") or "/", uri=uri)
