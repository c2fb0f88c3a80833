"""`lamina release recipe.yaml`: quantize -> eval against the source -> gates -> publish.

The version (the recipe's `output`, e.g. s3://registry/<model>/<version>) is published only
when every gate of the recipe passes, with the eval's summary in its manifest and the full
report (eval.json, eval.md, plots) among its files. A failed gate publishes nothing and
keeps the staged artifact and its report under the output's .lamina/ for inspection.

Safe to schedule: a version already published from the same recipe and source is a no-op
that says so; a second job for the same version while one runs exits at once (the output's
lock); a job that died is resumed by the next one (its lock expires, its journal remains).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.driver import RunReport, locked, staged_run, write_exports
from pipeline.errors import LaminaError
from pipeline.eval_report import render
from pipeline.evaluate import EvalResult, evaluate, parent_uri
from pipeline.plan import open_checkpoint
from pipeline.recipe import Gates, Recipe
from storage.fs import Location, open_location
from storage.manifest import MANIFEST, read_manifest
from storage.options import configure
from storage.writer import put_bytes

log = logging.getLogger(__name__)
GATE_VALUES: dict[str, Callable[[EvalResult], float | None]] = {
    "max_ppl_increase": lambda r: r.contexts[0].ppl_increase,
    "max_kl": lambda r: r.contexts[0].kl,
    "min_top1": lambda r: r.contexts[0].top1,
    "max_rare_nll_increase": lambda r: r.contexts[0].rare_nll_increase,
    "max_long_ppl_increase": lambda r: r.contexts[-1].ppl_increase,
}


@dataclass
class ReleaseReport:
    output: str
    status: str  # "published", "unchanged" (already published from this recipe and source) or "blocked"
    run: RunReport | None = None
    eval: dict | None = None  # the eval.json document
    gates: dict[str, dict] = field(default_factory=dict)  # name -> {"limit", "value", "passed"}
    report: str = ""  # URI of the folder holding eval.md

    @property
    def failed(self) -> list[str]:
        return [name for name, g in self.gates.items() if not g["passed"]]


def check_gates(gates: Gates | None, result: EvalResult) -> dict[str, dict]:
    """Each gate the recipe sets, with the measured value and whether it passed."""
    out = {}
    for name, limit in (gates.model_dump() if gates else {}).items():
        if limit is None:
            continue
        value = GATE_VALUES[name](result)
        passed = value is not None and (value >= limit if name.startswith("min_") else value <= limit)
        out[name] = {"limit": limit, "value": value, "passed": passed}
    return out


def summary(result: EvalResult, gates: dict[str, dict]) -> dict:
    """The eval as the manifest (and `lamina ls`) carries it."""
    short, long = result.contexts[0], result.contexts[-1]
    out = {
        "perplexity": short.perplexity,
        "source_perplexity": short.reference["perplexity"],
        "ppl_increase": short.ppl_increase,
        "kl": short.kl,
        "top1": short.top1,
        "rare_nll_increase": short.rare_nll_increase,
        "window": short.window,
        "long_window": long.window,
        "long_perplexity": long.perplexity,
        "long_ppl_increase": long.ppl_increase,
        "tokens": result.data["tokens"],
        "kernel": result.kernel,
    }
    out = {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}
    return {**out, "gates": "passed" if all(g["passed"] for g in gates.values()) else "failed"}


def already_published(output: Location, recipe: Recipe) -> bool:
    """True when the version holds this recipe's artifact of this source; an error when it
    holds another one."""
    if not output.exists(MANIFEST):
        return False
    doc = read_manifest(output.uri)
    fingerprint = open_checkpoint(recipe.model).fingerprint
    if doc.get("recipe_hash") == recipe.hash() and (doc.get("source") or {}).get("fingerprint") == fingerprint:
        return True
    raise LaminaError(
        f"{output.uri} already holds a version from another recipe or source "
        f"(recipe {str(doc.get('recipe_hash'))[:16]}); release to a new version URI"
    )


def release(recipe: Recipe, *, progress: bool = True) -> ReleaseReport:
    if recipe.eval is None:
        raise LaminaError("release: the recipe needs an eval section (what to measure before publishing)")
    if recipe.gates is None:
        log.warning("release: the recipe sets no gates; the version is published whatever the eval measures")
    configure(recipe.storage)
    output = open_location(recipe.output)
    if already_published(output, recipe):
        return ReleaseReport(output.uri, "unchanged", report=output.uri)
    with locked(output, "release") as lease:
        if already_published(output, recipe):  # published by the job that held the lock before us
            return ReleaseReport(output.uri, "unchanged", report=output.uri)
        run = staged_run(recipe, lease=lease, progress=progress)
        result = evaluate(
            run.stage.uri,
            recipe.eval,
            recipe.resources,
            against=run.plan.source_uri,
            calibration=recipe.calibration,
            cache_uri=f"{parent_uri(output.uri)}/.lamina-cache/reference",
            progress=progress,
        )
        gates = check_gates(recipe.gates, result)
        doc = {**result.as_json(), "model": output.uri, "gates": gates or None}
        events = [json.loads(line) for line in run.events.lines]
        files = [put_bytes(run.stage, name, data) for name, data in render(doc, events).items()]
        report = ReleaseReport(output.uri, "blocked", run=run.report, eval=doc, gates=gates, report=run.stage.uri)
        if report.failed:
            run.events.emit("release_blocked", gates=gates)
            return report
        run.publish(files, eval=summary(result, gates))
        report.status, report.report = "published", output.uri
    write_exports(recipe, run, progress=progress)
    return report
