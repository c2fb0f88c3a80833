"""The output lease lock (storage/lock.py) on every backend: one holder at a time, a
released, expired or dead holder taken over, a race won by exactly one job, a lease kept
alive by its heartbeat and told when it was superseded."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import fsspec
import pytest

import storage.fs
from storage.fs import Location, open_location
from storage.lock import Lease, LockHeldError, LockLostError, acquire, lock_name


def write_lock(output: Location, generation: int, *, host: str, pid: int, heartbeat: float) -> None:
    """A lock file as another job would have left it."""
    holder = {"id": "f" * 32, "host": host, "pid": pid, "what": "release", "started": heartbeat}
    doc = {"generation": generation, "holder": holder, "heartbeat": heartbeat, "released": False}
    output.write_bytes(lock_name(generation), json.dumps(doc).encode(), exclusive=True)


def read_lock_file(output: Location, generation: int) -> dict:
    return json.loads(output.read_bytes(lock_name(generation)))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    return int(done.stdout)


def test_a_held_lock_is_refused_naming_its_holder_until_released(store: str) -> None:
    output = open_location(store)
    with acquire(output, what="release", ttl_s=30) as lease:
        assert lease.generation == 1
        with pytest.raises(LockHeldError) as refused:
            acquire(output, what="quantize", ttl_s=30)
        message = str(refused.value)
        assert "\n" not in message
        assert f"{output.uri} is locked by release on {socket.gethostname()} (pid {os.getpid()})" in message
        assert "expires after 30 s" in message
        lease.check()
    assert read_lock_file(output, 1)["released"] is True
    with acquire(output, ttl_s=30) as second:
        assert second.generation == 2
        assert read_lock_file(output, 2)["holder"]["id"] == second.holder["id"] != lease.holder["id"]


def test_a_lock_without_a_heartbeat_for_its_ttl_is_taken_over(store: str) -> None:
    output = open_location(store)
    write_lock(output, 1, host="host-elsewhere", pid=123, heartbeat=time.time() - 30)
    with pytest.raises(LockHeldError, match=r"locked by release on host-elsewhere \(pid 123\), heartbeat 30 s ago"):
        acquire(output, ttl_s=60)
    with acquire(output, ttl_s=10) as lease:
        assert lease.generation == 2
    assert read_lock_file(output, 1)["holder"]["host"] == "host-elsewhere"  # the old file is left as it was


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(store: str) -> None:
    output = open_location(store)
    write_lock(output, 1, host=socket.gethostname(), pid=os.getppid(), heartbeat=time.time())
    with pytest.raises(LockHeldError, match=f"pid {os.getppid()}"):
        acquire(output, ttl_s=3600)  # a live process of this host holds it
    write_lock(output, 2, host=socket.gethostname(), pid=dead_pid(), heartbeat=time.time())
    with acquire(output, ttl_s=3600) as lease:
        assert lease.generation == 3


def race(output: Location, contenders: int) -> tuple[list[Lease], list[LockHeldError]]:
    """`contenders` threads acquire the output at the same moment."""
    start = threading.Barrier(contenders)
    won: list[Lease] = []
    refused: list[LockHeldError] = []

    def contend() -> None:
        start.wait()
        try:
            won.append(acquire(output, ttl_s=30))
        except LockHeldError as e:
            refused.append(e)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


def test_of_jobs_racing_for_a_lock_exactly_one_wins(store: str) -> None:
    rounds = 10 if store.startswith(("memory://", "/")) else 3
    for round_ in range(rounds):
        output = open_location(f"{store}/{round_}")
        for generation in (1, 2):  # a fresh output, then one whose lock was just released
            won, refused = race(output, 4)
            assert len(won) == 1 and len(refused) == 3, (round_, generation, won, refused)
            assert won[0].generation == generation
            assert all("is locked by run on" in str(e) for e in refused)
            won[0].release()


def test_the_heartbeat_keeps_a_lease_past_its_ttl(store: str) -> None:
    output = open_location(store)
    with acquire(output, ttl_s=0.6, heartbeat_s=0.1) as lease:
        time.sleep(1.0)
        with pytest.raises(LockHeldError):
            acquire(output, ttl_s=0.6)
        lease.check()
        assert read_lock_file(output, 1)["heartbeat"] > time.time() - 0.6


def test_a_superseded_lease_is_lost(store: str) -> None:
    output = open_location(store)
    lease = acquire(output, ttl_s=0.6, heartbeat_s=0.1)
    write_lock(output, 2, host="host-b", pid=5, heartbeat=time.time())
    deadline = time.time() + 5
    while lease.lost is None and time.time() < deadline:  # the heartbeat thread finds out
        time.sleep(0.05)
    with pytest.raises(LockLostError, match=r"taken over by release on host-b \(pid 5\) \(generation 2\)"):
        lease.check()
    with pytest.raises(LockLostError):
        lease.refresh()
    lease.release()
    assert read_lock_file(output, 1)["released"] is False  # a lost lease writes nothing more
    assert read_lock_file(output, 2)["holder"]["host"] == "host-b"


def test_check_finds_a_superseded_lease_before_its_heartbeat_does(tmp_path) -> None:
    output = open_location(str(tmp_path))
    with acquire(output, ttl_s=60) as lease:
        write_lock(output, 2, host="host-b", pid=5, heartbeat=time.time())
        with pytest.raises(LockLostError, match="host-b"):
            lease.check()
        assert lease.lost


def test_a_store_that_goes_away_is_reported_by_check_and_not_by_release(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(storage.fs, "BACKOFF_SECONDS", 0.001)
    output = open_location(str(tmp_path))
    lease = acquire(output, ttl_s=0.5, heartbeat_s=0.1)
    gone = fsspec.filesystem("faulty", target_protocol="file", fail_after=0, skip_instance_cache=True)
    lease.location = Location(fs=gone, root=output.root, uri=f"faulty::{output.uri}")
    time.sleep(0.8)
    assert lease.error is not None
    with pytest.raises(LockLostError, match=r"no heartbeat written for .* store unreachable"):
        lease.check()
    with caplog.at_level(logging.WARNING, logger="storage.lock"):
        lease.release()
    assert "could not release lock generation 1" in caplog.text


def test_ttl_comes_from_the_environment_and_the_heartbeat_from_the_ttl(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LAMINA_LOCK_TTL_S", "40")
    output = open_location(str(tmp_path))
    with acquire(output) as lease:
        assert (lease.ttl_s, lease.heartbeat_s) == (40, 10)
    with pytest.raises(ValueError, match="under its ttl"):
        acquire(output, ttl_s=1, heartbeat_s=1)


def test_a_stopped_lease_writes_nothing_more(tmp_path) -> None:
    """Publishing removes the control folder with the lock in it: after stop(), neither the
    heartbeat nor release() may write the lock file back."""
    output = open_location(str(tmp_path / "out"))
    lease = acquire(output, what="release", ttl_s=0.6, heartbeat_s=0.05)
    lease.stop()
    output.remove(".lamina")
    time.sleep(0.2)
    lease.release()
    assert not output.exists(".lamina")
