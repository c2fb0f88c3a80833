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
    quantized = evaluate(run.output, recipe.eval, recipe.resources)
    source = evaluate(recipe.model, recipe.eval, recipe.resources)
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
        ("perplexity before", f"{source.perplexity:.3f}  ({source.tokens} tokens of {recipe.eval.source})"),
        ("perplexity after", f"{quantized.perplexity:.3f}"),
        *((f"time: {phase}", f"{s:6.1f} s") for phase, s in run.seconds.items()),
        ("time: eval (both)", f"{quantized.seconds + source.seconds:6.1f} s"),
        ("time: total", f"{time.perf_counter() - start:6.1f} s"),
        ("manifest check", "every file matches" if not problems else "; ".join(problems)),
        ("artifact", run.output),
    ]
    print()
    print(table(rows, "lamina demo"))


if __name__ == "__main__":
    main()
