"""Connecting to Ray: the cluster the environment names, else a running local one, else a
new local one. Ray is imported only here and only when a run needs it."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
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
        if not autoscaling():
            raise LaminaError(
                f"resources: {resources.workers} workers x {resources.cpus_per_worker:g} CPUs need {need:g} CPUs, "
                f"the Ray cluster has {have:g}"
            )
        log.info("the cluster has %g of %g CPUs now; its autoscaler adds nodes for the workers", have, need)
    return ray


def autoscaling() -> bool:
    """Whether an autoscaler that can add nodes serves the connected cluster (the Ray cluster
    launcher's, KubeRay's), so that CPUs it lacks now may come. Every Ray head runs a monitor
    that publishes its report in the GCS key-value store; on a cluster without an autoscaling
    config it runs a read-only provider whose node types are named after the nodes
    (`format_readonly_node_type`), while a real one names the config's types (head, gpu_h100).
    Autoscaler v2 marks itself there. These are Ray internals: if they move, this says no and
    lamina keeps its up-front CPU check."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        types = (json.loads(status)["autoscaler_report"].get("node_type_mapping") or {}) if status else {}
        return any(kind != format_readonly_node_type(node) for node, kind in types.items())
    except Exception as e:  # an internal API gone: fall back to the check
        log.debug("could not tell whether the cluster autoscales: %s", e)
        return False


PLACEMENT_TIMEOUT_S = float(os.environ.get("LAMINA_PLACEMENT_TIMEOUT_S", 300))
# On a cluster that autoscales, new GPU nodes take minutes to boot and pull the image.
SCALE_UP_TIMEOUT_S = float(os.environ.get("LAMINA_SCALE_UP_TIMEOUT_S", 1800))


@dataclass
class Pool:
    """The run's workers, in a placement group that keeps them together; `release` kills
    them and gives the group's resources back."""

    ray: ModuleType
    runners: list
    group: object
    spilled: bool = False  # the workers keep chunks in files (resources.spill)

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.spilled:  # drop the workers' inputs first: spilled chunks are files that outlive the process
            self.ray.wait([r.set_inputs.remote({}) for r in self.runners], num_returns=len(self.runners), timeout=60)
        for r in self.runners:
            self.ray.kill(r)
        remove_placement_group(self.group)


def start_runners(ray: ModuleType, resources: Resources, **kwargs: object) -> Pool:
    """The workers, one per placement group bundle, each reaching storage with the
    driver's resolved storage options; refuses, naming the request, a group the cluster
    cannot place."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from workers.actors import block_actor

    bundle = resources.bundle()
    group = placement_group([bundle] * resources.workers, strategy=resources.placement.upper())
    timeout = max(PLACEMENT_TIMEOUT_S, SCALE_UP_TIMEOUT_S) if autoscaling() else PLACEMENT_TIMEOUT_S
    ready, _ = ray.wait([group.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(group)
        raise LaminaError(
            f"resources: the Ray cluster could not place {resources.workers} workers of {bundle} "
            f"({resources.placement}) within {timeout:g} s; it has {ray.available_resources()}"
        )
    actor = block_actor()
    threads = max(1, int(resources.cpus_per_worker))
    options = {
        "threads": threads,
        "storage": configured(),
        "spill": resources.spill,
        "solve_device": "cuda" if resources.solve_device == "gpu" else "cpu",
        "inverse_on_cpu": resources.inverse_on_cpu,
        **kwargs,
    }
    runners = [
        actor.options(
            num_cpus=resources.cpus_per_worker,
            num_gpus=resources.gpus_per_worker,
            memory=bundle.get("memory"),
            resources=resources.custom or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
        ).remote(**options)
        for i in range(resources.workers)
    ]
    return Pool(ray, runners, group, spilled=resources.spill is not None)


class WorkerLostError(Exception):
    """A worker (or the node, or an object only it held) is gone: redo the block without it."""


def lost(ray: ModuleType) -> tuple[type[Exception], ...]:
    """Ray's errors that mean a worker, its node or an object only it held is gone."""
    x = ray.exceptions
    return (x.RayActorError, x.ObjectLostError, x.NodeDiedError, x.WorkerCrashedError)


def get(ray: ModuleType, refs: object) -> object:
    """ray.get, with a worker's storage or lamina error raised as itself (one clear line)
    instead of Ray's wrapper that carries the remote traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (StorageError, LaminaError)):
            raise e.cause from None
        if isinstance(e.cause, lost(ray)):  # a task whose input came from a worker that is gone
            raise WorkerLostError(str(e.cause).strip().splitlines()[-1]) from None
        raise
    except ray.exceptions.RayActorError as e:
        # a worker whose constructor raised: Ray keeps only the text of the traceback
        last = (getattr(e, "error_msg", "") or str(e)).strip().splitlines()[-1]
        if getattr(e, "_actor_init_failed", False):
            for kind in (StorageError, LaminaError):
                prefix = f"{kind.__module__}.{kind.__name__}: "
                if last.startswith(prefix):
                    raise kind(f"a worker could not start: {last.removeprefix(prefix)}") from None
            raise
        raise WorkerLostError(last) from None
    except lost(ray) as e:
        raise WorkerLostError(str(e).strip().splitlines()[0]) from None


def split(n: int, parts: int) -> list[range]:
    """Contiguous, deterministic shares of range(n): worker w owns the w-th share."""
    return [range(w * n // parts, (w + 1) * n // parts) for w in range(parts)]
