"""The safetensors range reader and the manifest, on local files and memory://."""

from __future__ import annotations

import json
import re
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
from storage.writer import FileRecord, put_bytes


def test_range_reads_equal_the_whole_file_load(model_dir) -> None:
    checkpoint = Checkpoint(str(model_dir))
    name = "model.layers.7.mlp.down_proj.weight"
    file = checkpoint.weight_map[name]
    got = checkpoint.read([name, "model.layers.7.input_layernorm.weight"])
    whole = load_file(model_dir / file)
    assert torch.equal(got[name], whole[name])
    assert got[name].shape == (576, 1536)


def test_written_tensors_read_back_by_range(store: str) -> None:
    location = open_location(store)
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


def raw_safetensors(header: dict, data_bytes: int) -> bytes:
    doc = json.dumps(header).encode()
    return struct.pack("<Q", len(doc)) + doc + bytes(data_bytes)


@pytest.mark.parametrize(
    ("header", "data_bytes", "complaint"),
    [
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            24,
            "tensor 'b' overlaps the tensor before it",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
            },
            24,
            "tensor 'b' leaves a gap before it",
        ),
        ({"../../w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, "unsafe tensor name '../../w'"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, 8, "malformed header entry"),
    ],
    ids=["overlap", "gap", "traversal", "extra-field"],
)
def test_headers_that_lie_are_refused(tmp_path, header: dict, data_bytes: int, complaint: str) -> None:
    location = open_location(str(tmp_path))
    location.write_bytes("bad.safetensors", raw_safetensors(header, data_bytes))
    with pytest.raises(StorageError, match=re.escape(complaint)):
        read_header(location, "bad.safetensors")


def test_file_cut_inside_its_header_is_refused(tmp_path) -> None:
    location = open_location(str(tmp_path))
    data = save({"w": torch.randn(8, 8)})
    location.write_bytes("cut.safetensors", data[:20])
    with pytest.raises(StorageError, match="truncated or corrupt safetensors header"):
        read_header(location, "cut.safetensors")


def test_missing_shard_is_named(tmp_path, model_dir) -> None:
    shutil.copytree(model_dir, tmp_path / "m")
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(StorageError, match=f"missing file {shard.name}"):
        Checkpoint(str(tmp_path / "m"))


def test_manifest_naming_a_file_outside_the_artifact_is_refused(tmp_path) -> None:
    (tmp_path / "secret.txt").write_text("not yours")
    location = open_location(str(tmp_path / "artifact"))
    write_manifest(location, [FileRecord(name="../secret.txt", sha256="0" * 64, size=9)], recipe={})
    with pytest.raises(StorageError, match=r"refusing unsafe file name '\.\./secret\.txt'"):
        verify(str(tmp_path / "artifact"))


def test_index_with_path_traversal_is_refused(tmp_path, model_dir) -> None:
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    index = {"weight_map": {"w": "../../etc/passwd"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(StorageError, match="unsafe file name"):
        Checkpoint(str(tmp_path))


def test_missing_source_names_the_path(tmp_path) -> None:
    with pytest.raises(StorageError, match="model source not found"):
        Checkpoint(str(tmp_path / "nowhere"))


def test_manifest_verify_catches_corruption_and_missing_files(store: str) -> None:
    root = store
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


def test_large_file_goes_multipart_and_reads_back_by_range(store: str) -> None:
    location = open_location(store)
    data = bytes(range(256)) * (20 * 2**20 // 256)  # 20 MiB
    put_bytes(location, "big/shard.bin", data)
    assert location.size("big/shard.bin") == len(data)
    assert location.read_bytes("big/shard.bin", 12_345_678, 12_345_700) == data[12_345_678:12_345_700]
    if store.startswith("s3://"):
        assert location.fs.info(location.path("big/shard.bin"))["ETag"].strip('"').endswith("-3")  # 3 parts


def test_listing_is_recursive_sorted_and_relative(store: str) -> None:
    location = open_location(store)
    for name in ("b.txt", "a/z.txt", "a/b/c.txt"):
        location.write_bytes(name, name.encode())
    assert location.list_files() == ["a/b/c.txt", "a/z.txt", "b.txt"]
    assert location.exists("a/z.txt") and not location.exists("a/y.txt")


def test_reading_one_block_from_s3_fetches_only_that_block(s3_endpoint: str, model_dir) -> None:
    uri = f"{s3_endpoint}/models/{uuid.uuid4().hex}"
    open_location(uri).fs.put(str(model_dir) + "/", open_location(uri).root, recursive=True)
    checkpoint = Checkpoint(uri)
    names = checkpoint.names("model.layers.5.")
    checkpoint.location.traffic.clear()
    tensors = checkpoint.read(names)
    fetched = checkpoint.location.traffic["bytes_read"]
    assert fetched == sum(t.numel() * t.element_size() for t in tensors.values())
    shard = checkpoint.weight_map[names[0]]
    assert fetched < checkpoint.location.size(shard) / 2.5  # its shard holds about three blocks
    assert torch.equal(
        tensors["model.layers.5.mlp.up_proj.weight"], load_file(model_dir / shard)["model.layers.5.mlp.up_proj.weight"]
    )
