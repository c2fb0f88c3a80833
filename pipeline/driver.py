"""The Ray driver of a quantization run. It holds plans, object references and small
records, never model weights: workers load, calibrate, solve, write and propagate.

Per block i: every worker loads block i by range reads; each runs its chunks through it
and returns per-chunk Hessians, summed here in chunk order (so the sum, and the artifact,
do not depend on the number of workers); the block's linears are solved spread over the
workers; one worker writes the shard; all install the quantized block and run their
chunks through it to make block i+1's inputs.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from pipeline import cluster
from pipeline.export import export
from pipeline.plan import BlockPlan, Plan, make_plan
from pipeline.recipe import Recipe
from storage import journal
from storage.checkpoint import read_json
from storage.fs import open_location
from storage.options import configure
from storage.staging import claim, publish, staging
from storage.writer import FileRecord, put_bytes, put_json

log = logging.getLogger(__name__)
PHASES = ("load", "calibrate", "solve", "write+propagate", "publish")


@dataclass
class RunReport:
    output: str
    recipe_hash: str
    source_bytes: int
    artifact_bytes: int
    blocks: int
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    files: dict[str, FileRecord] = field(default_factory=dict)
    exports: list[str] = field(default_factory=list)


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def assign_linears(block: BlockPlan, workers: int) -> list[list[str]]:
    """Longest solve first onto the least loaded worker: deterministic, cost-balanced."""
    shares: list[list[str]] = [[] for _ in range(workers)]
    load = [0] * workers
    for lin in sorted(block.linears, key=lambda lin: (-lin.solve_cost, lin.name)):
        w = load.index(min(load))
        shares[w].append(lin.name)
        load[w] += lin.solve_cost
    return shares


def sum_in_chunk_order(per_worker: list[dict[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    chunks = {c: h for part in per_worker for c, h in part.items()}
    total: dict[str, np.ndarray] = {}
    for c in sorted(chunks):
        for name, h in chunks[c].items():
            total[name] = h.copy() if name not in total else total[name] + h
    return total


def quantization_config(recipe: Recipe) -> dict:
    s = recipe.scheme
    return {
        "quant_method": "lamina",
        "format": "uniform",
        "algorithm": s.algorithm,
        "bits": s.bits,
        "group_size": s.group_size,
        "sym": s.sym,
        "recipe_hash": recipe.hash(),
    }


class Run:
    """One quantization run: writes into the staging folder `stage` of its claimed output."""

    def __init__(self, plan: Plan, ray: object, runners: list, run_id: str):
        self.plan, self.ray, self.runners, self.run_id = plan, ray, runners, run_id
        self.output = open_location(plan.output_uri)
        self.stage = staging(self.output, run_id)
        recipe = plan.recipe
        n = len(plan.blocks) + 1
        self.report = RunReport(
            output=plan.output_uri,
            recipe_hash=recipe.hash(),
            source_bytes=plan.source_bytes,
            artifact_bytes=0,
            blocks=len(plan.blocks),
        )
        self.shards = [shard_name(i, n) for i in range(n)]
        self.weight_map: dict[str, str] = {}

    def timed(self, phase: str, refs: list) -> list:
        start = time.perf_counter()
        out = cluster.get(self.ray, refs)
        self.report.seconds[phase] += time.perf_counter() - start
        return out

    def record(self, file_and_names: tuple[FileRecord, list[str]]) -> None:
        record, names = file_and_names
        self.report.files[record.name] = record
        self.weight_map.update(dict.fromkeys(names, record.name))

    def set_inputs(self) -> None:
        tokens, chunk = self.plan.calibration, self.plan.recipe.calibration.chunk_size
        chunks = {c: tokens[c * chunk : (c + 1) * chunk] for c in range(-(-len(tokens) // chunk))}
        shares = cluster.split(len(chunks), len(self.runners))
        self.timed(
            "load", [r.set_inputs.remote({c: chunks[c] for c in s}) for r, s in zip(self.runners, shares, strict=True)]
        )

    def begin(self) -> None:
        """The journal's first entry: what this run is, and where its blocks go."""
        recipe = self.plan.recipe
        journal.begin(
            self.output,
            self.run_id,
            recipe_hash=recipe.hash(),
            fingerprint=self.plan.fingerprint,
            blocks=len(self.plan.blocks),
            shards=self.shards,
            workers=len(self.runners),
            started=time.time(),
        )

    def stages(self, block: BlockPlan) -> list[BlockPlan]:
        """The block's linears in solve stages: all at once, or with true_sequential one
        stage per group of linears sharing an input, in the layout's order."""
        scheme = self.plan.recipe.scheme
        if not (scheme.true_sequential and self.plan.needs_calibration):
            return [block] if block.linears else []
        by_name = {lin.name: lin for lin in block.linears}
        stages = [tuple(by_name[name] for name in group if name in by_name) for group in self.plan.layout.groups]
        return [replace(block, linears=linears) for linears in stages if linears]

    def block(self, block: BlockPlan) -> None:
        """Quantize one block, write its shard into staging, and journal it.

        Per stage: calibrate the stage's groups on the block as quantized so far, solve its
        linears spread over the workers, and (when a stage follows) install them."""
        plan, scheme = self.plan, self.plan.recipe.scheme
        before = dict(self.report.seconds)
        self.timed("load", [r.load_block.remote(block.index) for r in self.runners])
        tokens = 0 if plan.calibration is None else plan.calibration.size
        stages = self.stages(block)
        solved_all, installed = [], 0
        for n, stage in enumerate(stages):
            hessians = None
            if plan.needs_calibration:
                groups = sorted({plan.layout.group_of(lin.name) for lin in stage.linears}) if len(stages) > 1 else None
                per_worker = self.timed("calibrate", [r.calibrate.remote(groups) for r in self.runners])
                hessians = self.ray.put(sum_in_chunk_order(per_worker))
            start = time.perf_counter()
            solved = [
                runner.solve.remote(
                    share,
                    hessians,
                    tokens=tokens,
                    algorithm=scheme.algorithm,
                    scheme=scheme.grid,
                    options=scheme.options,
                )
                for runner, share in zip(self.runners, assign_linears(stage, len(self.runners)), strict=True)
                if share
            ]
            self.ray.wait(solved, num_returns=len(solved), fetch_local=False)
            self.report.seconds["solve"] += time.perf_counter() - start
            solved_all += solved
            if n < len(stages) - 1:
                self.timed("calibrate", [r.install.remote(scheme.grid, *solved) for r in self.runners])
                installed = len(solved_all)
        written = self.runners[0].write_block.remote(self.stage.uri, self.shards[block.index], *solved_all)
        last = block.index == len(plan.blocks) - 1
        propagated = []
        if plan.needs_calibration and not last:
            propagated = [r.install.remote(scheme.grid, *solved_all[installed:]) for r in self.runners]
            propagated += [r.forward.remote() for r in self.runners]
        record, names = self.timed("write+propagate", [written, *propagated])[0]
        self.record((record, names))
        seconds = {k: round(v - before[k], 3) for k, v in self.report.seconds.items() if v != before[k]}
        journal.block_done(self.output, self.run_id, block.index, record, tensors=sorted(names), seconds=seconds)

    def finish(self) -> None:
        plan, recipe = self.plan, self.plan.recipe
        start = time.perf_counter()
        copied = self.runners[0].copy_tensors.remote(self.stage.uri, self.shards[-1], list(plan.other_tensors))
        self.record(cluster.get(self.ray, copied))
        source, stage = open_location(plan.source_uri), self.stage
        config = {**read_json(source, "config.json"), "quantization_config": quantization_config(recipe)}
        records = [put_json(stage, "config.json", config)]
        records.append(put_json(stage, "model.safetensors.index.json", {"metadata": {}, "weight_map": self.weight_map}))
        for name in plan.side_files:
            records.append(put_bytes(stage, name, source.read_bytes(name)))
        for r in records:
            self.report.files[r.name] = r
        self.report.artifact_bytes = sum(r.size for r in self.report.files.values())
        publish(
            self.output,
            self.run_id,
            list(self.report.files.values()),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            recipe=recipe.model_dump(mode="json"),
            recipe_hash=self.report.recipe_hash,
            source={"uri": plan.source_uri, "fingerprint": plan.fingerprint},
            versions=versions(),
            seconds={k: round(v, 3) for k, v in self.report.seconds.items()},
        )
        self.report.seconds["publish"] += time.perf_counter() - start


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("lamina", "torch", "transformers", "safetensors", "ray")
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def quantize(recipe: Recipe, *, progress: bool = True) -> RunReport:
    """Plan (all checks before any work), then quantize block by block on Ray, publish,
    and write the recipe's exports from the published artifact."""
    configure(recipe.storage)
    plan = make_plan(recipe)
    ray = cluster.connect(recipe.resources)
    run_id = claim(open_location(plan.output_uri), recipe_hash=recipe.hash(), fingerprint=plan.fingerprint)
    runners = cluster.start_runners(ray, recipe.resources, model_uri=plan.source_uri, layout=plan.layout)
    run = Run(plan, ray, runners, run_id)
    try:
        run.begin()
        if plan.needs_calibration:
            run.set_inputs()
        bar = tqdm(plan.blocks, desc="quantize", unit="block", disable=not progress)
        for block in bar:
            run.block(block)
            bar.set_postfix_str(f"block {block.index} written")
        bar.close()
        run.finish()
    finally:
        for r in runners:
            ray.kill(r)
    for target in recipe.export:
        run.report.exports.append(export(plan.output_uri, target.format, target.output, progress=progress).output)
    return run.report
