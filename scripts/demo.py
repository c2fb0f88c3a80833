"""`make demo`: quantize the fixture model with the demo recipe on a local Ray cluster,
evaluate it and its source on held-out text, and print one table."""

from __future__ import annotations

import argparse
import logging
import shutil
import time

from pipeline import recipe as recipes
from pipeline.driver import quantize
from pipeline.evaluate import evaluate
from pipeline.report import size, table
from storage.fs import open_location
from storage.manifest import verify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="examples/demo.yaml")
    parser.add_argument("--fresh", action="store_true", help="delete an earlier demo artifact first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipe = recipes.load(args.recipe)
    output = open_location(recipe.output)
    if args.fresh and output.exists():
        shutil.rmtree(output.root)
    start = time.perf_counter()
    run = quantize(recipe)
    problems = verify(run.output)
    result = evaluate(run.output, recipe.eval, recipe.resources, against=recipe.model, calibration=recipe.calibration)
    contexts = [
        (
            f"window {c.window}",
            f"perplexity {c.reference['perplexity']:.3f} -> {c.perplexity:.3f} ({c.ppl_increase:+.1%}), "
            f"KL {c.kl:.4f}, top-1 {c.top1:.1%}, rarest decile NLL {c.rare_nll_increase:+.3f}",
        )
        for c in result.contexts
    ]
    rows = [
        ("model", recipe.model),
        (
            "scheme",
            f"{recipe.scheme.algorithm} {recipe.scheme.bits}-bit, group {recipe.scheme.group_size}, "
            f"{'symmetric' if recipe.scheme.sym else 'asymmetric'}",
        ),
        ("workers", f"{recipe.resources.workers} x {recipe.resources.cpus_per_worker} CPU"),
        ("source size", size(run.source_bytes)),
        ("artifact size", size(run.artifact_bytes)),
        ("eval text", f"{recipe.eval.tokens} tokens of {recipe.eval.source} (kernel {result.kernel})"),
        *contexts,
        *((f"time: {phase}", f"{s:6.1f} s") for phase, s in run.seconds.items()),
        ("time: eval (source and artifact)", f"{result.seconds:6.1f} s"),
        ("time: total", f"{time.perf_counter() - start:6.1f} s"),
        ("manifest check", "every file matches" if not problems else "; ".join(problems)),
        ("artifact", run.output),
    ]
    print()
    print(table(rows, "lamina demo"))


if __name__ == "__main__":
    main()
