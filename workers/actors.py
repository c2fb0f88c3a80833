"""Ray actor wrappers. Ray is imported here only, and only when an actor is made."""

from __future__ import annotations

from typing import Any

from workers.block import BlockRunner


def block_actor(*, num_cpus: int) -> Any:
    """The BlockRunner class as a Ray actor class reserving `num_cpus` CPUs."""
    import ray

    return ray.remote(num_cpus=num_cpus)(BlockRunner)
