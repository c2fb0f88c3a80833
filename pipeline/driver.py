"""The Ray driver of a quantization run. It holds plans, object references and small
records, never model weights or Hessians: workers load, calibrate, solve, write and
propagate.

Per block i: every worker loads block i by range reads and runs its chunks through it,
folding the chunks' Hessians into subtrees of one fixed tree over all chunks; one worker
folds the subtrees into the block's Hessians (workers.chunk_sum: the same bits for any
number of workers); the block's linears, and row ranges of large ones, are solved spread
over the workers, balanced by the planner's cost estimates; one worker writes the shard
into staging and the driver journals it; all install the quantized block and run their
chunks through it to make block i+1's inputs.

A run survives: re-running the same recipe on the same output resumes after the last
journaled block (inputs rebuilt by running the chunks through the staged blocks), with any
number of workers; a worker or node lost mid-block costs that block, whose chunks move to
the surviving workers. Both give the bytes of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from pipeline import cluster
from pipeline.balance import balance
from pipeline.cluster import WorkerLostError
from pipeline.codebook_fit import fit_codebooks
from pipeline.errors import LaminaError
from pipeline.export import export
from pipeline.plan import BlockPlan, Plan, SolveTask, make_plan
from pipeline.recipe import Experts, Recipe
from storage import journal
from storage.checkpoint import read_json
from storage.fs import Location, StorageError, open_location
from storage.journal import CLAIM, CONTROL
from storage.lock import Lease, acquire
from storage.manifest import MANIFEST
from storage.options import configure
from storage.staging import claim, publish, staging
from storage.writer import FileRecord, put_bytes, put_json
from workers.block import StagedBlocks, peak_rss

log = logging.getLogger(__name__)
PHASES = ("load", "calibrate", "solve", "write+propagate", "publish")
EVENTS = "lamina-events.jsonl"  # the run's event log, as published in the artifact


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
    resumed: int = 0  # blocks taken from the journal of an earlier attempt
    workers_lost: int = 0
    retries: int = 0  # blocks redone after losing workers
    workers: int = 0  # at the start
    events: str = ""  # URI of the run's event log, published with the artifact
    driver_peak_rss: int = 0  # bytes
    worker_peak_rss: list[int] = field(default_factory=list)  # bytes, the workers alive at the end
    expert_tokens: dict[int, dict[str, int]] = field(default_factory=dict)  # block -> expert group -> routed tokens
    under_calibrated: list[dict] = field(default_factory=list)  # {block, group, tokens, action} per expert group


@dataclass(frozen=True)
class Worker:
    name: str
    handle: object


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


NATIVE_FORMATS = {"quip": "incoherent", "vptq": "vector", "aqlm": "codebook"}  # by algorithm; else uniform


def quantization_config(recipe: Recipe) -> dict:
    s = recipe.scheme
    if s.float_preset:
        return {"quant_method": "lamina", "algorithm": s.algorithm, **s.format.fields(), "recipe_hash": recipe.hash()}
    if s.algorithm in NATIVE_FORMATS:
        return {
            "quant_method": "lamina",
            "format": NATIVE_FORMATS[s.algorithm],
            "algorithm": s.algorithm,
            **s.format.fields(),
            "recipe_hash": recipe.hash(),
        }
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

    def __init__(
        self, plan: Plan, pool: cluster.Pool, run_id: str, *, progress: bool = True, lease: Lease | None = None
    ):
        self.plan, self.ray, self.pool, self.run_id, self.progress = plan, pool.ray, pool, run_id, progress
        self.lease = lease
        self.output = open_location(plan.output_uri)
        self.stage = staging(self.output, run_id)
        self.events = journal.EventLog(self.output, run_id)
        names = cluster.get(self.ray, [r.whoami.remote() for r in pool.runners])
        self.workers = [Worker(f"w{i}:{name}", r) for i, (name, r) in enumerate(zip(names, pool.runners, strict=True))]
        recipe = plan.recipe
        n = len(plan.blocks) + 1
        self.report = RunReport(
            output=plan.output_uri,
            recipe_hash=recipe.hash(),
            source_bytes=plan.source_bytes,
            artifact_bytes=0,
            blocks=len(plan.blocks),
            workers=len(self.workers),
            events=f"{self.output.uri}/{EVENTS}",
        )
        self.shards = [shard_name(i, n) for i in range(n)]
        self.weight_map: dict[str, str] = {}
        self.chunks = 0 if plan.calibration is None else -(-len(plan.calibration) // recipe.calibration.chunk_size)
        self.fp = plan.needs_calibration and recipe.calibration.propagation == "fp"

    # ---- bookkeeping --------------------------------------------------------------
    @property
    def runners(self) -> list:
        return [w.handle for w in self.workers]

    def timed(self, phase: str, refs: list) -> list:
        start = time.perf_counter()
        out = cluster.get(self.ray, refs)
        self.report.seconds[phase] += time.perf_counter() - start
        return out

    def record(self, record: FileRecord, names: list[str]) -> None:
        self.report.files[record.name] = record
        self.weight_map.update(dict.fromkeys(names, record.name))

    def chunk_tokens(self, chunks: list[int]) -> dict:
        tokens, size = self.plan.calibration, self.plan.recipe.calibration.chunk_size
        return {c: tokens[c * size : (c + 1) * size] for c in chunks}

    def staged(self, blocks: int) -> StagedBlocks | None:
        """The first `blocks` finished blocks, as a worker's inputs must pass through them."""
        if not blocks:
            return None
        return StagedBlocks(self.stage.uri, tuple(self.shards[:blocks]), self.plan.recipe.scheme.format)

    def set_inputs(self, at: int) -> None:
        """Every worker a contiguous share of the chunks, as inputs of block `at`."""
        shares = cluster.split(self.chunks, len(self.workers))
        staged = self.staged(at)
        tokens = [self.chunk_tokens(list(s)) for s in shares]
        self.timed("load", [r.set_inputs.remote(t, staged) for r, t in zip(self.runners, tokens, strict=True)])

    def start(self) -> list[BlockPlan]:
        """Journal the run (first attempt) or take the finished blocks from its journal
        (a re-run of the same recipe on the same output); returns the blocks to do."""
        recipe = self.plan.recipe
        entries = journal.journal(self.output, self.run_id)
        if not entries.exists("run.json"):
            journal.begin(
                self.output,
                self.run_id,
                recipe_hash=recipe.hash(),
                fingerprint=self.plan.fingerprint,
                blocks=len(self.plan.blocks),
                shards=self.shards,
                started=time.time(),
            )
        done = journal.finished(self.output, self.run_id, self.stage)
        if not self.fp:  # blocks depend on the ones before them: resume after the finished prefix
            prefix = next((b.index for b in self.plan.blocks if b.index not in done), len(self.plan.blocks))
            done = {i: e for i, e in done.items() if i < prefix}
        for entry in done.values():
            self.record(FileRecord(**entry["file"]), entry["tensors"])
        self.report.resumed = len(done)
        self.events.emit(
            "run_resumed" if done else "run_started",
            run_id=self.run_id,
            blocks=len(self.plan.blocks),
            finished=sorted(done),
            workers=[w.name for w in self.workers],
            calibration_qa=self.plan.calibration_qa,
        )
        return [b for b in self.plan.blocks if b.index not in done]

    # ---- losing workers -----------------------------------------------------------
    def recover(self, at: int, error: str) -> None:
        """Drop the workers that are gone and give their chunks, as inputs of block `at`,
        to the survivors (which keep the chunks they hold at `at`)."""
        alive, states = [], {}
        for w in self.workers:
            try:
                states[w.name] = cluster.get(self.ray, w.handle.state.remote())
                alive.append(w)
            except WorkerLostError:
                self.report.workers_lost += 1
                self.events.emit("worker_lost", block=at, worker=w.name, error=error)
        if not alive:
            raise LaminaError(f"block {at}: every worker was lost ({error})")
        self.workers = alive
        if not self.chunks or self.fp:  # fp propagation restarts its pass from set_inputs(0)
            return
        kept = {w.name: set(states[w.name][1]) for w in alive if states[w.name][0] == at}
        orphans = sorted(set(range(self.chunks)) - set().union(*kept.values()))
        staged = self.staged(at)
        calls = []
        for w, share in zip(alive, cluster.split(len(orphans), len(alive)), strict=True):
            tokens = self.chunk_tokens([orphans[k] for k in share])
            if w.name in kept:
                calls.append(w.handle.add_inputs.remote(tokens, staged))
            else:
                calls.append(w.handle.set_inputs.remote(tokens, staged))
        self.timed("load", calls)
        self.events.emit("chunks_moved", block=at, chunks=orphans, workers=[w.name for w in alive])

    def attempt(self, what: str, at: int, step) -> object:
        """step(), redone after recovering from lost workers, up to resources.max_retries."""
        retries = self.plan.recipe.resources.max_retries
        for attempt in range(retries + 1):
            try:
                return step()
            except WorkerLostError as e:
                if attempt == retries:
                    raise LaminaError(f"{what}: workers lost {retries + 1} times, last: {e}") from None
                self.report.retries += 1
                self.recover(at, str(e))
        raise AssertionError("unreachable")

    # ---- sequential propagation ---------------------------------------------------
    def stages(self, block: BlockPlan) -> list[BlockPlan]:
        """The block's linears in solve stages: all at once, or with true_sequential one
        stage per group of linears sharing an input, in the layout's order."""
        scheme = self.plan.recipe.scheme
        if not (scheme.true_sequential and self.plan.needs_calibration):
            return [block] if block.linears else []
        by_name = {lin.name: lin for lin in block.linears}
        stages = [tuple(by_name[name] for name in group if name in by_name) for group in self.plan.layout.groups]
        return [replace(block, linears=linears) for linears in stages if linears]

    def hessians(self, groups: list[str] | None) -> object:
        """A reference to the block's Hessians, folded on the first worker; never fetched here."""
        scheme = self.plan.recipe.scheme  # AWQ, SmoothQuant and static activation scales need |x| per channel
        channels = scheme.smoothing is not None or getattr(scheme.format, "static_activations", False)
        parts = [r.calibrate.remote(self.chunks, groups, None, channels) for r in self.runners]
        folded = self.runners[0].reduce.remote(self.chunks, *parts)
        start = time.perf_counter()
        self.ray.wait([folded], fetch_local=False)
        self.report.seconds["calibrate"] += time.perf_counter() - start
        return folded

    def experts(self, block: int, hessians: object) -> tuple[object, tuple[str, ...]]:
        """A MoE block's expert groups that the router sent fewer than experts.min_tokens
        calibration tokens, handled as the recipe says (see pipeline.recipe.Experts) and
        recorded in the report and the event log: (the Hessians to solve with, the groups
        to round to nearest). A dense block's Hessians pass through."""
        layout = self.plan.layout
        if not layout.moe:
            return hessians, ()
        policy = self.plan.recipe.experts or Experts()
        counts = cluster.get(self.ray, self.runners[0].token_counts.remote(hessians))
        self.report.expert_tokens.setdefault(block, {}).update(counts)
        under = {group: n for group, n in sorted(counts.items()) if n < policy.min_tokens}
        self.events.emit("experts_calibrated", block=block, tokens=counts, under=sorted(under))
        if not under:
            return hessians, ()
        action = policy.under_calibrated
        if action == "error":
            names = ", ".join(f"{group} ({n})" for group, n in under.items())
            raise LaminaError(
                f"block {block}: experts reached by fewer than {policy.min_tokens} calibration tokens: {names}; "
                "give more calibration samples, or set experts.under_calibrated to rtn or all_tokens"
            )
        for group, n in under.items():
            self.report.under_calibrated.append({"block": block, "group": group, "tokens": n, "action": action})
        log.warning("block %d: %d expert groups under-calibrated (%s)", block, len(under), action)
        if action == "rtn":
            return hessians, tuple(under)
        chosen = sorted({layout.expert_of(group) for group in under})
        parts = [r.calibrate.remote(self.chunks, list(under), chosen) for r in self.runners]
        again = self.runners[0].reduce.remote(self.chunks, *parts)
        merged = self.runners[0].merge.remote(hessians, again)
        start = time.perf_counter()
        self.ray.wait([merged], fetch_local=False)
        self.report.seconds["calibrate"] += time.perf_counter() - start
        return merged, ()

    def smooth(self, block: int, hessians: object, runners: list, *, wait: bool = True) -> None:
        """AWQ / SmoothQuant: each smoothed group's input scale found on one of `runners`
        (round robin), then folded into the loaded block on all of them; with `wait`, the
        chosen alphas recorded in the event log."""
        scheme = self.plan.recipe.scheme
        if scheme.smoothing is None:
            return
        method, config = scheme.smoothing
        groups = [group for _, group in self.plan.layout.smooth]
        tokens = self.plan.calibration.size
        found = [
            runner.smooth_search.remote(
                block,
                groups[k :: len(runners)],
                hessians,
                tokens=tokens,
                method=method,
                config=config,
                scheme=scheme.format,
            )
            for k, runner in enumerate(runners[: len(groups)])
        ]
        done = [runner.smooth.remote(block, method, *found) for runner in runners]
        if not wait:
            return
        self.timed("solve", done)
        chosen = {g: v for part in cluster.get(self.ray, found) for g, v in part.items()}
        scales = {
            g: {"alpha": a} | ({} if r is None else {"loss_ratio": round(r, 6)}) for g, (_, a, r) in chosen.items()
        }
        self.events.emit("block_smoothed", block=block, method=method, groups=scales)

    def solve(
        self, block: int, tasks: list[SolveTask], hessians: object, runners: list, rtn: tuple[str, ...] = ()
    ) -> list:
        """The tasks spread over `runners` by cost; references to their solved pieces (the
        linears of the groups in `rtn` rounded to nearest)."""
        scheme = self.plan.recipe.scheme
        tokens = 0 if self.plan.calibration is None else self.plan.calibration.size
        if scheme.codebook:  # row pieces that share codebooks: fit together, driven from here
            return fit_codebooks(
                self.ray, runners, block, tasks, hessians, tokens=tokens, scheme=scheme.format, config=scheme.options
            )
        shares = balance([t.cost for t in tasks], len(runners))
        return [
            runner.solve.remote(
                block,
                [(tasks[k].linear, tasks[k].first, tasks[k].last) for k in share],
                hessians,
                tokens=tokens,
                algorithm=scheme.algorithm,
                scheme=scheme.format,
                options=scheme.options,
                rtn=rtn,
            )
            for runner, share in zip(runners, shares, strict=True)
            if share
        ]

    def tasks(self, block: BlockPlan) -> list[SolveTask]:
        return [t for lin in block.linears for t in lin.pieces(self.plan.recipe.scheme.piece_rows)]

    def block(self, block: BlockPlan) -> tuple[FileRecord, list[str], dict[str, float]]:
        """Quantize one block and write its shard into staging.

        Per stage: calibrate the stage's groups on the block as quantized so far, solve its
        linears spread over the workers, and (when a stage follows) install them."""
        plan, scheme = self.plan, self.plan.recipe.scheme
        self.timed("load", [r.load_block.remote(block.index) for r in self.runners])
        stages = self.stages(block)
        solved_all, installed = [], 0
        for n, stage in enumerate(stages):
            hessians, rtn = None, ()
            if plan.needs_calibration:
                groups = sorted({plan.layout.group_of(lin.name) for lin in stage.linears}) if len(stages) > 1 else None
                hessians, rtn = self.experts(block.index, self.hessians(groups))
                self.smooth(block.index, hessians, self.runners)
            start = time.perf_counter()
            solved = self.solve(block.index, self.tasks(stage), hessians, self.runners, rtn)
            self.ray.wait(solved, num_returns=len(solved), fetch_local=False)
            self.report.seconds["solve"] += time.perf_counter() - start
            solved_all += solved
            if n < len(stages) - 1:
                self.timed("calibrate", [r.install.remote(scheme.format, *solved) for r in self.runners])
                installed = len(solved_all)
        written = self.runners[0].write_block.remote(
            self.stage.uri, self.shards[block.index], *solved_all, fmt=scheme.format
        )
        last = block.index == len(plan.blocks) - 1
        propagated = []
        if plan.needs_calibration and not last:
            propagated = [r.install.remote(scheme.format, *solved_all[installed:]) for r in self.runners]
            propagated += [r.forward.remote() for r in self.runners]
        return self.timed("write+propagate", [written, *propagated])[0]

    def finished(
        self, block: BlockPlan, written: tuple[FileRecord, list[str], dict[str, float]], before: dict, writer: str
    ) -> None:
        if self.lease is not None:
            self.lease.check()  # another job took the output over (this one stalled past the lock's ttl): stop
        record, names, errors = written
        self.record(record, names)
        seconds = {k: round(v - before[k], 3) for k, v in self.report.seconds.items() if v != before[k]}
        journal.block_done(self.output, self.run_id, block.index, record, tensors=sorted(names), seconds=seconds)
        self.events.emit(
            "block_finished",
            block=block.index,
            seconds=seconds,
            bytes=record.size,
            sha256=record.sha256,
            error={k: round(v, 8) for k, v in errors.items()},
            writer=writer,
            workers=[w.name for w in self.workers],
        )

    def sequential(self, todo: list[BlockPlan], bar: tqdm) -> None:
        if self.chunks:
            self.attempt("calibration inputs", todo[0].index, lambda: self.set_inputs(todo[0].index))
        for block in todo:
            before = dict(self.report.seconds)
            self.events.emit("block_started", block=block.index, workers=[w.name for w in self.workers])
            written = self.attempt(f"block {block.index}", block.index, lambda block=block: self.block(block))
            self.finished(block, written, before, self.workers[0].name)
            bar.update()
            took = sum(v - before[k] for k, v in self.report.seconds.items())
            bar.set_postfix_str(f"block {block.index}: {took:.1f} s")

    # ---- fp propagation -----------------------------------------------------------
    def all_at_once(self, todo: list[BlockPlan], bar: tqdm) -> None:
        """Every block's Hessians from the unquantized model in one pass, then every
        block solved and written at once, each block by one worker."""
        left = list(todo)
        self.attempt("fp propagation", 0, lambda: self._all_at_once(left, bar))

    def _all_at_once(self, left: list[BlockPlan], bar: tqdm) -> None:
        self.set_inputs(0)
        last = max(b.index for b in left)
        wanted = {b.index for b in left}
        hessians, rtn = {}, {}
        for block in self.plan.blocks[: last + 1]:
            self.timed("load", [r.load_block.remote(block.index) for r in self.runners])
            if block.index in wanted:
                self.events.emit("block_started", block=block.index, workers=[w.name for w in self.workers])
                hessians[block.index], rtn[block.index] = self.experts(block.index, self.hessians(None))
            if block.index < last:
                self.timed("calibrate", [r.forward.remote() for r in self.runners])
        cluster.get(self.ray, [r.set_inputs.remote({}) for r in self.runners])  # the pass's inputs are no longer needed
        start, before = time.perf_counter(), dict(self.report.seconds)
        costs = [sum(t.cost for t in self.tasks(b)) for b in left]
        pending = {}
        for w, share in zip(self.workers, balance(costs, len(self.workers)), strict=True):
            for k in share:
                block = left[k]
                w.handle.load_block.remote(block.index)
                self.smooth(block.index, hessians[block.index], [w.handle], wait=False)
                solved = self.solve(block.index, self.tasks(block), hessians[block.index], [w.handle], rtn[block.index])
                fmt = self.plan.recipe.scheme.format
                written = w.handle.write_block.remote(self.stage.uri, self.shards[block.index], *solved, fmt=fmt)
                pending[written] = (block, w)
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            block, w = pending.pop(ready[0])
            written = cluster.get(self.ray, ready[0])
            self.report.seconds["solve"] += time.perf_counter() - start
            start = time.perf_counter()
            self.finished(block, written, before, w.name)
            before = dict(self.report.seconds)
            left.remove(block)
            bar.update()

    # ---- publishing ---------------------------------------------------------------
    def finish(self) -> None:
        """Stage everything beside the blocks (tensors outside them, config, index, side
        files, the event log): the staging folder is then a whole artifact, not yet published."""
        plan, recipe = self.plan, self.plan.recipe
        start = time.perf_counter()
        copied = self.runners[0].copy_tensors.remote(self.stage.uri, self.shards[-1], list(plan.other_tensors))
        self.record(*cluster.get(self.ray, copied))
        source, stage = open_location(plan.source_uri), self.stage
        config = {**read_json(source, "config.json"), "quantization_config": quantization_config(recipe)}
        records = [put_json(stage, "config.json", config)]
        records.append(put_json(stage, "model.safetensors.index.json", {"metadata": {}, "weight_map": self.weight_map}))
        for name in plan.side_files:
            records.append(put_bytes(stage, name, source.read_bytes(name)))
        for r in records:
            self.report.files[r.name] = r
        self.report.worker_peak_rss = cluster.get(self.ray, [r.peak_rss.remote() for r in self.runners])
        self.report.driver_peak_rss = peak_rss()
        self.events.emit(
            "run_finished",
            seconds={k: round(v, 3) for k, v in self.report.seconds.items()},
            driver_peak_rss=self.report.driver_peak_rss,
            worker_peak_rss=dict(zip([w.name for w in self.workers], self.report.worker_peak_rss, strict=True)),
            under_calibrated=self.report.under_calibrated,
        )
        events = self.events.location.read_bytes(journal.EVENTS)
        self.report.files[EVENTS] = put_bytes(stage, EVENTS, events)  # published beside the weights
        self.report.artifact_bytes = sum(r.size for r in self.report.files.values())
        self.report.seconds["publish"] += time.perf_counter() - start

    def publish(self, extra: list[FileRecord] = (), **fields: object) -> None:
        """Copy the staged files (and `extra` files written into staging) into place and
        write the manifest last, with `fields` added to it."""
        plan, start = self.plan, time.perf_counter()
        if self.lease is not None:
            self.lease.check()  # never publish on a lock another job has taken over
            self.lease.stop()  # publishing removes .lamina/ with the lock: no heartbeat may write it again
        for record in extra:
            self.report.files[record.name] = record
        self.report.artifact_bytes = sum(r.size for r in self.report.files.values())
        publish(
            self.output,
            self.run_id,
            list(self.report.files.values()),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            recipe=plan.recipe.model_dump(mode="json"),
            recipe_hash=self.report.recipe_hash,
            source={"uri": plan.source_uri, "fingerprint": plan.fingerprint},
            versions=versions(),
            seconds={k: round(v, 3) for k, v in self.report.seconds.items()},
            **fields,
        )
        self.report.seconds["publish"] += time.perf_counter() - start

    def execute(self) -> None:
        todo = self.start()
        blocks = len(self.plan.blocks)
        bar = tqdm(total=blocks, initial=self.report.resumed, desc="quantize", unit="block", disable=not self.progress)
        try:
            if todo and self.fp:
                self.all_at_once(todo, bar)
            elif todo:
                self.sequential(todo, bar)
        finally:
            bar.close()
        self.finish()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("lamina", "torch", "transformers", "safetensors", "ray")
    return {"python": platform.python_version(), **{n: version(n) for n in names}}


def staged_run(recipe: Recipe, *, lease: Lease, progress: bool = True) -> Run:
    """Plan (all checks before any work), then quantize block by block on Ray, resuming what
    an earlier attempt of the same recipe on the same output finished, into staging: the
    returned run's staging folder holds the whole artifact, not yet published."""
    plan = make_plan(recipe)
    ray = cluster.connect(recipe.resources)
    pool = cluster.start_runners(ray, recipe.resources, model_uri=plan.source_uri, layout=plan.layout)
    try:
        run_id = claim(open_location(plan.output_uri), recipe_hash=recipe.hash(), fingerprint=plan.fingerprint)
        run = Run(plan, pool, run_id, progress=progress, lease=lease)
        try:
            run.execute()
        except Exception as e:
            with contextlib.suppress(StorageError):  # the store may be what failed: keep the first error
                run.events.emit("error", error=f"{type(e).__name__}: {e}")
            raise
    finally:
        pool.release()
    return run


def write_exports(recipe: Recipe, run: Run, *, progress: bool = True) -> None:
    for target in recipe.export:
        report = export(
            run.plan.output_uri, target.format, target.output, progress=progress, gguf_type=target.gguf_type
        )
        run.report.exports.append(report.output)


def quantize(recipe: Recipe, *, progress: bool = True) -> RunReport:
    """Quantize into staging under the output's lock (one job per output at a time; a dead
    job's lock expires), publish, and write the recipe's exports from the published artifact."""
    configure(recipe.storage)
    output = open_location(recipe.output)
    if output.exists(MANIFEST):
        raise LaminaError(f"output {output.uri} already holds a published artifact; choose a new output URI")
    with locked(output, "quantize") as lease:
        run = staged_run(recipe, lease=lease, progress=progress)
        run.publish()
    write_exports(recipe, run, progress=progress)
    return run.report


@contextlib.contextmanager
def locked(output: Location, what: str) -> Iterator[Lease]:
    """The output's lock for one job. A job that fails before claiming the output (a bad
    recipe, no room on the cluster) leaves no trace: its lock and the folder it made go."""
    lease = acquire(output, what=what)
    try:
        yield lease
    except BaseException:
        if not output.exists(CLAIM):  # removed while still held: no other job is inside
            lease.stop()
            output.remove(CONTROL)
            if not output.list_files():
                output.remove()
            raise
        lease.release()
        raise
    lease.release()
