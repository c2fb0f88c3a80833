"""Shared fixtures: the real model and text (fetched by `make fixtures`), and one local Ray
cluster per test session, kept on loopback and in its own temp folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("LAMINA_FIXTURES", ROOT / ".cache" / "fixtures"))
MODEL = FIXTURES / "smollm2-135m"
DOCS = FIXTURES / "python-docs"

# Ray reads these at start-up: bind to 127.0.0.1, write under our own folder, no telemetry.
_RAY_TMP = tempfile.mkdtemp(prefix="lamina-ray-", dir="/tmp")
os.environ.setdefault("RAY_TMPDIR", _RAY_TMP)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (MODEL / "model.safetensors.index.json").exists() or not (DOCS / "tutorial").is_dir():
        raise pytest.UsageError(f"fixtures missing under {FIXTURES}: run `make fixtures` first")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL


@pytest.fixture(scope="session")
def docs_dir() -> Path:
    return DOCS


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs, like the machine); stopped at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(_RAY_TMP, ignore_errors=True)


def recipe_doc(tmp: Path, **overrides: dict) -> dict:
    """The reference-protocol recipe of shared/FIXTURES.md, writing under tmp."""
    doc = {
        "model": str(MODEL),
        "output": str(tmp / "artifact"),
        "calibration": {"source": str(DOCS / "library"), "glob": "*.rst.txt", "samples": 64, "seq_len": 512},
        "scheme": {"algorithm": "gptq", "bits": 4, "group_size": 64, "sym": True},
        "eval": {"source": str(DOCS / "tutorial"), "glob": "*.rst.txt", "tokens": 16384, "window": 1024},
        "resources": {"workers": 2, "cpus_per_worker": 1},
    }
    for key, value in overrides.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    return doc
