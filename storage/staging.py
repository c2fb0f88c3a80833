"""Atomic publish on stores without rename.

A run first claims its output folder (an exclusive create of `.lamina/claim.json`), writes
every file under `.lamina/staging/<run_id>/`, journals each finished block under
`.lamina/journal/<run_id>/`, and publishes by copying the staged files to
their final names (server-side on S3) and then creating the manifest, which only one
writer can create. Readers ignore a folder without a manifest, so they never see a mix.

A claim by the same recipe on the same source is taken over (the bytes it would write
are the same: results are a function of the recipe); any other claim is refused.
"""

from __future__ import annotations

import json
import time
import uuid

from storage.fs import Location, StorageError
from storage.journal import CLAIM, CONTROL
from storage.manifest import MANIFEST, write_manifest
from storage.writer import FileRecord, put_json


def claim(output: Location, *, recipe_hash: str, fingerprint: str) -> str:
    """Own `output` for one run; returns the run id whose staging folder to write into."""
    if output.exists(MANIFEST):
        raise StorageError(f"output {output.uri} already holds a published artifact")
    doc = {
        "run_id": uuid.uuid4().hex[:12],
        "recipe_hash": recipe_hash,
        "fingerprint": fingerprint,
        "started": time.time(),
    }
    try:
        put_json(output, CLAIM, doc, exclusive=True)
        return doc["run_id"]
    except FileExistsError:
        other = json.loads(output.read_bytes(CLAIM))
    if (other.get("recipe_hash"), other.get("fingerprint")) == (recipe_hash, fingerprint):
        return str(other["run_id"])
    raise StorageError(
        f"output {output.uri} is claimed by run {other.get('run_id')} of another recipe or source; "
        f"publish elsewhere, or delete {output.uri}/{CONTROL} to discard that run"
    )


def staging(output: Location, run_id: str) -> Location:
    """Where a run writes the artifact's files before publishing."""
    return output.child(f"{CONTROL}/staging/{run_id}")


def publish(output: Location, run_id: str, files: list[FileRecord], **fields: object) -> FileRecord:
    """Copy the staged files into place (each copy's size checked), create the manifest
    last, then drop the staging and the journal."""
    for record in files:
        output.copy(f"{CONTROL}/staging/{run_id}/{record.name}", record.name, record.size)
    try:
        manifest = write_manifest(output, files, **fields)
    except FileExistsError:
        raise StorageError(f"output {output.uri} was published by another run first") from None
    output.remove(CONTROL)
    return manifest
