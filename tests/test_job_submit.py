"""Runs on a cluster, as users start them: `ray job submit --working-dir . -- COMMAND` with the
command of the KubeRay RayJob (infra/k8s/rayjob.yaml: `lamina release RECIPE`), and
`lamina submit`, against a Ray head this test starts with `ray start --head --block` (its own
ports, its own temp folder, on loopback) and stops by terminating that process: never
`ray stop`, which would kill every Ray on the machine, the session's in-process cluster
included. The head has the shape of infra/: CPU 0, and an autoscaler that adds a worker node
when a run asks for one."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from storage.manifest import read_manifest, verify
from tests.conftest import DOCS, ROOT, SMALL_BLOCKS, small_recipe_doc

BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `lamina`
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 300
# tests/test_release.py's short eval: the release's eval on 256 tokens
RELEASE_EVAL = {"source": str(DOCS / "tutorial"), "glob": "*.rst.txt", "tokens": 256, "window": 64, "long_window": 128}


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT, the job server
    temp: Path  # the head's RAY_TMPDIR
    env: dict[str, str]  # the environment it was started with; CLI calls use it too
    auth: dict[str, str]  # the HTTP header carrying its token, for in-process clients
    log: Path  # the `ray start` output


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback now (all held open until all are chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def ray_env(temp: Path, token: str) -> dict[str, str]:
    """The environment of the head and of the CLI calls: Ray 2.60 turns token auth on for a
    head when ~/.ray/auth_token exists (an in-process `ray.init()` writes it) and the CLI
    sends no token unless told, so the mode and a token of this head's own are explicit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_TMPDIR=str(temp),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind to 127.0.0.1 (shared/VERIFIED.md)
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def session_processes(temp: Path) -> list:
    """Every process of the head's session: its command line names the head's temp folder."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        with suppress(psutil.Error):
            if str(temp) in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


def stop(proc: subprocess.Popen, log: Path, temp: Path) -> None:
    """SIGTERM the `ray start --block` process (its handler stops the head's processes) and
    wait; SIGKILL its process group as a last resort. The nodes the autoscaler started (other
    machines on a real cluster, raylets of this one here) outlive the head: SIGTERM, then
    SIGKILL, whatever of the session is left, and check that nothing is."""
    import psutil

    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    left = session_processes(temp)
    for p in left:
        with suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(left, timeout=5)
    for p in alive:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    left = session_processes(temp)
    assert not left, f"Ray processes outlived the head: {left}\n{log.read_text()[-3000:]}"


def autoscaling_config(gcs: int) -> dict:
    """The shape of infra/ray and infra/k8s on one machine: a head with CPU 0 (it runs the job
    driver and no worker) and one type of worker node, none at start, that Ray's autoscaler
    launches when a run's placement group asks for CPUs (Ray's fake multi-node provider: its
    nodes are raylets on this machine, children of the head's autoscaler)."""
    return {
        "cluster_name": "lamina-test",
        "max_workers": 1,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {  # its nodes start ready: no updater (there is no SSH) and no config check
            "type": "fake_multinode",
            "gcs_address": f"127.0.0.1:{gcs}",
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ray"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "worker": {
                "resources": {"CPU": 2, "object_store_memory": 1 << 30},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 1,
            },
        },
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                           "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
                           "cluster_synced_files", "rsync_exclude", "rsync_filter")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }  # fmt: skip


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    """A Ray head with a job server and an autoscaler (autoscaling_config), on free loopback
    ports (the defaults, 6379, 8265, 10001, 52365, could belong to another cluster on this
    machine), in a fresh folder under /tmp (short: Ray's socket paths live in it)."""
    temp = Path(tempfile.mkdtemp(prefix="lamina-job-", dir="/tmp"))
    gcs, dashboard, agent, client = free_ports(4)
    token = secrets.token_hex(32)
    env, auth = ray_env(temp, token), {"Authorization": f"Bearer {token}"}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    config = temp / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(gcs)))
    log = temp / "ray-start.log"
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus=0", f"--object-store-memory={1 << 30}", f"--autoscaling-config={config}",
        f"--port={gcs}", f"--ray-client-server-port={client}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(urllib.request.Request(f"{url}/api/version", headers=auth), timeout=2) as r:
                    if r.status == 200 and "ray_version" in json.loads(r.read()):
                        break
            except urllib.error.HTTPError as e:
                assert e.code not in (401, 403), f"the job server refused this head's token: {e}"
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no job server at {url} after {START_TIMEOUT_S} s:\n{log.read_text()}"
            time.sleep(0.5)
        yield Head(url, temp, env, auth, log)
    finally:
        try:
            stop(proc, log, temp)
        finally:
            shutil.rmtree(temp, ignore_errors=True)


def test_a_cluster_that_cannot_grow_is_refused_at_once(ray_cluster) -> None:
    """The in-process cluster of the suite has no autoscaler: a run needing more CPUs than it
    has is refused before anything starts, as before."""
    from pipeline.cluster import autoscaling, connect
    from pipeline.errors import LaminaError
    from pipeline.recipe import Resources

    assert autoscaling() is False
    with pytest.raises(LaminaError, match=r"8 workers x 1 CPUs need 8 CPUs, the Ray cluster has 2"):
        connect(Resources(workers=8, cpus_per_worker=1))


def test_ray_job_submit_runs_the_rayjob_entrypoint_with_the_working_dir(ray_head, small_model, tmp_path) -> None:
    """The RayJob's command, token for token, but for its recipe path (the ConfigMap mounted on
    the RayJob's head): a release of the small model, on 2 workers the autoscaler brings."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    from tests.test_infra_k8s import rayjob_entrypoint

    output = tmp_path / "registry" / "smollm2" / "w4g64-v1"
    doc = small_recipe_doc(tmp_path, small_model, output=str(output), resources={"workers": 2, "cpus_per_worker": 1})
    doc.update(eval=RELEASE_EVAL, gates={"max_kl": 10.0, "min_top1": 0.5})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    submission = f"lamina-test-{uuid.uuid4().hex[:8]}"
    entrypoint, mounted = rayjob_entrypoint()
    assert entrypoint.count(mounted) == 1 and entrypoint[0] == "lamina", entrypoint
    command = [str(recipe) if token == mounted else token for token in entrypoint]

    cmd = [
        str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--submission-id", submission,
        "--working-dir", ".", "--", *command,
    ]  # fmt: skip
    job = subprocess.run(
        cmd,
        env=ray_head.env,
        cwd=ROOT,  # `--working-dir .` from the repository root, as the README says
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    said = job.stdout + job.stderr
    assert job.returncode == 0, f"{said}\n--- head:\n{ray_head.log.read_text()[-3000:]}"
    assert f"Job '{submission}' succeeded" in said
    assert "lamina release: published" in said

    # The job server agrees, and the run's workers were actors of this job on this head
    # (the driver connected through the RAY_ADDRESS Ray sets for a job, not to another cluster).
    client = JobSubmissionClient(ray_head.dashboard, headers=ray_head.auth)
    assert client.get_job_status(submission) == JobStatus.SUCCEEDED
    assert "lamina release: published" in client.get_job_logs(submission)
    info = client.get_job_info(submission)
    package = info.runtime_env["working_dir"]
    assert re.fullmatch(r"gcs://_ray_pkg_[0-9a-f]+\.zip", package), package
    state = StateApiClient(ray_head.dashboard, headers={**ray_head.auth, "Content-Type": "application/json"})
    runners = state.list(
        StateResource.ACTORS,
        options=ListApiOptions(filters=[("class_name", "=", "BlockRunner")], limit=100),
        raise_on_missing_output=True,
    )
    # (2 workers quantized, then 2 evaluated)
    assert len(runners) >= 2 and {a.job_id for a in runners} == {info.job_id}, runners
    # The head seats no worker (CPU 0, as in infra/): they ran on a node the autoscaler added
    # for the run, which lamina waited for instead of refusing a cluster of 0 CPUs.
    nodes = state.list(StateResource.NODES, options=ListApiOptions(limit=100), raise_on_missing_output=True)
    head = [n.node_id for n in nodes if n.is_head_node]
    assert len(head) == 1 and len(nodes) == 2, nodes
    assert {a.node_id for a in runners} & set(head) == set(), runners

    # What was uploaded (~300 KiB): the sources, without the 1.7 GB .venv and .git (Ray's
    # default excludes) nor the 0.5 GB .cache and the egg-info (.gitignore, which Ray honours).
    # The job's driver and workers import lamina from it: Ray puts it first on PYTHONPATH,
    # ahead of the editable install's finder.
    # The eval built lamina's CPU kernel there, into the checkout's .cache/kernels (kernels/cpu.py):
    # written by the job, not uploaded.
    root, files = unpacked(ray_head, package)
    files = [p for p in files if p.relative_to(root).parts[:2] != (".cache", "kernels")]
    names = {p.relative_to(root).parts[0] for p in files}
    assert {"pipeline", "workers", "storage", "pyproject.toml"} <= names, names
    assert not names & {".venv", ".cache", ".git", "lamina.egg-info"}, names
    assert sum(p.stat().st_size for p in files) < 10 << 20

    # The version is published with its eval, and verifies.
    assert verify(str(output)) == []
    assert read_manifest(str(output))["eval"]["gates"] == "passed"
    shards = [n for n in read_manifest(str(output))["files"] if n.endswith(".safetensors")]
    assert len(shards) == SMALL_BLOCKS + 1, shards


def unpacked(head: Head, package: str) -> tuple[Path, list[Path]]:
    """Where the head unpacked a job's working_dir package, and the files there."""
    root = head.temp / "ray" / "session_latest" / "runtime_resources" / "working_dir_files"
    root /= package.removeprefix("gcs://").removesuffix(".zip")
    return root, [p for p in root.rglob("*") if p.is_file()]


def test_lamina_submit_uploads_a_folder_runs_there_and_follows_the_job(ray_head, small_model, tmp_path) -> None:
    """The cluster case of the image: lamina is installed on the head, and what is uploaded is a
    folder holding the recipe. `lamina submit` prints the job, follows its logs to the end and
    exits with the driver's code."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    folder = tmp_path / "release"
    folder.mkdir()
    output = tmp_path / "artifact"
    doc = small_recipe_doc(tmp_path, small_model, output=str(output), resources={"workers": 1, "cpus_per_worker": 1})
    (folder / "recipe.yaml").write_text(yaml.safe_dump(doc))
    submission = f"lamina-submit-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "lamina"), "-q", "submit", "recipe.yaml", "--address", ray_head.dashboard,
           "--submission-id", submission]  # fmt: skip
    run = subprocess.run(cmd, env=ray_head.env, cwd=folder, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    said = run.stdout + run.stderr
    assert run.returncode == 0, f"{said}\n--- head:\n{ray_head.log.read_text()[-3000:]}"
    assert f"lamina submit: job {submission} on {ray_head.dashboard}: lamina -q quantize recipe.yaml" in said
    assert "lamina quantize: done" in said  # the job's own output, followed
    assert f"job {submission} succeeded (exit code 0)" in said
    assert "the head and workers must see them" in said  # the recipe names paths of this machine

    client = JobSubmissionClient(ray_head.dashboard, headers=ray_head.auth)
    info = client.get_job_info(submission)
    assert info.status == JobStatus.SUCCEEDED and info.entrypoint == "lamina -q quantize recipe.yaml"
    _, files = unpacked(ray_head, info.runtime_env["working_dir"])
    assert [p.name for p in files] == ["recipe.yaml"]
    assert verify(str(output)) == []


def test_lamina_submit_refuses_bad_input_before_uploading(small_model, tmp_path, capsys) -> None:
    from pipeline.cli import main
    from pipeline.submit import exit_code

    closed = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens: reaching it would fail differently
    folder = tmp_path / "work"
    folder.mkdir()
    good = small_recipe_doc(tmp_path, small_model, output=str(tmp_path / "out"))
    (tmp_path / "outside.yaml").write_text(yaml.safe_dump(good))
    (folder / "bad.yaml").write_text(yaml.safe_dump({**good, "scheme": {**good["scheme"], "bits": 5}}))
    (folder / "good.yaml").write_text(yaml.safe_dump(good))

    def refused(*argv: str) -> str:
        capsys.readouterr()
        assert main(["submit", *argv, "--working-dir", str(folder), "--address", closed]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("lamina: error: "), err
        return err

    assert "is outside the working directory" in refused(str(tmp_path / "outside.yaml"))
    assert "scheme.bits" in refused(str(folder / "bad.yaml"))
    assert f"no Ray job server at {closed}" in refused(str(folder / "good.yaml"))
    capsys.readouterr()
    assert main(["submit", str(folder / "good.yaml"), "--address", "127.0.0.1:8265", "--working-dir", str(folder)]) == 2
    assert "http(s)://HOST:PORT" in capsys.readouterr().err
    # the driver's code comes back: a release blocked by its gates is 1, an error 2; a stopped job 1
    assert [exit_code("SUCCEEDED", 0), exit_code("FAILED", 1), exit_code("FAILED", 2)] == [0, 1, 2]
    assert [exit_code("FAILED", None), exit_code("STOPPED", -15), exit_code("FAILED", -9)] == [1, 1, 1]
