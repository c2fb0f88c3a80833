"""URIs to filesystems: one place that turns 'file://', plain paths, 'memory://',
's3://', 'gs://' and chained URIs ('faulty::file:///x') into an fsspec filesystem and a
path on it, and the only place that talks to that filesystem.

Every call is retried with exponential backoff on transient errors (connection resets,
timeouts, throttling, short reads, writes that landed truncated), so that a run of hours
survives a flaky store; errors that retrying cannot fix (missing file, permission, a
create that lost the race) are raised at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_BYTES = 8 * 2**20  # multipart upload part size (S3's minimum is 5 MiB)
READ_PART_BYTES = 16 * 2**20  # large range reads are split into parts of at least this size...
READ_STREAMS = int(os.environ.get("LAMINA_READ_STREAMS", "8"))  # ...and at most this many, fetched at once
REMOTE_OPTIONS: dict[str, dict] = {"s3": {"use_listings_cache": False}, "gs": {"use_listings_cache": False}}
ATTEMPTS = 8  # tries per storage call
BACKOFF_SECONDS = 0.1  # first wait; doubled per retry, with jitter, capped below
MAX_BACKOFF_SECONDS = 10.0
CLIENT_LIBRARIES = ("botocore", "aiobotocore", "google.auth", "google.api_core")
PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class LocalFiles(LocalFileSystem):
    """fsspec's local filesystem with an atomic exclusive create. fsspec's own
    `pipe_file(mode="create")` checks for the file and then writes it, so two publishers
    racing for one manifest could both win. Here the bytes go to a temporary file that is
    hard-linked to the name (the link fails if the name exists), so exactly one creator
    wins and no reader sees a partly written file."""

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: object) -> None:
        """Exclusive create by hard link; an overwrite by os.replace of a temporary file in
        the same folder, so a reader sees the old bytes or the new ones, never a mix (fsspec
        writes in place: a reader of an event log or a lock could see it empty)."""
        path = self._strip_protocol(path)
        temporary = f"{path}.{uuid.uuid4().hex}.{'creating' if mode == 'create' else 'writing'}"
        with open(temporary, "xb") as f:
            f.write(value)
        try:
            if mode == "create":
                os.link(temporary, path)
            else:
                os.replace(temporary, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return None


class MemoryFiles(MemoryFileSystem):
    """fsspec's in-memory filesystem with an exclusive create that is atomic across threads
    (fsspec checks for the file, then writes it: two racing creators could both win)."""

    _create_lock = threading.Lock()

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: object) -> None:
        if mode != "create":
            return super().pipe_file(path, value, mode=mode, **kwargs)
        with self._create_lock:
            return super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("faulty", "storage.faults.FaultyFileSystem", clobber=True)
for _protocol in LocalFileSystem.protocol:
    fsspec.register_implementation(_protocol, LocalFiles, clobber=True)
fsspec.register_implementation("memory", MemoryFiles, clobber=True)


class StorageError(Exception):
    """A storage problem worth one clear line to the user (missing, truncated, corrupt)."""


class TornTransferError(OSError):
    """A read or write that moved fewer bytes than it should have: retried like a reset."""


def transient(error: BaseException) -> bool:
    return isinstance(error, (OSError, TimeoutError)) and not isinstance(error, PERMANENT)


def backoff(attempt: int) -> float:
    return min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2**attempt) * (0.5 + random.random() / 2)


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: the unit every reader and writer works on."""

    fs: AbstractFileSystem
    root: str
    uri: str
    traffic: Counter = field(default_factory=Counter, compare=False, repr=False)  # bytes_read, bytes_written, retries

    def path(self, name: str) -> str:
        if name.startswith("/") or "\\" in name or ".." in name.split("/") or "\0" in name:
            raise StorageError(f"{self.uri}: refusing unsafe file name {name!r}")
        return posixpath.join(self.root, name) if name else self.root

    def retrying(self, what: str, call: Callable[[int], T]) -> T:
        """call(attempt) until it succeeds, an error is permanent, or ATTEMPTS are spent."""
        for attempt in range(ATTEMPTS):
            try:
                return call(attempt)
            except PERMANENT:
                raise
            except Exception as e:
                if not transient(e):
                    if type(e).__module__.startswith(CLIENT_LIBRARIES):  # e.g. no credentials found
                        raise StorageError(f"{self.uri}: {what}: {e}") from None
                    raise
                if attempt == ATTEMPTS - 1:
                    raise StorageError(f"{self.uri}: {what} failed after {ATTEMPTS} attempts: {e}") from None
                wait = backoff(attempt)
                self.traffic["retries"] += 1
                log.warning("%s: %s failed (%s); retry %d/%d in %.2f s", self.uri, what, e, attempt + 1, ATTEMPTS, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def exists(self, name: str = "") -> bool:
        path = self.path(name)
        return self.retrying(f"exists {name}", lambda _: self.fs.exists(path))

    def isfile(self, name: str = "") -> bool:
        path = self.path(name)
        return self.retrying(f"isfile {name}", lambda _: self.fs.isfile(path))

    def size(self, name: str) -> int:
        path = self.path(name)
        try:
            return int(self.retrying(f"size of {name}", lambda _: self.fs.size(path)))
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: missing file {name}") from None

    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        """A whole file, or bytes [start, end) of it; a short answer is retried, never returned."""
        path = self.path(name)

        def read(_: int) -> bytes:
            data = self.fs.cat_file(path, start=start, end=end)
            want = (end - (start or 0)) if end is not None else int(self.fs.size(path)) - (start or 0)
            if len(data) != want:
                raise TornTransferError(f"short read of {name}: {len(data)} of {want} bytes")
            return data

        try:
            data = self.retrying(f"read {name}", read)
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: missing file {name}") from None
        self.traffic["bytes_read"] += len(data)
        return data

    def read_range(self, name: str, start: int, end: int) -> bytearray:
        """Bytes [start, end) of a file, fetched as up to READ_STREAMS parts at once
        (concurrent requests on S3 and GCS: one stream gives ~100 MB/s, and a block of a 70B
        model is ~1.7 GB); a retry fetches only the parts that failed or came back short."""
        path = self.path(name)
        parts = max(1, min(READ_STREAMS, (end - start) // READ_PART_BYTES))
        step = -(-(end - start) // parts) if end > start else 1
        starts = list(range(start, end, step))
        ends = [min(s + step, end) for s in starts]
        out, done = bytearray(end - start), [False] * len(starts)

        def read(_: int) -> None:
            if isinstance(self.fs, LocalFileSystem):  # one copy, from the page cache into `out`
                with open(path, "rb") as f:
                    f.seek(start)
                    got = f.readinto(memoryview(out))
                if got != len(out):
                    raise TornTransferError(f"short read of {name}: {got} of {len(out)} bytes")
                done[:] = [True] * len(done)
                return
            todo = [i for i, ok in enumerate(done) if not ok]
            got = self.fs.cat_ranges([path] * len(todo), [starts[i] for i in todo], [ends[i] for i in todo])
            failed: list[BaseException] = []
            for i, data in zip(todo, got, strict=True):
                if isinstance(data, BaseException):
                    failed.append(data)
                elif len(data) != ends[i] - starts[i]:
                    want = ends[i] - starts[i]
                    failed.append(TornTransferError(f"short read of {name}: {len(data)} of {want} bytes"))
                else:
                    out[starts[i] - start : ends[i] - start] = data
                    done[i] = True
            if failed:
                raise next((e for e in failed if isinstance(e, PERMANENT)), failed[0])

        try:
            self.retrying(f"read {name}", read)
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: missing file {name}") from None
        self.traffic["bytes_read"] += len(out)
        return out

    def write_bytes(self, name: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write a whole file; on object stores anything over PART_BYTES goes multipart. The
        stored size is checked after every write: a torn upload is written again.

        exclusive: create the file only if it does not exist (an S3 or GCS conditional write,
        O_EXCL locally), else raise FileExistsError; for small control files. If an earlier
        attempt of this call created it before its answer was lost, the retry finds our own
        bytes there and succeeds."""
        path = self.path(name)
        parent = posixpath.dirname(path)

        def write(attempt: int) -> None:
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            if exclusive:
                try:
                    self.fs.pipe_file(path, data, mode="create")
                except FileExistsError:
                    if attempt == 0 or self.fs.cat_file(path) != data:
                        raise
            elif isinstance(self.fs, LocalFiles):  # whole-file replace: readers never see a partial file
                self.fs.pipe_file(path, data)
            else:
                with self.fs.open(path, "wb", block_size=PART_BYTES) as f:
                    for offset in range(0, len(data), PART_BYTES):
                        f.write(data[offset : offset + PART_BYTES])
            stored = int(self.fs.size(path))
            if stored != len(data):
                if exclusive:
                    raise StorageError(f"{self.uri}: {name} was stored with {stored} of {len(data)} bytes")
                raise TornTransferError(f"{name} stored with {stored} of {len(data)} bytes")

        self.retrying(f"write {name}", write)
        self.traffic["bytes_written"] += len(data)

    def write_file(self, name: str, local_path: str) -> None:
        """Upload a local file too large to hold in memory (e.g. a GGUF export), streamed in
        parts of PART_BYTES (multipart on object stores); a torn upload is sent again. For
        staging folders: a reader of `name` could see it partly written."""
        path, size = self.path(name), os.path.getsize(local_path)
        parent = posixpath.dirname(path)

        def write(_: int) -> None:
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            with open(local_path, "rb") as src, self.fs.open(path, "wb", block_size=PART_BYTES) as dst:
                while chunk := src.read(PART_BYTES):
                    dst.write(chunk)
            stored = int(self.fs.size(path))
            if stored != size:
                raise TornTransferError(f"{name} stored with {stored} of {size} bytes")

        self.retrying(f"write {name}", write)
        self.traffic["bytes_written"] += size

    def copy(self, name: str, to: str, size: int) -> None:
        """Copy a file within the store (server-side on S3 and GCS); check the copy's size."""
        src, dst = self.path(name), self.path(to)

        def copy(_: int) -> None:
            if posixpath.dirname(dst):
                self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            self.fs.copy(src, dst)
            if int(self.fs.size(dst)) != size:
                raise TornTransferError(f"copy of {name} to {to} is not {size} bytes")

        try:
            self.retrying(f"copy {name}", copy)
        except FileNotFoundError:
            raise StorageError(f"{self.uri}: missing file {name}") from None

    def remove(self, name: str = "") -> None:
        """Remove a file or a folder with everything below it; gone already is fine."""
        path = self.path(name)
        with contextlib.suppress(FileNotFoundError):
            self.retrying(f"remove {name or self.root}", lambda _: self.fs.rm(path, recursive=True))

    def child(self, name: str) -> Location:
        """The sub-folder `name` as a Location of its own."""
        return Location(fs=self.fs, root=self.path(name), uri=f"{self.uri.rstrip('/')}/{name}")

    def list_files(self) -> list[str]:
        """Names of all files below the folder, relative to it, sorted."""

        def find(_: int) -> list[str]:
            return self.fs.find(self.root) if self.fs.exists(self.root) else []

        prefix = self.root.rstrip("/") + "/"
        return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in self.retrying("list", find))

    def glob(self, pattern: str) -> list[str]:
        """Names matching a glob pattern relative to the folder, sorted."""
        prefix = self.root.rstrip("/") + "/"
        found = self.retrying(f"glob {pattern}", lambda _: self.fs.glob(self.path(pattern)))
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))


def protocols(uri: str) -> list[str]:
    """The protocols of a (possibly chained) URI, outermost first: 'faulty::s3://b' -> [faulty, s3]."""
    if "://" not in uri:
        return ["file"]
    return [part.split("://", 1)[0] if "://" in part else part for part in uri.split("::")]


def open_location(uri: str) -> Location:
    """'s3://bucket/x', 'gs://bucket/x', 'file:///x', 'memory://x', a chained URI or a
    plain (relative) path -> Location.

    Options for the filesystem come from `storage.options` (the recipe's `storage:`
    section), else from the standard chains: for S3 the AWS_ENDPOINT_URL and AWS_*
    variables, ~/.aws and instance roles; for GCS GOOGLE_APPLICATION_CREDENTIALS or the
    metadata server. Listings are never cached, since other processes (the workers) write
    into the same folders."""
    from storage.options import options_for

    if "://" not in uri:
        uri = os.path.abspath(uri)
    chain = protocols(uri)
    kwargs: dict = {}
    for depth, protocol in enumerate(chain):
        fixed = REMOTE_OPTIONS.get(protocol, {})
        if depth == 0:
            kwargs.update(fixed)
        elif fixed:
            kwargs[protocol] = {**fixed}
    for key, value in options_for(uri).items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
            kwargs[key] = {**kwargs[key], **value}
        else:
            kwargs[key] = value
    try:
        fs, root = fsspec.core.url_to_fs(uri, **kwargs)
    except ImportError as e:
        hint = "; for gs:// install lamina[gcs]" if "gs" in chain else ""
        raise StorageError(f"{uri}: no filesystem for it is installed ({e}){hint}") from None
    except ValueError as e:
        raise StorageError(f"{uri}: {e}") from None
    return Location(fs=fs, root=root.rstrip("/") or "/", uri=uri)
