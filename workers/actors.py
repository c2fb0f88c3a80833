"""Ray actor wrappers. Ray is imported here only, and only when an actor is made."""

from __future__ import annotations

from typing import Any

from workers.block import BlockRunner


def block_actor() -> Any:
    """The BlockRunner class as a Ray actor class; callers set its resources with .options()."""
    import ray

    return ray.remote(BlockRunner)
