"""The run journal: what a run has finished, beside its staging data.

`.lamina/journal/<run_id>/run.json` says what the run is (recipe hash, source fingerprint,
shard names); `block-NNNNN.json` is written after block N's shard is stored, with the
shard's sha256 and size, so that a later run of the same recipe can trust that shard
without reading it. One small file per entry: object stores cannot append.

`events.jsonl` beside them is the run's event log, one JSON object per line (block
started and finished, seconds, bytes, workers lost, errors), across every attempt of the
run: it is rewritten whole on each event (a few hundred short lines for a 405B model).
"""

from __future__ import annotations

import json
import re
import time

from storage.checkpoint import read_json
from storage.fs import Location
from storage.writer import FileRecord, put_bytes, put_json

CONTROL = ".lamina"
CLAIM = f"{CONTROL}/claim.json"
BLOCK_ENTRY = re.compile(r"block-(\d{5})\.json")
EVENTS = "events.jsonl"


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
    return about, block_entries(entries)


def block_entries(entries: Location) -> dict[int, dict]:
    """{block: entry} of the journal folder `entries`."""
    blocks = {}
    for name in entries.list_files():
        match = BLOCK_ENTRY.fullmatch(name)
        if match:
            blocks[int(match.group(1))] = read_json(entries, name)
    return blocks


def finished(output: Location, run_id: str, stage: Location) -> dict[int, dict]:
    """The journaled blocks of run `run_id` whose shards are in its staging folder at the
    journaled size: {block: entry}. A shard that is missing or of another size (a run
    killed between writing and journaling, or a damaged store) is simply not finished."""
    entries = journal(output, run_id)
    if not entries.exists():
        return {}
    done = {}
    for block, entry in block_entries(entries).items():
        file = entry.get("file", {})
        if stage.exists(file.get("name", "")) and stage.size(file["name"]) == file.get("size"):
            done[block] = entry
    return done


def read_events(output: Location, run_id: str) -> list[dict]:
    entries = journal(output, run_id)
    if not entries.exists(EVENTS):
        return []
    return [json.loads(line) for line in entries.read_bytes(EVENTS).decode().splitlines() if line.strip()]


class EventLog:
    """The run's JSON-lines event log, continued across attempts of the same run."""

    def __init__(self, output: Location, run_id: str):
        self.location = journal(output, run_id)
        self.lines = [json.dumps(e, sort_keys=True) for e in read_events(output, run_id)]

    def emit(self, event: str, **fields: object) -> dict:
        doc = {"time": round(time.time(), 3), "event": event, **fields}
        self.lines.append(json.dumps(doc, sort_keys=True))
        put_bytes(self.location, EVENTS, ("\n".join(self.lines) + "\n").encode())
        return doc
