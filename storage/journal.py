"""The run journal: what a run has finished, beside its staging data.

`.lamina/journal/<run_id>/run.json` says what the run is (recipe hash, source fingerprint,
shard names); `block-NNNNN.json` is written after block N's shard is stored, with the
shard's sha256 and size, so that a later run of the same recipe can trust that shard
without reading it. One small file per entry: object stores cannot append.
"""

from __future__ import annotations

import re

from storage.checkpoint import read_json
from storage.fs import Location
from storage.writer import FileRecord, put_json

CONTROL = ".lamina"
CLAIM = f"{CONTROL}/claim.json"
BLOCK_ENTRY = re.compile(r"block-(\d{5})\.json")


def journal(output: Location, run_id: str) -> Location:
    return output.child(f"{CONTROL}/journal/{run_id}")


def begin(output: Location, run_id: str, **about: object) -> None:
    put_json(journal(output, run_id), "run.json", {"run_id": run_id, **about})


def block_done(output: Location, run_id: str, index: int, record: FileRecord, **about: object) -> None:
    put_json(journal(output, run_id), f"block-{index:05d}.json", {"block": index, "file": vars(record), **about})


def read(output: Location) -> tuple[dict, dict[int, dict]] | None:
    """(run.json, {block: entry}) of the run that holds the output's claim; None if unclaimed."""
    if not output.exists(CLAIM):
        return None
    run_id = str(read_json(output, CLAIM).get("run_id", ""))
    entries = journal(output, run_id)
    about = read_json(entries, "run.json") if entries.exists("run.json") else {"run_id": run_id}
    blocks = {}
    for name in entries.list_files():
        match = BLOCK_ENTRY.fullmatch(name)
        if match:
            blocks[int(match.group(1))] = read_json(entries, name)
    return about, blocks
