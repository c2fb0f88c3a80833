"""The safetensors range reader and the manifest, on local files and memory://."""

from __future__ import annotations

import json
import shutil
import struct
import uuid

import pytest
import torch
from safetensors.torch import load_file, save

from storage import StorageError
from storage.checkpoint import Checkpoint
from storage.fs import open_location
from storage.manifest import read_manifest, verify, write_manifest
from storage.safetensors_io import read_header, read_tensors
from storage.writer import put_bytes


def roots(tmp_path) -> list[str]:
    return [str(tmp_path / "local"), f"memory://lamina-test-{uuid.uuid4().hex}"]


def test_range_reads_equal_the_whole_file_load(model_dir) -> None:
    checkpoint = Checkpoint(str(model_dir))
    name = "model.layers.7.mlp.down_proj.weight"
    file = checkpoint.weight_map[name]
    got = checkpoint.read([name, "model.layers.7.input_layernorm.weight"])
    whole = load_file(model_dir / file)
    assert torch.equal(got[name], whole[name])
    assert got[name].shape == (576, 1536)


@pytest.mark.parametrize("backend", [0, 1], ids=["file", "memory"])
def test_written_tensors_read_back_by_range(tmp_path, backend: int) -> None:
    location = open_location(roots(tmp_path)[backend])
    tensors = {
        "a": torch.arange(10, dtype=torch.int32),
        "b": torch.randn(3, 4),
        "c": torch.ones(2, dtype=torch.float16),
    }
    put_bytes(location, "x.safetensors", save(tensors))
    header = read_header(location, "x.safetensors")
    got = read_tensors(location, header, ["c", "a"])
    assert set(got) == {"a", "c"} and torch.equal(got["a"], tensors["a"]) and torch.equal(got["c"], tensors["c"])


def test_truncated_file_is_refused(tmp_path) -> None:
    location = open_location(str(tmp_path))
    data = save({"w": torch.randn(64, 64)})
    put_bytes(location, "t.safetensors", data[:-100])
    with pytest.raises(StorageError, match="truncated"):
        read_header(location, "t.safetensors")


def test_header_that_lies_about_offsets_is_refused(tmp_path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    open_location(str(tmp_path)).write_bytes("lie.safetensors", struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(StorageError, match="spans 32 bytes"):
        read_header(open_location(str(tmp_path)), "lie.safetensors")


def test_index_with_path_traversal_is_refused(tmp_path, model_dir) -> None:
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    index = {"weight_map": {"w": "../../etc/passwd"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(StorageError, match="unsafe file name"):
        Checkpoint(str(tmp_path))


def test_missing_source_names_the_path(tmp_path) -> None:
    with pytest.raises(StorageError, match="model source not found"):
        Checkpoint(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("backend", [0, 1], ids=["file", "memory"])
def test_manifest_verify_catches_corruption_and_missing_files(tmp_path, backend: int) -> None:
    root = roots(tmp_path)[backend]
    location = open_location(root)
    records = [put_bytes(location, "a.bin", b"hello"), put_bytes(location, "sub/b.bin", b"world")]
    write_manifest(location, records, recipe={})
    assert read_manifest(root)["files"]["a.bin"]["size"] == 5
    assert verify(root) == []
    location.write_bytes("a.bin", b"jello")
    location.fs.rm(location.path("sub/b.bin"))
    assert verify(root) == ["a.bin: sha256 mismatch", "sub/b.bin: missing"]


def test_folder_without_manifest_is_not_an_artifact(tmp_path) -> None:
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(StorageError, match="not a published artifact"):
        read_manifest(str(tmp_path))
