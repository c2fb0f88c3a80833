"""Flaky stores (storage/faults.py wraps file://, memory:// and S3): every call retried,
every torn transfer caught; a store that goes away fails a run clearly and publishes
nothing. Storage options from the recipe, with credentials only by reference."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import yaml

import storage.fs
from pipeline.cli import main
from pipeline.errors import LaminaError
from pipeline.recipe import parse
from storage import StorageError
from storage.fs import open_location
from storage.manifest import MANIFEST
from storage.options import configure
from storage.staging import CONTROL
from tests.conftest import SMALL_BLOCKS, small_recipe_doc


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(storage.fs, "BACKOFF_SECONDS", 0.001)
    logging.getLogger("storage.fs").setLevel(logging.ERROR)
    yield
    configure({})


def faulty(store: str) -> str:
    return f"faulty::{store if '://' in store else 'file://' + store}"


def test_every_transfer_on_a_flaky_store_comes_back_whole(store: str) -> None:
    uri = faulty(store)
    configure({"faulty::": {"fail_rate": 0.1, "truncate_rate": 0.1, "seed": 2, "per_process": False}})
    location = open_location(uri)
    # letters: the GCS emulator drops a trailing CR byte of an upload (lamina's size check
    # caught that; it is the emulator's multipart parsing, not GCS)
    payloads = {f"d/{i}.bin": bytes([65 + i]) * (1000 + 37 * i) for i in range(30)}
    for name, data in payloads.items():
        location.write_bytes(name, data)
    location.write_bytes("claim.json", b"{}", exclusive=True)
    with pytest.raises(FileExistsError):
        location.write_bytes("claim.json", b'{"other": 1}', exclusive=True)
    location.copy("d/7.bin", "e/7.bin", len(payloads["d/7.bin"]))
    plain = open_location(store)  # the bytes as stored, read without faults
    for name, data in payloads.items():
        assert plain.read_bytes(name) == data
        assert location.read_bytes(name, 100, 900) == data[100:900]
    assert plain.read_bytes("e/7.bin") == payloads["d/7.bin"]
    assert location.fs.injected["failures"] > 5 and location.fs.injected["truncations"] > 5, location.fs.injected
    assert location.traffic["retries"] >= location.fs.injected["failures"] // 2  # the ones raised before the call


def test_retries_are_bounded_and_name_the_call(tmp_path) -> None:
    configure({"faulty::": {"fail_after": 0}})
    location = open_location(faulty(str(tmp_path)))
    with pytest.raises(StorageError, match=r"write a\.bin failed after 8 attempts: injected fault: store unreachable"):
        location.write_bytes("a.bin", b"x")
    assert not (tmp_path / "a.bin").exists()


def test_missing_files_are_not_retried(tmp_path) -> None:
    location = open_location(str(tmp_path))
    with pytest.raises(StorageError, match=r"missing file nope\.bin"):
        location.read_bytes("nope.bin")
    assert location.traffic["retries"] == 0


def test_a_store_that_goes_away_fails_the_run_clearly_and_publishes_nothing(
    tmp_path, ray_cluster, small_model, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("LAMINA_LOCK_TTL_S", "3600")  # no lock heartbeat in the run: the count of calls is fixed
    output = tmp_path / "artifact"
    # the driver's 36th storage call fails and so does every one after it: the lock, the
    # claim, the journal, the event log and the first block go through, then the store is gone
    doc = small_recipe_doc(
        tmp_path,
        small_model,
        output=f"faulty::file://{output}",
        storage={f"faulty::file://{output}": {"fail_after": 35}},
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["-q", "quantize", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lamina: error: ") and "\n" not in err
    assert "failed after 8 attempts: injected fault: store unreachable" in err
    left = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    assert MANIFEST not in left and not any(not f.startswith(CONTROL) for f in left)  # nothing published
    # the finished block is kept, and journaled with its hash for a resume
    (shard,) = [f for f in left if f.startswith(f"{CONTROL}/staging/") and f.endswith("-00001-of-00005.safetensors")]
    (entry,) = [f for f in left if f.startswith(f"{CONTROL}/journal/") and f.endswith("block-00000.json")]
    journaled = json.loads((output / entry).read_text())
    assert journaled["block"] == 0 and journaled["file"]["name"] == "model-00001-of-00005.safetensors"
    assert journaled["file"]["sha256"] == hashlib.sha256((output / shard).read_bytes()).hexdigest()
    assert "model.layers.0.mlp.down_proj.qweight" in journaled["tensors"]
    done = sum(f.startswith(f"{CONTROL}/journal/") and f.endswith(".json") for f in left) - 1  # less run.json
    assert main(["status", str(output)]) == 0
    assert f"not published; {done} of {SMALL_BLOCKS} blocks journaled" in capsys.readouterr().out


def test_recipe_refuses_literal_credentials() -> None:
    doc = recipe_doc_for_storage({"s3://models": {"key": "AKIA123", "secret": "${env:S}", "endpoint_url": "http://x"}})
    with pytest.raises(
        LaminaError, match=r"storage: Value error, s3://models: key must be an \$\{env:NAME\} reference"
    ):
        parse(doc)
    with pytest.raises(LaminaError, match="is not a URI prefix"):
        parse(recipe_doc_for_storage({"models": {}}))


def recipe_doc_for_storage(storage: dict) -> dict:
    return {"model": "m", "output": "o", "storage": storage}


def test_storage_options_reach_the_filesystem_by_reference(s3_endpoint, monkeypatch) -> None:
    monkeypatch.setenv("LAMINA_TEST_KEY", "testing-key")
    monkeypatch.setenv("LAMINA_TEST_SECRET", "testing-secret")
    prefix = f"{s3_endpoint}/by-options"
    section = {prefix: {"key": "${env:LAMINA_TEST_KEY}", "secret": "${env:LAMINA_TEST_SECRET}"}}
    recipe = parse({"model": "m", "output": "o", "storage": section})
    assert recipe.model_dump()["storage"][prefix]["secret"] == "${env:LAMINA_TEST_SECRET}"  # what manifests keep
    assert recipe.hash() == parse({"model": "m", "output": "o"}).hash()
    configure(recipe.storage)
    location = open_location(f"{prefix}/x")
    assert (location.fs.key, location.fs.secret) == ("testing-key", "testing-secret")
    location.write_bytes("a.bin", b"hello")
    assert location.read_bytes("a.bin") == b"hello"
    assert open_location(f"{s3_endpoint}/elsewhere").fs.key is None  # other prefixes: the standard chain
    monkeypatch.delenv("LAMINA_TEST_SECRET")
    with pytest.raises(StorageError, match="environment variable LAMINA_TEST_SECRET is not set"):
        configure(recipe.storage)


def test_a_worker_that_cannot_reach_storage_is_one_clear_line(ray_cluster, tmp_path, model_dir) -> None:
    from pipeline import cluster
    from pipeline.architectures import layout_for
    from pipeline.recipe import Resources
    from storage.checkpoint import Checkpoint

    layout = layout_for(Checkpoint(str(model_dir)).config)
    pool = cluster.start_runners(ray_cluster, Resources(workers=1), model_uri=str(tmp_path / "gone"), layout=layout)
    try:
        with pytest.raises(StorageError, match=r"^a worker could not start: model source not found: .*gone$"):
            cluster.get(ray_cluster, pool.runners[0].forward.remote())
    finally:
        pool.release()


def test_large_range_reads_come_in_parts_and_retry_only_the_parts_that_failed(store: str, monkeypatch) -> None:
    monkeypatch.setattr(storage.fs, "READ_PART_BYTES", 3920)
    monkeypatch.setattr(storage.fs, "READ_STREAMS", 25)
    data = bytes(range(251)) * 400  # 100,400 bytes: 25 parts of the range below
    open_location(store).write_bytes("big.bin", data)
    configure({"faulty::": {"fail_rate": 0.2, "truncate_rate": 0.2, "seed": 5, "per_process": False}})
    location = open_location(faulty(store))
    # with a fifth of calls failing and a fifth short, a read of all 25 parts at once
    # would almost never succeed within 8 attempts; keeping the good parts it does
    assert location.read_range("big.bin", 1000, 99_000) == data[1000:99_000]
    assert location.fs.injected["failures"] + location.fs.injected["truncations"] >= 5
    assert location.traffic["bytes_read"] == 98_000


def test_missing_credentials_are_one_clear_line(s3_endpoint, monkeypatch, tmp_path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    configure({f"{s3_endpoint}/no-credentials": {"skip_instance_cache": True}})
    with pytest.raises(StorageError, match=r"no-credentials: read config\.json: Unable to locate credentials"):
        open_location(f"{s3_endpoint}/no-credentials").read_bytes("config.json")
