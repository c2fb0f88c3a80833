"""A lease lock in an output folder, so that of two jobs started for the same output exactly
one runs, and a job that died blocks the next one for at most `ttl_s` seconds.

Object stores have no rename and no conditional delete, only an exclusive create, so the
lock is a series of files that are created once and never removed:
`.lamina/lock-00000001.json`, `lock-00000002.json`, ... The file with the highest
generation is the current lock. It is free when it says `released`, when its heartbeat is
older than `ttl_s`, or when it names a process on this host that no longer exists; else
it is held. A job takes a free lock by creating the next generation exclusively: of two
jobs racing for it, one create fails and that job is refused. The holder rewrites only its
own file (a plain overwrite: it is the only writer of that name), from a heartbeat thread,
and learns that it was taken over when a higher generation appears.

Heartbeats are compared with the local clock (`time.time()`), so the clocks of the hosts
that share an output must agree to well under `ttl_s` (NTP gives milliseconds). A holder
that stalls for longer than `ttl_s` (a long GC pause, a suspended VM, a store outage) may
be taken over; it finds out at its next `refresh()` or `check()` and must then stop
writing. A process id reused by another process after its holder died keeps the lock held
until its heartbeat expires.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from types import TracebackType

from storage.fs import Location, StorageError
from storage.journal import CONTROL
from storage.writer import put_json

log = logging.getLogger(__name__)

LOCK_FILE = re.compile(r"lock-(\d+)\.json")
DEFAULT_TTL_S = 120.0
TTL_VARIABLE = "LAMINA_LOCK_TTL_S"
READ_TRIES = 5  # a local overwrite can be read half-written; the next read sees it whole
READ_PAUSE_S = 0.05


class LockHeldError(StorageError):
    """Another job holds the output's lock."""


class LockLostError(StorageError):
    """This job's lease was taken over (or could not be renewed in time): it must stop writing."""


def lock_name(generation: int) -> str:
    return f"{CONTROL}/lock-{generation:08d}.json"


def describe(holder: dict) -> str:
    """'release on host-a (pid 123)': who holds a lock, in the words of an error message."""
    return f"{holder.get('what', '?')} on {holder.get('host', '?')} (pid {holder.get('pid', '?')})"


def latest_generation(output: Location) -> int:
    """The highest generation of a lock file in the output; 0 when there is none."""
    names = output.glob(f"{CONTROL}/lock-*.json")
    generations = [int(m.group(1)) for m in (LOCK_FILE.fullmatch(n.rsplit("/", 1)[-1]) for n in names) if m]
    return max(generations, default=0)


def read_lock(output: Location, generation: int) -> dict | None:
    """The lock file of `generation`; None if it is gone or stays unreadable (a holder that
    died while overwriting it locally), which makes it free. Errors of the store propagate."""
    name = lock_name(generation)
    for attempt in range(READ_TRIES):
        try:
            doc = json.loads(output.read_bytes(name))
        except StorageError:
            if not output.exists(name):
                return None
            raise
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = None
        if isinstance(doc, dict):
            return doc
        if attempt < READ_TRIES - 1:
            time.sleep(READ_PAUSE_S)
    log.warning("%s: %s is not a valid lock file; treating the lock as free", output.uri, name)
    return None


def heartbeat_of(doc: dict) -> float:
    """The lock's last heartbeat; 0 (long expired) for a file that has none."""
    heartbeat = doc.get("heartbeat")
    return float(heartbeat) if isinstance(heartbeat, (int, float)) else 0.0


def holder_of(doc: dict) -> dict:
    holder = doc.get("holder")
    return holder if isinstance(holder, dict) else {}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def free_reason(doc: dict | None, *, ttl_s: float, now: float) -> str | None:
    """Why the lock `doc` is free ('released', 'expired', ...); None when it is held."""
    if doc is None:
        return "missing or unreadable"
    if doc.get("released"):
        return "released"
    if now - heartbeat_of(doc) > ttl_s:
        return "expired"
    holder = holder_of(doc)
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not process_alive(pid):
        return "holder is dead"
    return None


def held_message(output: Location, doc: dict | None, *, ttl_s: float, now: float) -> str:
    if doc is None:  # the winner of a race whose file we could not read back
        return f"{output.uri} was locked by another job at the same moment"
    age = now - heartbeat_of(doc)
    return (
        f"{output.uri} is locked by {describe(holder_of(doc))}, heartbeat {age:.0f} s ago; "
        f"it expires after {ttl_s:g} s without one"
    )


def lock_settings(ttl_s: float | None, heartbeat_s: float | None) -> tuple[float, float]:
    """(ttl_s, heartbeat_s) with their defaults: the ttl from LAMINA_LOCK_TTL_S, else 120 s,
    and a heartbeat four times per ttl, so that one or two late heartbeats do not lose it."""
    if ttl_s is None:
        value = os.environ.get(TTL_VARIABLE, str(DEFAULT_TTL_S))
        try:
            ttl_s = float(value)
        except ValueError:
            raise ValueError(f"{TTL_VARIABLE}={value!r} is not a number of seconds") from None
    if heartbeat_s is None:
        heartbeat_s = ttl_s / 4
    if not 0 < heartbeat_s < ttl_s:
        raise ValueError(f"lock heartbeat ({heartbeat_s} s) must be positive and under its ttl ({ttl_s} s)")
    return ttl_s, heartbeat_s


class Lease:
    """A held lock: renewed by a daemon thread every `heartbeat_s` until `release()`.

    Work done under the lease should call `check()` before each step that writes (a block,
    a publish): it raises LockLostError once another job has taken the lock over."""

    def __init__(self, *, location: Location, generation: int, holder: dict, ttl_s: float, heartbeat_s: float):
        self.location = location
        self.generation = generation
        self.holder = holder
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.last_heartbeat = float(holder["started"])
        self.released = False
        self.lost: str | None = None  # why the lease is lost, once it is
        self.error: Exception | None = None  # why the latest refresh failed, if it did
        self._mutex = threading.Lock()  # one writer of our file at a time: refresh or release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Lease({self.location.uri}, generation {self.generation}, {describe(self.holder)})"

    def doc(self, *, heartbeat: float, released: bool = False) -> dict:
        return {"generation": self.generation, "holder": self.holder, "heartbeat": heartbeat, "released": released}

    def _taken_over(self) -> str | None:
        """Who holds a higher generation, if anyone: then this lease is lost."""
        newest = latest_generation(self.location)
        if newest <= self.generation:
            return None
        holder = holder_of(read_lock(self.location, newest) or {})
        return f"{self.location.uri}: lock taken over by {describe(holder)} (generation {newest})"

    def _mark_lost(self, why: str) -> LockLostError:
        self.lost = f"{why}; this lease (generation {self.generation}, {describe(self.holder)}) is lost"
        self._stop.set()
        return LockLostError(self.lost)

    def refresh(self) -> None:
        """Write a new heartbeat, after making sure no other job has taken the lock over."""
        with self._mutex:
            if self.lost:
                raise LockLostError(self.lost)
            if self.released:
                return
            why = self._taken_over()
            if why:
                raise self._mark_lost(why)
            now = time.time()
            put_json(self.location, lock_name(self.generation), self.doc(heartbeat=now))
            self.last_heartbeat = now
            self.error = None

    def check(self) -> None:
        """Raise LockLostError if the lock was taken over or released, or if no heartbeat could
        be written for longer than ttl_s (another job may have taken the lock meanwhile).
        Costs one listing of the control folder."""
        if self.lost:
            raise LockLostError(self.lost)
        if self.released:
            raise LockLostError(f"{self.location.uri}: lock generation {self.generation} was released")
        silent = time.time() - self.last_heartbeat
        if silent > self.ttl_s:  # before listing: the store may be the reason
            raise LockLostError(
                f"{self.location.uri}: no heartbeat written for {silent:.0f} s (ttl {self.ttl_s:g} s); "
                f"last error: {self.error}"
            )
        why = self._taken_over()
        if why:
            with self._mutex:
                raise self._mark_lost(why)

    def release(self) -> None:
        """Stop the heartbeat and mark the lock released, so the next job need not wait for
        the ttl. A lost lease is left alone, a stopped one too (its holder removed the
        control folder); a store that fails here only logs a warning."""
        self._stop.set()
        with self._mutex:
            stopped, self.released = self.released, True
            if not self.lost and not stopped:
                try:
                    put_json(self.location, lock_name(self.generation), self.doc(heartbeat=time.time(), released=True))
                except (StorageError, OSError) as e:
                    log.warning("%s: could not release lock generation %d: %s", self.location.uri, self.generation, e)
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s)

    def stop(self) -> None:
        """Stop the heartbeat and write nothing more: for the holder that is about to remove
        the control folder itself (publishing), where a late heartbeat would recreate it."""
        self._stop.set()
        with self._mutex:
            self.released = True
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat_s)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lamina-lock-{self.generation}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """The heartbeat thread: refresh until released or lost; failures are recorded for check()."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except LockLostError as e:
                log.warning("%s", e)
                return
            except (StorageError, OSError) as e:  # the store may come back before the ttl runs out
                self.error = e
                log.warning("%s: lock heartbeat failed: %s", self.location.uri, e)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def acquire(
    output: Location, *, what: str = "run", ttl_s: float | None = None, heartbeat_s: float | None = None
) -> Lease:
    """Take the output's lock, or raise LockHeldError naming its holder.

    `what` names the job in the holder's record ('release', 'quantize'); ttl_s is how long
    a lock may go without a heartbeat before it is taken over (env LAMINA_LOCK_TTL_S, else
    120 s); heartbeat_s how often the returned lease renews it (ttl_s / 4)."""
    ttl_s, heartbeat_s = lock_settings(ttl_s, heartbeat_s)
    current = latest_generation(output)
    doc = read_lock(output, current) if current else None
    now = time.time()
    reason = free_reason(doc, ttl_s=ttl_s, now=now)
    if reason is None:
        raise LockHeldError(held_message(output, doc, ttl_s=ttl_s, now=now))
    holder = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "what": what, "started": now}
    lease = Lease(location=output, generation=current + 1, holder=holder, ttl_s=ttl_s, heartbeat_s=heartbeat_s)
    try:
        put_json(output, lock_name(lease.generation), lease.doc(heartbeat=now), exclusive=True)
    except FileExistsError:
        winner = read_lock(output, lease.generation)
        raise LockHeldError(held_message(output, winner, ttl_s=ttl_s, now=time.time())) from None
    if current:
        log.info("%s: lock generation %d taken (previous one %s)", output.uri, lease.generation, reason)
    lease.start_heartbeat()
    return lease
