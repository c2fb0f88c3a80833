"""Shared fixtures: the real model and text (fetched by `make fixtures`), and one local Ray
cluster per test session, kept on loopback and in its own temp folder."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from types import ModuleType

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

# Without a GPU, Triton's kernels run only interpreted, and the flag must be set before
# triton is imported (the Ray workers inherit it too).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (MODEL / "model.safetensors.index.json").exists() or not (DOCS / "tutorial").is_dir():
        raise pytest.UsageError(f"fixtures missing under {FIXTURES}: run `make fixtures` first")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return MODEL


@pytest.fixture(scope="session")
def docs_dir() -> Path:
    return DOCS


S3_BUCKET = "lamina-test"
GS_BUCKET = "lamina-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback (moto's server), reached through the standard
    AWS variables, so the driver and the Ray workers find it the way users' code finds S3."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    from storage.fs import open_location

    open_location(f"s3://{S3_BUCKET}").fs.mkdir(S3_BUCKET)
    yield f"s3://{S3_BUCKET}"
    server.stop()


def _honour_create_preconditions(objects: ModuleType) -> Callable:
    """The GCS emulator ignores `ifGenerationMatch=0` (create only if absent), which real
    GCS honours with 412 and gcsfs sends for `mode="create"`; teach its upload handler
    that one precondition, server side, so the publish protocol is tested as it runs."""
    upload = objects.insert

    def insert(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch") == ["0"]:
            data = request.data if isinstance(request.data, dict) else {}
            meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
            name = (request.query.get("name") or [meta.get("name")])[0]
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            except objects.NotFound:
                pass
        return upload(request, response, storage, *args, **kwargs)

    return insert


@pytest.fixture(scope="session")
def gs_endpoint():
    """A GCS JSON API endpoint on loopback (gcp-storage-emulator, in memory), reached
    through STORAGE_EMULATOR_HOST the way gcsfs finds an emulator."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    patched = _honour_create_preconditions(objects)
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            if handler is objects.insert:
                handlers[method] = patched
    objects.insert = patched
    for name in ("gcsfs", "gcp_storage_emulator", "google"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=GS_BUCKET)
    emulator.start()
    os.environ.update(STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", NO_GCE_CHECK="True")
    yield f"gs://{GS_BUCKET}"
    emulator.stop()


@pytest.fixture(params=["file", "memory", "s3", "gs"])
def store(request, tmp_path) -> str:
    """A fresh folder URI on each storage backend: one suite runs on all of them."""
    if request.param == "file":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://lamina-test/{uuid.uuid4().hex}"
    return f"{request.getfixturevalue(request.param + '_endpoint')}/{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint):
    """One local Ray for the whole session (2 CPUs, like the machine); stopped at the end.
    It starts after the S3 endpoint so that its workers inherit the endpoint's variables."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(_RAY_TMP, ignore_errors=True)


SMALL_BLOCKS = 4


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """The fixture model cut to its first SMALL_BLOCKS blocks: the distributed machinery
    (worker counts, resume, lost nodes, job submission) runs on it in seconds."""
    from scripts.resize_model import resize_model

    return resize_model(MODEL, tmp_path_factory.mktemp("small-model"), SMALL_BLOCKS)


def small_recipe_doc(tmp: Path, small: Path, **overrides: dict) -> dict:
    """A quick recipe for the small model: 8 calibration sequences of 128 tokens in 8 chunks
    (so that 1, 2 and 3 workers own different shares), 4-bit g64 GPTQ, the 1536-row
    gate/up projections solved as 3 row ranges each."""
    doc = recipe_doc(
        tmp,
        model=str(small),
        calibration={"samples": 8, "seq_len": 128, "chunk_size": 1},
        scheme={"solve_rows": 512},
    )
    doc.pop("eval")
    for key, value in overrides.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    return doc


@pytest.fixture(scope="session")
def small_reference(tmp_path_factory, ray_cluster, small_model):
    """The small recipe on one worker: what every other worker count, store and failure
    must reproduce byte for byte."""
    from pipeline.driver import quantize
    from pipeline.recipe import parse

    doc = small_recipe_doc(tmp_path_factory.mktemp("small-reference"), small_model, resources={"workers": 1})
    return quantize(parse(doc), progress=False)


def recipe_doc(tmp: Path, **overrides: dict) -> dict:
    """The reference-protocol recipe of shared/FIXTURES.md, writing under tmp."""
    doc = {
        "model": str(MODEL),
        "output": str(tmp / "artifact"),
        "calibration": {"source": str(DOCS / "library"), "glob": "*.rst.txt", "samples": 64, "seq_len": 512},
        "scheme": {"algorithm": "gptq", "bits": 4, "group_size": 64, "sym": True},
        # the protocol's one context (a long_window of 8192 would add minutes per eval here)
        "eval": {
            "source": str(DOCS / "tutorial"),
            "glob": "*.rst.txt",
            "tokens": 16384,
            "window": 1024,
            "long_window": 1024,
        },
        "resources": {"workers": 2, "cpus_per_worker": 1},
    }
    for key, value in overrides.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    return doc
