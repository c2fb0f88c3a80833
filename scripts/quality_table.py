"""Perplexity of schemes under the reference protocol of shared/FIXTURES.md, one row each.

    python scripts/quality_table.py "bits=4,group_size=64" "bits=3,group_size=64,mse=true" ...

Each argument overrides fields of the protocol's scheme (GPTQ w4 g64 sym, act-order);
every row quantizes the fixture model on a local Ray (2 workers), evaluates it, and is
printed (and appended to --out) as a markdown table row as soon as it is done.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HEADER = "| algorithm | bits | group | sym | act-order | static | mse | true-seq | unpackable | ppl | MiB | seconds |"


def value(text: str) -> object:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def row(scheme: dict, ppl: float, nbytes: int, seconds: float) -> str:
    algorithm = scheme["algorithm"] + (f" {scheme['preset']}" if scheme.get("preset") else "")
    cells = [algorithm, scheme["bits"], scheme["group_size"] or "channel", scheme["sym"], scheme["act_order"]]
    cells += [scheme["static_groups"], scheme["mse"], scheme["true_sequential"], scheme["unpackable"]]
    cells += [f"{ppl:.3f}", f"{nbytes / 2**20:.1f}", f"{seconds:.0f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", help='scheme overrides, e.g. "bits=3,group_size=64,mse=true"')
    p.add_argument("--out", type=Path, help="append each finished row to this file")
    args = p.parse_args()

    import ray

    from pipeline.driver import quantize
    from pipeline.evaluate import evaluate
    from pipeline.recipe import parse
    from tests.conftest import recipe_doc

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    print(HEADER)
    with tempfile.TemporaryDirectory(prefix="lamina-quality-") as tmp:
        for n, spec in enumerate(args.rows):
            overrides = dict(item.split("=", 1) for item in spec.split(",") if item)
            recipe = parse(recipe_doc(Path(tmp) / str(n), scheme={k: value(v) for k, v in overrides.items()}))
            start = time.perf_counter()
            report = quantize(recipe, progress=False)
            seconds = time.perf_counter() - start
            ppl = evaluate(report.output, recipe.eval, recipe.resources, progress=False).perplexity
            line = row(recipe.scheme.model_dump(), ppl, report.artifact_bytes, seconds)
            print(line, flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(line + "\n")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
