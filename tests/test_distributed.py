"""Distributed, elastic and resumable runs on a 4-block copy of the fixture model: the
artifact is a function of the recipe, not of the number of workers, of a driver killed
and restarted, or of a node lost mid-block."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.architectures import layout_for
from pipeline.cli import main
from pipeline.driver import balance, quantize
from pipeline.recipe import parse
from storage.fs import open_location
from storage.manifest import read_manifest, verify
from tests.conftest import SMALL_BLOCKS, small_recipe_doc
from workers.block import BlockRunner
from workers.chunk_sum import fold, push, root_size

ROOT = Path(__file__).resolve().parents[1]


def shard_hashes(output: str) -> dict[str, str]:
    files = read_manifest(output)["files"]
    return {name: f["sha256"] for name, f in files.items() if name.endswith(".safetensors")}


# ---- the chunk-sum tree ---------------------------------------------------------------


def subtrees(chunks: list[int], total: int, sums: list[dict]) -> list:
    stack: list = []
    for c in chunks:
        push(stack, (c, 1, sums[c]), total)
    return stack


@pytest.mark.parametrize("total", [1, 2, 5, 8, 13])
def test_chunk_sums_are_the_same_bits_for_any_partition(total: int) -> None:
    rng = np.random.default_rng(total)
    # values of very different magnitudes, where float32 addition order shows
    sums = [{"h": (rng.standard_normal((4, 4)) * 10.0 ** rng.integers(-4, 5)).astype(np.float32)} for _ in range(total)]
    one = fold(subtrees(list(range(total)), total, sums), total)["h"]
    orders = set()
    for seed in range(20):
        owner = np.random.default_rng(seed).integers(0, 3, total)  # any, even non-contiguous shares
        parts = [subtrees([c for c in range(total) if owner[c] == w], total, sums) for w in range(3)]
        nodes = sorted((n for p in parts for n in p), key=lambda n: n[0])
        assert len(nodes) <= 3 * 2 * max(1, root_size(total).bit_length())
        got = fold(nodes, total)["h"]
        assert got.tobytes() == one.tobytes()
        sequential = sums[0]["h"].copy()
        for c in range(1, total):
            sequential += sums[c]["h"]
        orders.add(sequential.tobytes() == got.tobytes())
    np.testing.assert_allclose(one, sum(s["h"].astype(np.float64) for s in sums), rtol=1e-5, atol=1e-3)


def test_chunk_sums_refuse_a_missing_chunk() -> None:
    sums = [{"h": np.ones(2, np.float32)} for _ in range(4)]
    with pytest.raises(ValueError, match=r"do not cover chunks 0\.\.3"):
        fold(subtrees([0, 1, 3], 4, sums), 4)


def test_balance_spreads_costs_and_is_deterministic() -> None:
    costs = [5, 3, 3, 2, 2, 1]
    shares = balance(costs, 3)
    assert sorted(k for s in shares for k in s) == list(range(6))
    assert sorted(sum(costs[k] for k in s) for s in shares) == [5, 5, 6]
    assert balance(costs, 3) == shares


# ---- whole runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_cluster, small_model, small_reference, s3_endpoint):
    """The small model quantized with 1 (small_reference), 2 and 3 workers (row pieces
    spread over them), and with fp propagation on 1 and 3 workers; the 3-worker runs keep
    their chunks in files (resources.spill): on local disk, and on S3 for fp."""
    tmp = tmp_path_factory.mktemp("distributed")
    three = {"workers": 3, "cpus_per_worker": 0.5}
    fp = {"samples": 8, "seq_len": 128, "chunk_size": 1, "propagation": "fp"}
    docs = {
        "w2": small_recipe_doc(tmp / "w2", small_model),
        "w3": small_recipe_doc(tmp / "w3", small_model, resources={**three, "spill": str(tmp / "spill")}),
        "fp1": small_recipe_doc(tmp / "fp1", small_model, calibration=fp, resources={"workers": 1}),
        "fp3": small_recipe_doc(
            tmp / "fp3", small_model, calibration=fp, resources={**three, "spill": f"{s3_endpoint}/spill-fp3"}
        ),
    }
    reports = {name: quantize(parse(doc), progress=False) for name, doc in docs.items()}
    return {"w1": small_reference, **reports}, tmp


def test_one_two_and_three_workers_give_bit_identical_artifacts(runs) -> None:
    reports, _ = runs
    hashes = {name: shard_hashes(reports[name].output) for name in ("w1", "w2", "w3")}
    assert len(hashes["w1"]) == SMALL_BLOCKS + 1
    assert hashes["w1"] == hashes["w2"] == hashes["w3"]
    assert all(verify(reports[name].output) == [] for name in hashes)
    assert [reports[n].workers for n in ("w1", "w2", "w3")] == [1, 2, 3]


def test_spilled_chunks_live_in_files_while_held_and_none_are_left(runs, small_model, s3_endpoint, tmp_path) -> None:
    """w3 and fp3 spilled (same bytes as the others: the tests above); their spill folders
    are empty after the runs. A spilling runner holds one file per chunk and computes what
    an in-memory one does."""
    _, tmp = runs
    assert [p for p in (tmp / "spill").rglob("*") if p.is_file()] == []
    assert open_location(f"{s3_endpoint}/spill-fp3").list_files() == []
    config = json.loads((small_model / "config.json").read_text())
    kwargs = {"model_uri": str(small_model), "layout": layout_for(config), "threads": 1}
    spilled, held = BlockRunner(**kwargs, spill=str(tmp_path)), BlockRunner(**kwargs)
    tokens = {c: np.arange(c * 64, c * 64 + 64).reshape(2, 32) for c in range(3)}
    for runner in (spilled, held):
        runner.set_inputs(tokens)
        runner.load_block(0)
        runner.forward()
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert files == [f"chunk-{c:06d}.safetensors" for c in range(3)]
    assert all(torch.equal(spilled.hidden[c], held.hidden[c]) for c in range(3))
    spilled.set_inputs({})
    assert list(tmp_path.rglob("*.safetensors")) == []


def test_fp_propagation_is_bit_identical_across_workers_and_differs_after_block_0(runs) -> None:
    reports, _ = runs
    fp1, fp3, seq = (shard_hashes(reports[n].output) for n in ("fp1", "fp3", "w1"))
    assert fp1 == fp3
    blocks = sorted(fp1)[:SMALL_BLOCKS]
    assert fp1[blocks[0]] == seq[blocks[0]]  # block 0 sees the same inputs either way
    assert all(fp1[b] != seq[b] for b in blocks[1:])  # later blocks see unquantized inputs


def test_a_killed_driver_resumes_on_other_workers_to_the_same_artifact(runs, ray_cluster, small_model, capsys) -> None:
    reports, tmp = runs
    doc = small_recipe_doc(tmp / "killed", small_model, resources={"workers": 2})
    output = Path(doc["output"])
    (tmp / "killed.json").write_text(json.dumps(doc))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    script = "import json, sys; from pipeline.driver import quantize; from pipeline.recipe import parse; "
    script += "quantize(parse(json.load(open(sys.argv[1]))), progress=False)"
    driver = subprocess.Popen([sys.executable, "-c", script, str(tmp / "killed.json")], cwd=ROOT, env=env)
    journals = output / ".lamina" / "journal"
    try:
        deadline = time.time() + 240
        while not list(journals.glob("*/block-00000.json")) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(driver.pid, signal.SIGKILL)  # kill -9 right after block 0 is journaled
    finally:
        driver.wait()
    assert driver.returncode == -signal.SIGKILL
    finished = len(list(journals.glob("*/block-*.json")))
    assert 1 <= finished < SMALL_BLOCKS, "the driver was not killed mid-run"
    assert not (output / "lamina.json").exists()

    capsys.readouterr()
    assert main(["status", str(output)]) == 0  # the journal of a dead run
    status = capsys.readouterr().out
    assert f"{finished} of {SMALL_BLOCKS} blocks journaled" in status and "not published" in status

    again = parse({**doc, "resources": {"workers": 3, "cpus_per_worker": 0.5}})
    report = quantize(again, progress=False)
    assert report.resumed == finished
    assert shard_hashes(report.output) == shard_hashes(reports["w1"].output)
    assert verify(report.output) == []
    events = [json.loads(line) for line in (output / "lamina-events.jsonl").read_text().splitlines()]
    resumed_at = next(k for k, e in enumerate(events) if e["event"] == "run_resumed")
    assert events[resumed_at]["finished"] == list(range(finished))
    assert len(events[resumed_at]["workers"]) == 3
    redone = [e["block"] for e in events[resumed_at:] if e["event"] == "block_started"]
    assert redone == list(range(finished, SMALL_BLOCKS))  # blocks before the kill are not recomputed
    # the kill may fall between a block's journal entry and its event: the journal decides
    done = {e["block"] for e in events if e["event"] == "block_finished"} | set(events[resumed_at]["finished"])
    assert sorted(done) == list(range(SMALL_BLOCKS))


def test_losing_a_node_mid_block_costs_that_block_only(runs, small_model) -> None:
    reports, tmp = runs
    doc = small_recipe_doc(tmp / "lost", small_model, resources={"workers": 2, "placement": "spread"})
    (tmp / "lost.json").write_text(json.dumps(doc))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lost_node.py"), str(tmp / "lost.json"), str(tmp / "lost-result.json")],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=400,
    )
    result = json.loads((tmp / "lost-result.json").read_text())
    assert result["removed"]
    assert result["workers_lost"] == 1 and result["retries"] >= 1
    assert result["shards"] == shard_hashes(reports["w1"].output)


def test_runs_give_their_placement_groups_back(runs, ray_cluster) -> None:
    from ray.util import placement_group_table

    states = [group["state"] for group in placement_group_table().values()]
    assert len(states) >= 5 and set(states) == {"REMOVED"}


def test_a_placement_the_cluster_cannot_satisfy_is_refused_before_claiming(
    ray_cluster, small_model, tmp_path, monkeypatch
) -> None:
    from pipeline import cluster
    from pipeline.errors import LaminaError

    monkeypatch.setattr(cluster, "PLACEMENT_TIMEOUT_S", 1)
    doc = small_recipe_doc(tmp_path, small_model, resources={"workers": 1, "custom": {"h100": 1}})
    with pytest.raises(LaminaError, match=r"could not place 1 workers of \{'CPU': 1\.0, 'h100': 1\.0\} \(pack\)"):
        quantize(parse(doc), progress=False)
    assert not (tmp_path / "artifact").exists()
