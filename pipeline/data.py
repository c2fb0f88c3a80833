"""Text for calibration and evaluation: files under a URI, sorted by path, joined with a
blank line, tokenized once; then cut into sequences. A source with too few tokens is an
error, never a silently short calibration."""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from functools import lru_cache

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.errors import LaminaError
from storage.checkpoint import Checkpoint
from storage.fs import Location, open_location

CHARS_PER_TOKEN_GUESS = 6  # English prose with code: about 4; a generous first read


def _files(uri: str, pattern: str) -> list[tuple[Location, str]]:
    location = open_location(uri)
    if not location.exists():
        raise LaminaError(f"text source not found: {uri}")
    if location.isfile():
        parent, name = location.uri.rsplit("/", 1)
        return [(open_location(parent), name)]
    names = [n for n in location.list_files() if fnmatch.fnmatch(n, pattern)]
    if not names:
        raise LaminaError(f"text source {uri} has no files matching {pattern!r}")
    return [(location, n) for n in names]


def _text_of(location: Location, name: str) -> str:
    raw = location.read_bytes(name).decode("utf-8", errors="replace")
    if not name.endswith(".jsonl"):
        return raw
    rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return "\n\n".join(str(row["text"]) for row in rows if isinstance(row, dict) and "text" in row)


@lru_cache(maxsize=4)
def load_tokenizer(model_uri: str) -> PreTrainedTokenizerBase:
    """The tokenizer stored beside a checkpoint (copied locally first if it is remote)."""
    checkpoint = Checkpoint(model_uri)
    location = checkpoint.location
    if isinstance(location.fs, LocalFileSystem):
        return AutoTokenizer.from_pretrained(location.root)
    local = tempfile.mkdtemp(prefix="lamina-tok-")
    for name in checkpoint.side_files():
        with open(os.path.join(local, name), "wb") as f:
            f.write(location.read_bytes(name))
    return AutoTokenizer.from_pretrained(local)


def token_stream(*, uri: str, pattern: str, tokenizer: PreTrainedTokenizerBase, needed: int, what: str) -> np.ndarray:
    """The first `needed` tokens of the joined text; only as much text as that needs is read."""
    files = _files(uri, pattern)
    budget = needed * CHARS_PER_TOKEN_GUESS
    while True:
        parts, size = [], 0
        for loc, name in files:
            if size >= budget:
                break
            parts.append(_text_of(loc, name))
            size += len(parts[-1]) + 2
        text = "\n\n".join(parts)[:budget]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        exhausted = len(parts) == len(files) and size - 2 <= budget
        margin = 0 if exhausted else 64  # keep away from the cut, where BPE could differ
        if len(ids) >= needed + margin:
            return np.asarray(ids[:needed], dtype=np.int64)
        if exhausted:
            raise LaminaError(f"{what}: {uri} ({pattern}) holds {len(ids)} tokens, {needed} are needed")
        budget *= 2


def sequences(stream: np.ndarray, *, count: int, length: int) -> np.ndarray:
    """Consecutive non-overlapping sequences: [count, length]."""
    return stream[: count * length].reshape(count, length)


def files_of(uri: str, pattern: str) -> list[str]:
    """The URIs of the text files a source resolves to, sorted."""
    return [f"{loc.uri.rstrip('/')}/{name}" for loc, name in _files(uri, pattern)]


def duplicate_ratio(seqs: np.ndarray) -> float:
    """Share of sequences ([count, length]) that repeat an earlier one exactly."""
    unique = np.unique(seqs, axis=0).shape[0]
    return 1 - unique / seqs.shape[0]


def ngram_overlap(text: np.ndarray, other: np.ndarray, n: int) -> float:
    """Share of the n-grams of `text` (token ids) that also occur in `other`: 0 for
    held-out text, about 1 for text copied from `other`."""
    if text.size < n or other.size < n:
        return 0.0
    seen = {other[i : i + n].tobytes() for i in range(other.size - n + 1)}
    grams = [text[i : i + n].tobytes() for i in range(text.size - n + 1)]
    return sum(g in seen for g in grams) / len(grams)
