"""Connecting to Ray: the cluster the environment names, else a running local one, else a
new local one. Ray is imported only here and only when a run needs it."""

from __future__ import annotations

import logging
import os
from types import ModuleType

from pipeline.errors import LaminaError
from pipeline.recipe import Resources
from storage.fs import StorageError
from storage.options import configured

log = logging.getLogger(__name__)


def connect(resources: Resources) -> ModuleType:
    import ray

    if not ray.is_initialized():
        address = resources.ray_address or os.environ.get("RAY_ADDRESS")
        quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
        if address:
            ray.init(address=address, **quiet)
        else:
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:
                log.info("no running Ray cluster found; starting a local one")
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    need = resources.workers * resources.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    if need > have:
        raise LaminaError(
            f"resources: {resources.workers} workers x {resources.cpus_per_worker} CPUs need {need} CPUs, "
            f"the Ray cluster has {have:g}"
        )
    return ray


def start_runners(ray: ModuleType, resources: Resources, **kwargs: object) -> list:
    """The workers, each reaching storage with the driver's resolved storage options."""
    from workers.actors import block_actor

    actor = block_actor(num_cpus=resources.cpus_per_worker)
    options = {"threads": resources.cpus_per_worker, "storage": configured(), **kwargs}
    return [actor.remote(**options) for _ in range(resources.workers)]


def get(ray: ModuleType, refs: object) -> object:
    """ray.get, with a worker's storage or lamina error raised as itself (one clear line)
    instead of Ray's wrapper that carries the remote traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (StorageError, LaminaError)):
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        # a worker whose constructor raised: Ray keeps only the text of the traceback
        last = (getattr(e, "error_msg", "") or str(e)).strip().splitlines()[-1]
        for kind in (StorageError, LaminaError):
            prefix = f"{kind.__module__}.{kind.__name__}: "
            if getattr(e, "_actor_init_failed", False) and last.startswith(prefix):
                raise kind(f"a worker could not start: {last.removeprefix(prefix)}") from None
        raise


def split(n: int, parts: int) -> list[range]:
    """Contiguous, deterministic shares of range(n): worker w owns the w-th share."""
    return [range(w * n // parts, (w + 1) * n // parts) for w in range(parts)]
