"""Atomic publish without rename: claim, staging, manifest created last by one writer only.
The same suite runs on file://, memory:// and S3 (loopback)."""

from __future__ import annotations

import threading

import pytest

from storage import StorageError
from storage.fs import open_location
from storage.manifest import read_manifest, verify
from storage.staging import CONTROL, claim, publish, staging
from storage.writer import put_bytes


def stage_files(store: str, run_id: str) -> list:
    stage = staging(open_location(store), run_id)
    return [put_bytes(stage, "model-00001-of-00001.safetensors", b"w" * 1000), put_bytes(stage, "config.json", b"{}")]


@pytest.fixture
def staged(store: str) -> tuple:
    """An output claimed by one run, with that run's files staged: (output, run_id, files)."""
    output = open_location(store)
    run_id = claim(output, recipe_hash="r", fingerprint="f")
    return output, run_id, stage_files(store, run_id)


def test_claim_refuses_another_recipe_and_lets_the_same_one_resume(store: str) -> None:
    output = open_location(store)
    run_id = claim(output, recipe_hash="r1", fingerprint="f")
    assert claim(output, recipe_hash="r1", fingerprint="f") == run_id
    with pytest.raises(StorageError, match=f"claimed by run {run_id} of another recipe"):
        claim(output, recipe_hash="r2", fingerprint="f")
    with pytest.raises(StorageError, match="claimed by run"):
        claim(output, recipe_hash="r1", fingerprint="other source")


def test_nothing_is_visible_before_the_manifest_and_staging_is_gone_after(store: str, staged: tuple) -> None:
    output, run_id, files = staged
    with pytest.raises(StorageError, match="not a published artifact"):
        read_manifest(store)
    publish(output, run_id, files, recipe={})
    assert verify(store) == []
    assert output.list_files() == ["config.json", "lamina.json", "model-00001-of-00001.safetensors"]
    assert not output.exists(CONTROL)
    with pytest.raises(StorageError, match="already holds a published artifact"):
        claim(output, recipe_hash="r", fingerprint="f")


def test_a_second_publish_of_the_same_version_fails_clearly(store: str, staged: tuple) -> None:
    output, run_id, files = staged
    publish(output, run_id, files, recipe={}, winner=1)
    stage_files(store, run_id)
    with pytest.raises(StorageError, match="published by another run first"):
        publish(output, run_id, files, recipe={}, winner=2)
    assert read_manifest(store)["winner"] == 1 and verify(store) == []


@pytest.mark.parametrize("store", ["file", "s3", "gs"], indirect=True)
def test_two_concurrent_publishers_end_with_exactly_one_version(store: str, staged: tuple) -> None:
    output, run_id, files = staged
    barrier, outcomes = threading.Barrier(2), []

    def publisher(n: int) -> None:
        barrier.wait()
        try:
            publish(output, run_id, files, recipe={}, winner=n)
            outcomes.append(("won", n))
        except (StorageError, FileNotFoundError) as e:
            outcomes.append(("lost", str(e)))

    threads = [threading.Thread(target=publisher, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [n for kind, n in outcomes if kind == "won"]
    assert len(won) == 1, outcomes
    assert read_manifest(store)["winner"] == won[0] and verify(store) == []


def test_an_exclusive_local_create_has_exactly_one_winner_under_a_race(tmp_path) -> None:
    """fsspec's local create checks and then writes; racing creators must not both win
    (that race once let two publishers each think they had published)."""
    location, rounds = open_location(str(tmp_path)), 60
    for r in range(rounds):
        barrier, won, lost = threading.Barrier(4), [], []

        def create(n: int, name: str = f"f{r}", barrier=barrier, won=won, lost=lost) -> None:
            barrier.wait()
            try:
                location.write_bytes(name, b"x" * 4096 + bytes([n]), exclusive=True)
                won.append(n)
            except FileExistsError:
                lost.append(n)

        threads = [threading.Thread(target=create, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == 3, (r, won, lost)
        assert location.read_bytes(f"f{r}") == b"x" * 4096 + bytes([won[0]])
    assert location.list_files() == sorted(f"f{r}" for r in range(rounds))
