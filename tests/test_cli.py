"""The CLI in-process: verify's exit codes and messages, eval's choice of data."""

from __future__ import annotations

import argparse

import pytest

from pipeline.cli import eval_data, main
from pipeline.errors import LaminaError
from storage import StorageError
from storage.fs import open_location
from storage.manifest import write_manifest
from storage.writer import put_bytes


def test_verify_exit_codes_name_the_bad_file(tmp_path, capsys) -> None:
    location = open_location(str(tmp_path))
    write_manifest(location, [put_bytes(location, "model-00001-of-00001.safetensors", b"x" * 100)], recipe={})
    assert main(["verify", str(tmp_path)]) == 0
    location.write_bytes("model-00001-of-00001.safetensors", b"y" * 100)
    assert main(["verify", str(tmp_path)]) == 1
    assert "model-00001-of-00001.safetensors: sha256 mismatch" in capsys.readouterr().err


def test_verify_of_a_folder_without_manifest_is_a_one_line_error(tmp_path, capsys) -> None:
    assert main(["verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"lamina: error: {tmp_path}: not a published artifact (no lamina.json)"


def eval_args(**kw) -> argparse.Namespace:
    base = {"data": None, "glob": None, "tokens": None, "window": None, "long_window": None, "workers": None}
    base["kernel"] = None
    return argparse.Namespace(**{**base, **kw})


def test_eval_data_from_flags_overrides_defaults(tmp_path) -> None:
    data, resources, calibration = eval_data(
        eval_args(data="/texts", glob="*.txt", tokens=4096, workers=3), str(tmp_path)
    )
    assert (data.source, data.glob, data.tokens, data.window, data.windows) == ("/texts", "*.txt", 4096, 1024, 4)
    assert resources.workers == 3 and data.kernel == "auto" and calibration is None and data.long_window == 0
    data, _, _ = eval_data(eval_args(data="/texts", kernel="reference", long_window=2048), str(tmp_path))
    assert data.kernel == "reference" and data.long_window == 2048


def test_eval_without_data_needs_a_published_artifact(tmp_path) -> None:
    with pytest.raises(StorageError, match="not a published artifact"):
        eval_data(eval_args(), str(tmp_path))
    location = open_location(str(tmp_path))
    write_manifest(location, [], recipe={"model": "m", "output": "o"})
    with pytest.raises(LaminaError, match="names no eval data; pass --data"):
        eval_data(eval_args(), str(tmp_path))
