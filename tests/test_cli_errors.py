"""Bad input through the real CLI: one line on stderr naming the problem, exit code 2,
before any expensive work, and nothing written to the output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import recipe_doc


def run_quantize(tmp_path: Path, doc: dict) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # any attempt to reach Ray would fail loudly
    cmd = [sys.executable, "-m", "pipeline.cli", "-q", "quantize", str(recipe)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("lamina: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_unknown_recipe_key(tmp_path) -> None:
    done = run_quantize(tmp_path, recipe_doc(tmp_path, calibration={"smaples": 8}))
    assert_one_line_error(done, "calibration.smaples", "unknown key")
    assert not (tmp_path / "artifact").exists()


def test_missing_model_path(tmp_path) -> None:
    done = run_quantize(tmp_path, recipe_doc(tmp_path, model=str(tmp_path / "no-such-model")))
    assert_one_line_error(done, "model source not found", "no-such-model")
    assert not (tmp_path / "artifact").exists()


def test_truncated_safetensors_shard(tmp_path, model_dir) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).symlink_to(f)
    victim = "model-00004-of-00010.safetensors"
    (broken / victim).unlink()
    (broken / victim).write_bytes((model_dir / victim).read_bytes()[:-4096])
    done = run_quantize(tmp_path, recipe_doc(tmp_path, model=str(broken)))
    assert_one_line_error(done, victim, "truncated")
    assert not (tmp_path / "artifact").exists()


def test_group_size_that_does_not_divide_the_inputs(tmp_path) -> None:
    done = run_quantize(tmp_path, recipe_doc(tmp_path, scheme={"group_size": 128}))
    assert_one_line_error(done, "group_size 128 does not divide", "self_attn.q_proj (576)")
    assert not (tmp_path / "artifact").exists()


def test_too_little_calibration_text(tmp_path) -> None:
    text = tmp_path / "tiny.txt"
    text.write_text("Only a few words of calibration text. " * 20)
    done = run_quantize(tmp_path, recipe_doc(tmp_path, calibration={"source": str(text), "glob": "*"}))
    assert_one_line_error(done, "calibration", "32768 are needed")
    assert not (tmp_path / "artifact").exists()


@pytest.mark.parametrize("bad", ["output:\n  - not: a recipe\n", "model: [unclosed\n"])
def test_malformed_yaml(tmp_path, bad: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(bad)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "quantize", str(recipe)], capture_output=True, text=True, timeout=300
    )
    assert_one_line_error(done, "recipe.yaml")
