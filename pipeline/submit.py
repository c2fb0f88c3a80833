"""`lamina submit`: `lamina quantize` or `lamina release` as a Ray job on a cluster's job server.

A thin wrapper over Ray's `JobSubmissionClient`, the client `ray job submit` uses: the recipe is
checked here first, the working directory is uploaded (Ray skips `.git`, `.venv` and what
`.gitignore` lists), the driver runs on the cluster's head with the recipe's path relative to
that directory, and the job's logs are followed until it ends. The exit code is the driver's:
0 done, 1 a release blocked by its gates, 2 an error; a job stopped or lost is 1.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import LaminaError
from pipeline.recipe import Recipe, load
from storage.fs import protocols

COMMANDS = ("quantize", "release")


@dataclass(frozen=True)
class Submission:
    address: str | None  # the job server (None: RAY_ADDRESS or a local cluster, as Ray decides)
    working_dir: Path  # uploaded; the job's current directory on the head
    entrypoint: str  # the command the head runs
    submission_id: str
    local_paths: list[str]  # the recipe's URIs on this machine's filesystem


def local_paths(recipe: Recipe) -> list[str]:
    """The recipe's sources and outputs on this machine's filesystem (a path or a file:// URI,
    also inside a chain): a cluster sees them only where it shares the filesystem."""
    uris = {"model": recipe.model, "output": recipe.output}
    if recipe.calibration is not None:
        uris["calibration.source"] = recipe.calibration.source
    if recipe.eval is not None:
        uris["eval.source"] = recipe.eval.source
    return [f"{field} {uri}" for field, uri in uris.items() if protocols(uri)[-1] in {"file", "local"}]


def prepare(
    recipe_path: str,
    *,
    command: str = "quantize",
    address: str | None = None,
    working_dir: str = ".",
    submission_id: str | None = None,
    workers: int | None = None,
    quiet: bool = False,
) -> Submission:
    """Check everything that can be checked here, before anything is uploaded."""
    if command not in COMMANDS:
        raise LaminaError(f"--command must be one of {', '.join(COMMANDS)}, not {command!r}")
    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise LaminaError(f"working directory not found: {working_dir}")
    recipe = load(recipe_path)  # a bad recipe fails here, not on the head
    try:
        relative = Path(recipe_path).resolve().relative_to(root)
    except ValueError:
        raise LaminaError(
            f"recipe {recipe_path} is outside the working directory {root}: the job runs on the head, which sees "
            f"only the uploaded working directory"
        ) from None
    if address is not None and not address.startswith(("http://", "https://")):
        raise LaminaError(f"--address must be the job server's http(s)://HOST:PORT (8265 by default), not {address!r}")
    argv = ["lamina", *(["-q"] if quiet else []), command, relative.as_posix()]
    if workers:
        argv += ["--workers", str(workers)]
    sid = submission_id or f"lamina-{command}-{uuid.uuid4().hex[:12]}"
    return Submission(address, root, shlex.join(argv), sid, local_paths(recipe))


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """0 for a job that succeeded; for one that failed, the driver's own exit code where Ray
    reports one (1: a release blocked by its gates, 2: an error); else 1."""
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and driver_exit_code is not None and driver_exit_code > 0:
        return driver_exit_code
    return 1


async def follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(sub: Submission, *, wait: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(sub.address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = sub.address or "RAY_ADDRESS or a local cluster"
        raise LaminaError(f"no Ray job server at {where}: {str(e).splitlines()[0]}") from None
    if sub.local_paths:
        print(
            f"lamina submit: note: the recipe names this machine's files ({'; '.join(sub.local_paths)}): the head and "
            f"workers must see them; relative ones resolve in the uploaded copy of {sub.working_dir}",
            file=sys.stderr,
        )
    job_id = client.submit_job(
        entrypoint=sub.entrypoint, submission_id=sub.submission_id, runtime_env={"working_dir": str(sub.working_dir)}
    )
    server = client.get_address()
    print(f"lamina submit: job {job_id} on {server}: {sub.entrypoint}", flush=True)
    print(f"  logs: ray job logs --address {server} -f {job_id}   stop: ray job stop --address {server} {job_id}")
    if not wait:
        return 0
    try:
        asyncio.run(follow(client, job_id))
    except KeyboardInterrupt:
        print(f"\nlamina submit: stopped following; job {job_id} keeps running", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    while info.status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:  # logs end just before
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    code = exit_code(info.status.value, getattr(info, "driver_exit_code", None))
    print(f"lamina submit: job {job_id} {info.status.value.lower()} (exit code {code})", file=sys.stderr)
    return code
