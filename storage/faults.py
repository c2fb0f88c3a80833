"""A filesystem that misbehaves on purpose, to prove that runs survive flaky stores.

`faulty::file:///x` (or `faulty::s3://bucket/x`) wraps the inner filesystem. With options
(the recipe's `storage:` section, or keyword arguments) it

- fails a fraction `fail_rate` of calls with ConnectionError, half of them before the call
  reaches the store and half after it did its work (the answer was "lost");
- stores a fraction `truncate_rate` of written files and copies with their second half
  missing, and returns the same fraction of reads short, without raising;
- fails every call after the first `fail_after` (per process), to model a store gone away.

The faults are drawn from `seed` and the process id; `per_process=False` drops the pid
so a test sees the same faults on every run.

Conditional creates (`mode="create"`) are never truncated: on S3 and GCS they are single
small PUTs that land whole or not at all.
"""

from __future__ import annotations

import io
import os
import random

import fsspec
from fsspec.implementations.chained import ChainedFileSystem


class InjectedFaultError(ConnectionError):
    pass


class FaultyFileSystem(ChainedFileSystem):
    protocol = "faulty"

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: dict | None = None,
        fo: str | None = None,
        fail_rate: float = 0.0,
        truncate_rate: float = 0.0,
        fail_after: int | None = None,
        seed: int = 0,
        per_process: bool = True,
        **kwargs: object,
    ):
        super().__init__(**kwargs)
        self.target = fsspec.filesystem(target_protocol or "file", **(target_options or {}))
        self.fail_rate, self.truncate_rate, self.fail_after = fail_rate, truncate_rate, fail_after
        # per process by default, so Ray workers sharing one recipe do not fail in lockstep;
        # per_process=False replays the same faults in every run (tests that count them)
        self.rng = random.Random(f"{seed}:{os.getpid()}" if per_process else str(seed))
        self.calls = 0
        self.injected: dict[str, int] = {"failures": 0, "truncations": 0}

    def _fault(self, call: str, path: str) -> bool:
        """Raise before the call, or return True when the call should raise after its work."""
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise InjectedFaultError(f"injected fault: store unreachable ({call} {path})")
        if self.rng.random() >= self.fail_rate:
            return False
        self.injected["failures"] += 1
        if self.rng.random() < 0.5:
            raise InjectedFaultError(f"injected fault before {call} {path}")
        return True

    def _torn(self) -> bool:
        torn = self.rng.random() < self.truncate_rate
        self.injected["truncations"] += torn
        return torn

    def _run(self, call: str, path: str, work):
        after = self._fault(call, path)
        out = work()
        if after:
            raise InjectedFaultError(f"injected fault after {call} {path}")
        return out

    def exists(self, path: str, **kw: object) -> bool:
        return self._run("exists", path, lambda: self.target.exists(path))

    def isfile(self, path: str) -> bool:
        return self._run("isfile", path, lambda: self.target.isfile(path))

    def info(self, path: str, **kw: object) -> dict:
        return self._run("info", path, lambda: self.target.info(path))

    def size(self, path: str) -> int:
        return self._run("size", path, lambda: self.target.size(path))

    def ls(self, path: str, detail: bool = True, **kw: object) -> list:
        return self._run("ls", path, lambda: self.target.ls(path, detail=detail))

    def find(self, path: str, **kw: object) -> list:
        return self._run("find", path, lambda: self.target.find(path, **kw))

    def glob(self, path: str, **kw: object) -> list:
        return self._run("glob", path, lambda: self.target.glob(path, **kw))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._run("makedirs", path, lambda: self.target.makedirs(path, exist_ok=exist_ok))

    def mkdir(self, path: str, create_parents: bool = True, **kw: object) -> None:
        self._run("mkdir", path, lambda: self.target.mkdir(path, create_parents=create_parents, **kw))

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._run("rm", path, lambda: self.target.rm(path, recursive=recursive))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: object) -> bytes:
        data = self._run("read", path, lambda: self.target.cat_file(path, start=start, end=end))
        return data[: len(data) // 2] if data and self._torn() else data

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: object) -> None:
        if mode != "create" and self._torn():
            value = value[: len(value) // 2]
        self._run("write", path, lambda: self.target.pipe_file(path, value, mode=mode))

    def copy(self, path1: str, path2: str, **kw: object) -> None:
        def work() -> None:
            self.target.copy(path1, path2)
            if self._torn():
                self.target.pipe_file(path2, self.target.cat_file(path2)[: self.target.size(path2) // 2])

        self._run("copy", path1, work)

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, **kw: object):
        if "r" in mode:
            self._fault("open", path)
            return self.target.open(path, mode)
        return _Upload(self, path)


class _Upload(io.BytesIO):
    """A write-mode file: buffered, stored by one (possibly failing or torn) call on close."""

    def __init__(self, fs: FaultyFileSystem, path: str):
        super().__init__()
        self.fs, self.path = fs, path

    def close(self) -> None:
        if not self.closed:
            data = self.getvalue()
            super().close()
            self.fs.pipe_file(self.path, data)
