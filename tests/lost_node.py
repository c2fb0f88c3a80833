"""A quantization on a multi-node Ray cluster in one process (ray.cluster_utils.Cluster)
that loses a worker node while a block is in flight. Run as a script by
tests/test_distributed.py, because a process joins one Ray cluster and the test session
already has its own:

    python tests/lost_node.py RECIPE.json RESULT.json

It writes the shards' hashes, the run's counts of lost workers and redone blocks, and its
event log to RESULT.json.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep every node on loopback
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


def remove_when_block_starts(cluster, node, events: Path, block: int, removed: dict) -> None:
    """Remove `node` as soon as the event log says `block` started (while it is in flight)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if events.exists():
            for line in events.read_text().splitlines():
                e = json.loads(line)
                if e["event"] == "block_started" and e["block"] == block:
                    cluster.remove_node(node, allow_graceful=False)
                    removed["at"] = time.time()
                    return
        time.sleep(0.02)


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.driver import quantize
    from pipeline.recipe import parse

    recipe = parse(json.loads(Path(sys.argv[1]).read_text()))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        output = Path(recipe.output)
        removed: dict = {}
        # the run's id is only known once it claims the output: watch every journal folder
        watcher = threading.Thread(
            target=lambda: remove_when_block_starts(cluster, nodes[1], find_events(output), 1, removed), daemon=True
        )
        watcher.start()
        report = quantize(recipe, progress=False)
        watcher.join(timeout=5)
        result = {
            "shards": {f: r.sha256 for f, r in report.files.items() if f.endswith(".safetensors")},
            "workers_lost": report.workers_lost,
            "retries": report.retries,
            "removed": "at" in removed,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(sys.argv[2]).write_text(json.dumps(result))


def find_events(output: Path) -> Path:
    """The event log of the run that claims `output` (waits for the claim)."""
    claim = output / ".lamina" / "claim.json"
    while not claim.exists():
        time.sleep(0.02)
    while True:
        try:
            run_id = json.loads(claim.read_text())["run_id"]
            break
        except (json.JSONDecodeError, KeyError):
            time.sleep(0.02)
    return output / ".lamina" / "journal" / run_id / "events.jsonl"


if __name__ == "__main__":
    main()
