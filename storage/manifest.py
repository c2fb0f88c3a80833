"""The manifest `lamina.json`: sha256 and size of every file of an artifact, plus what
made it. It is written last: a folder without one is not an artifact."""

from __future__ import annotations

import hashlib
import json

from storage.fs import Location, StorageError, open_location
from storage.writer import FileRecord, put_json

MANIFEST = "lamina.json"
FORMAT = "lamina-artifact/1"


def write_manifest(location: Location, files: list[FileRecord], **fields: object) -> FileRecord:
    """Publish: exactly one writer can create the manifest; a second gets FileExistsError."""
    doc = {
        "format": FORMAT,
        "files": {r.name: {"sha256": r.sha256, "size": r.size} for r in sorted(files, key=lambda r: r.name)},
        **fields,
    }
    return put_json(location, MANIFEST, doc, exclusive=True)


def read_manifest(uri: str) -> dict:
    location = open_location(uri)
    if not location.exists(MANIFEST):
        raise StorageError(f"{uri}: not a published artifact (no {MANIFEST})")
    try:
        doc = json.loads(location.read_bytes(MANIFEST))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StorageError(f"{uri}/{MANIFEST}: not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise StorageError(f"{uri}/{MANIFEST}: not a {FORMAT} manifest")
    return doc


def verify(uri: str) -> list[str]:
    """Re-hash every file the manifest lists; return one line per problem (empty: all good)."""
    location = open_location(uri)
    problems = []
    for name, want in sorted(read_manifest(uri)["files"].items()):
        if not location.exists(name):
            problems.append(f"{name}: missing")
            continue
        data = location.read_bytes(name)
        if len(data) != want["size"]:
            problems.append(f"{name}: size {len(data)}, manifest says {want['size']}")
        elif hashlib.sha256(data).hexdigest() != want["sha256"]:
            problems.append(f"{name}: sha256 mismatch")
    return problems
