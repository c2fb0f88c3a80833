"""`lamina release` on the 4-block copy of the fixture model: gates that block and gates
that pass, a second identical release that does nothing, and two releases of one version
racing on the loopback S3 endpoint."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.recipe import parse
from pipeline.release import release
from storage.fs import open_location
from storage.lock import LockHeldError
from storage.manifest import MANIFEST, read_manifest, verify
from storage.registry import list_versions
from tests.conftest import DOCS, small_recipe_doc

ROOT = Path(__file__).resolve().parents[1]
EVAL = {"source": str(DOCS / "tutorial"), "glob": "*.rst.txt", "tokens": 256, "window": 64, "long_window": 128}


def release_doc(tmp: Path, small: Path, output: str, gates: dict) -> dict:
    doc = small_recipe_doc(tmp, small, output=output)
    return {**doc, "eval": EVAL, "gates": gates}


def write_recipe(path: Path, doc: dict) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


@pytest.fixture(scope="module")
def blocked_then_published(tmp_path_factory, ray_cluster, small_model):
    """One version released with a KL gate tighter than any quantized model meets (blocked),
    then with looser gates (published: the run resumes, nothing is quantized again), then
    again (a no-op); the CLI's exit codes and output of each."""
    tmp = tmp_path_factory.mktemp("release")
    output = str(tmp / "registry" / "smollm2" / "w4g64")
    tight = write_recipe(tmp / "tight.yaml", release_doc(tmp, small_model, output, {"max_kl": 1e-6, "min_top1": 0.5}))
    loose = write_recipe(tmp / "loose.yaml", release_doc(tmp, small_model, output, {"max_kl": 10.0, "min_top1": 0.5}))
    results = []  # (exit code, the version folder's entries afterwards, stderr)
    for recipe in (tight, loose, loose):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["-q", "release", recipe])
        staged = sorted(Path(output).glob(".lamina/staging/*/eval.md"))
        kept = staged[0].read_text() if staged else ""  # the report of a blocked release, kept for inspection
        results.append((code, sorted(p.name for p in Path(output).iterdir()), err.getvalue(), kept))
    return output, results


def test_a_gate_tighter_than_measured_blocks_the_release(blocked_then_published) -> None:
    _, results = blocked_then_published
    code, files, err, report = results[0]
    assert code == 1
    assert "lamina: gates failed: max_kl " in err and "> limit 1e-06; staged artifact kept in" in err
    assert "min_top1" not in err  # it passed
    assert files == [".lamina"]  # nothing published: no manifest, no weights at the version's top level
    # the staged artifact and its report stay for inspection, with the failing gate
    assert "- KL divergence" in report and "**FAIL**" in report and "- Top-1 agreement" in report


def test_a_looser_gate_publishes_the_version_with_its_eval(blocked_then_published) -> None:
    output, results = blocked_then_published
    assert results[1][0] == 0
    manifest = read_manifest(output)
    assert {"eval.json", "eval.md", "eval-position.png", "eval-block-error.png"} <= set(manifest["files"])
    assert manifest["eval"]["gates"] == "passed" and 0 < manifest["eval"]["kl"] < 10 and manifest["eval"]["top1"] > 0.5
    assert manifest["eval"]["window"] == 64 and manifest["eval"]["long_window"] == 128
    assert verify(output) == []
    assert not open_location(output).exists(".lamina")
    events = open_location(output).read_bytes("lamina-events.jsonl").decode()
    assert '"event": "run_resumed"' in events and '"finished": [0, 1, 2, 3]' in events  # not quantized again
    assert [v.version for v in list_versions(str(Path(output).parent.parent))] == ["w4g64"]


def test_a_second_identical_release_is_a_no_op(blocked_then_published) -> None:
    output, results = blocked_then_published
    assert results[2][:2] == results[1][:2] and results[2][0] == 0 and results[2][3] == ""
    assert read_manifest(output)["eval"]["gates"] == "passed"


def test_the_cli_says_why_a_release_was_blocked_and_that_a_repeat_did_nothing(
    ray_cluster, small_model, tmp_path, blocked_then_published, capsys
) -> None:
    output, _ = blocked_then_published
    loose = write_recipe(tmp_path / "again.yaml", release_doc(tmp_path, small_model, output, {"max_kl": 10.0}))
    assert main(["-q", "release", loose]) == 0
    assert "is already published from this recipe and source; nothing to do" in capsys.readouterr().out


def test_two_concurrent_releases_on_s3_end_with_exactly_one_version(
    ray_cluster, small_model, s3_endpoint, tmp_path
) -> None:
    output = f"{s3_endpoint}/registry-race/smollm2/w4g64"
    recipe = parse(release_doc(tmp_path, small_model, output, {"max_kl": 10.0}))
    outcomes: list[object] = [None, None]
    started = threading.Barrier(2)

    def job(k: int) -> None:
        started.wait()
        try:
            outcomes[k] = release(recipe, progress=False)
        except LockHeldError as e:
            outcomes[k] = e

    threads = [threading.Thread(target=job, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    refused = [o for o in outcomes if isinstance(o, LockHeldError)]
    published = [o for o in outcomes if not isinstance(o, LockHeldError)]
    assert len(refused) == 1 and len(published) == 1, outcomes
    assert published[0].status == "published"
    assert "is locked by release on" in str(refused[0])
    assert [v.version for v in list_versions(f"{s3_endpoint}/registry-race")] == ["w4g64"]
    assert open_location(output).exists(MANIFEST) and verify(output) == []


def test_a_release_that_died_is_resumed_by_the_next(ray_cluster, small_model, tmp_path) -> None:
    """kill -9 of a release job mid-run: its lock (a dead pid of this host) does not block
    the next job, which resumes the journaled blocks and publishes."""
    output = tmp_path / "registry" / "smollm2" / "w4g64"
    doc = release_doc(tmp_path, small_model, str(output), {"max_kl": 10.0})
    recipe = write_recipe(tmp_path / "died.yaml", doc)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    job = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "-q", "release", recipe], cwd=ROOT, env=env)
    try:
        deadline = time.time() + 240
        while not list(output.glob(".lamina/journal/*/block-00000.json")) and job.poll() is None:
            assert time.time() < deadline, "block 0 was never journaled"
            time.sleep(0.01)
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.wait()
    locks = [json.loads(p.read_text()) for p in output.glob(".lamina/lock-*.json")]
    assert [(lock["holder"]["pid"], lock["released"]) for lock in locks] == [(job.pid, False)]
    report = release(parse(doc), progress=False)
    assert report.status == "published" and report.run.resumed >= 1
    assert verify(str(output)) == [] and read_manifest(str(output))["eval"]["gates"] == "passed"
