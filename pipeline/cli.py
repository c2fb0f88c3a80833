"""`lamina`: quantize, release, submit, export, eval, plan, bench, verify, status and ls. Errors are one line on
stderr and exit code 2; a release blocked by its gates exits 1."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable

from pipeline.errors import LaminaError
from pipeline.report import size, table
from storage import StorageError


def cmd_quantize(args: argparse.Namespace) -> int:
    from pipeline import recipe as recipes
    from pipeline.driver import quantize

    recipe = recipes.load(args.recipe)
    if args.workers:
        recipe = recipe.model_copy(update={"resources": recipe.resources.model_copy(update={"workers": args.workers})})
    report = quantize(recipe, progress=not args.quiet)
    rows = [
        ("artifact", report.output),
        ("recipe hash", report.recipe_hash[:16]),
        ("blocks", f"{report.blocks} ({report.resumed} done by an earlier attempt)"),
        ("workers", f"{report.workers} ({report.workers_lost} lost, {report.retries} blocks redone)"),
        ("source size", size(report.source_bytes)),
        ("artifact size", size(report.artifact_bytes)),
        *((f"{phase} seconds", f"{s:.1f}") for phase, s in report.seconds.items()),
        *(("export", uri) for uri in report.exports),
        *(
            (f"under-calibrated {u['group']}", f"block {u['block']}: {u['tokens']} tokens, {u['action']}")
            for u in report.under_calibrated
        ),
        ("event log", report.events),
    ]
    print(table(rows, "lamina quantize: done"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export

    report = export(args.artifact, args.format, args.dest, progress=not args.quiet, gguf_type=args.gguf_type)
    rows = [
        ("export", report.output),
        ("format", report.format),
        *(("file", name) for name in report.files if name.endswith(".gguf")),
        ("quantized linears", str(report.linears)),
        ("size", size(report.nbytes)),
        ("seconds", f"{report.seconds:.1f}"),
    ]
    print(table(rows, "lamina export: done"))
    return 0


def eval_data(args: argparse.Namespace, artifact: str):
    """The eval section of the artifact's recipe (or --data), flags over it; the recipe's
    calibration, for the held-out check; the resources."""
    from pipeline.recipe import EvalData, Recipe, Resources
    from storage.manifest import read_manifest

    saved = None
    try:
        saved = Recipe.model_validate(read_manifest(artifact)["recipe"])
    except StorageError:
        if args.data is None:
            raise
    if args.data is None and saved.eval is None:
        raise LaminaError(f"{artifact}: its recipe names no eval data; pass --data URI")
    base = saved.eval if args.data is None else EvalData(source=args.data)
    given = {
        "glob": args.glob,
        "tokens": args.tokens,
        "window": args.window,
        "long_window": args.long_window,
        "kernel": args.kernel,
    }
    update = {k: v for k, v in given.items() if v is not None}
    resources = Resources(workers=args.workers or (saved.resources.workers if saved else 2))
    calibration = saved.calibration if saved is not None else None
    return base.model_copy(update=update), resources, calibration


def eval_table(doc: dict) -> list[tuple[str, str]]:
    rows = []
    for c in doc["contexts"]:
        line = f"perplexity {c['perplexity']:.3f} over {c['tokens']} tokens"
        if c["reference"] is not None:
            line += (
                f"; source {c['reference']['perplexity']:.3f} ({c['ppl_increase']:+.2%}), KL {c['kl']:.4f}, "
                f"top-1 {c['top1']:.2%}, rare-decile NLL {c['rare_nll_increase']:+.3f}"
            )
        rows.append((f"window {c['window']}", line))
    return rows


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from pipeline.eval_report import render
    from pipeline.evaluate import evaluate
    from storage.fs import open_location
    from storage.writer import put_bytes

    data, resources, calibration = eval_data(args, args.artifact)
    result = evaluate(
        args.artifact, data, resources, against=args.against, calibration=calibration, progress=not args.quiet
    )
    doc = result.as_json()
    artifact = open_location(args.artifact)
    events = []
    if artifact.exists("lamina-events.jsonl"):
        events = [json.loads(line) for line in artifact.read_bytes("lamina-events.jsonl").decode().splitlines()]
    report = open_location(args.report or f"{artifact.uri}/eval")
    for name, content in render(doc, events).items():
        put_bytes(report, name, content)
    title = f"lamina eval: {result.model} (kernel {result.kernel}, {result.seconds:.0f} s)"
    rows = [*eval_table(doc), ("report", f"{report.uri}/eval.md")]
    print(table(rows, f"{title}\n  text {data.source} ({data.tokens} tokens)"))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from pipeline import recipe as recipes
    from pipeline.eval_report import GATE_LABELS
    from pipeline.release import release

    recipe = recipes.load(args.recipe)
    if args.workers:
        recipe = recipe.model_copy(update={"resources": recipe.resources.model_copy(update={"workers": args.workers})})
    report = release(recipe, progress=not args.quiet)
    if report.status == "unchanged":
        print(f"lamina release: {report.output} is already published from this recipe and source; nothing to do")
        return 0
    rows = [(GATE_LABELS.get(n, n), f"{g['value']:.6g} (limit {g['limit']:g}): {'pass' if g['passed'] else 'FAIL'}")
            for n, g in report.gates.items()]  # fmt: skip
    rows = [*eval_table(report.eval), *rows, ("report", f"{report.report}/eval.md")]
    if report.status == "blocked":
        failing = ", ".join(f"{n} {report.gates[n]['value']:.6g} > limit {report.gates[n]['limit']:g}"
                            if not n.startswith("min_") else
                            f"{n} {report.gates[n]['value']:.6g} < limit {report.gates[n]['limit']:g}"
                            for n in report.failed)  # fmt: skip
        print(table(rows, f"lamina release: {report.output} NOT published: gates failed"))
        print(f"lamina: gates failed: {failing}; staged artifact kept in {report.report}", file=sys.stderr)
        return 1
    print(table([("version", report.output), *rows], "lamina release: published"))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import prepare, submit

    sub = prepare(
        args.recipe,
        command=args.command_,
        address=args.address,
        working_dir=args.working_dir,
        submission_id=args.submission_id,
        workers=args.workers,
        quiet=args.quiet,
    )
    return submit(sub, wait=not args.no_wait)


def cmd_bench(args: argparse.Namespace) -> int:
    from kernels import bench

    return bench.main(args)


def cmd_bench_profile(args: argparse.Namespace) -> int:
    from pipeline.estimate import locate, measure_profile

    profile = measure_profile(args.device, args.size, args.price)
    print(profile.to_json())
    if args.save:
        where, name = locate(args.save)
        where.write_bytes(name, profile.to_json().encode())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from storage.manifest import verify

    problems = verify(args.artifact)
    for p in problems:
        print(f"{args.artifact}: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"{args.artifact}: every file matches the manifest")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from storage.registry import list_versions

    found = list_versions(args.registry)
    if not found:
        print(f"no published versions under {args.registry}")
        return 0
    for v in found:
        scores = " ".join(f"{k}={val}" for k, val in sorted(v.scores.items())) or "no eval yet"
        print(f"{v.model}/{v.version}  {v.scheme}  {size(v.nbytes)}  {v.created}  {scores}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from storage import journal
    from storage.fs import open_location
    from storage.manifest import MANIFEST, read_manifest

    output = open_location(args.output)
    if output.exists(MANIFEST):
        doc = read_manifest(args.output)
        print(f"{args.output}: published {doc.get('created', '')}, recipe {str(doc.get('recipe_hash', ''))[:16]}")
        return 0
    found = journal.read(output)
    if found is None:
        print(f"{args.output}: no run has claimed this output")
        return 1
    about, blocks = found
    total = about.get("blocks", "?")
    last = f", last finished: block {max(blocks)}" if blocks else ""
    print(f"{args.output}: run {about['run_id']} not published; {len(blocks)} of {total} blocks journaled{last}")
    events = journal.read_events(output, about["run_id"])
    if events:
        attempts = sum(e["event"] in ("run_started", "run_resumed") for e in events)
        lost = sum(e["event"] == "worker_lost" for e in events)
        ago = time.time() - events[-1]["time"]
        print(f"  attempts {attempts}, workers lost {lost}; last event {events[-1]['event']} {ago:.0f} s ago")
        rows = [
            (f"block {e['block']}", f"{sum(e['seconds'].values()):.1f} s  {e['bytes']} bytes  by {e['writer']}")
            for e in events
            if e["event"] == "block_finished"
        ]
        rows += [("error", e["error"]) for e in events if e["event"] == "error"]
        if rows:
            print(table(rows, "  journal"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline import estimate as est
    from storage.checkpoint import read_json

    tokens, seq_len, chunk, rows = 128 * 2048, 2048, 8 * 2048, 8192
    placement = {"spill": args.spill, "solve_device": args.solve_device, "inverse_on_cpu": args.inverse_on_cpu}
    if args.recipe:
        from pipeline import recipe as recipes

        recipe = recipes.load(args.recipe)
        where, rows, res = recipe.model, recipe.scheme.piece_rows, recipe.resources
        placement = {
            "spill": args.spill or res.spill is not None,
            "solve_device": res.solve_device if args.solve_device == "cpu" else args.solve_device,
            "inverse_on_cpu": args.inverse_on_cpu or res.inverse_on_cpu,
        }
        cal = recipe.calibration
        if cal is not None:
            tokens, seq_len, chunk = cal.tokens, cal.seq_len, cal.chunk_size * cal.seq_len
    elif args.config:
        where = args.config
    else:
        raise LaminaError("plan: give a recipe or --config PATH_OR_URI (a config.json or the folder holding it)")
    if not where.endswith(".json"):
        where = where.rstrip("/") + "/config.json"
    try:
        shape = est.ModelShape.from_config(read_json(*est.locate(where)))
    except ValueError as e:
        raise LaminaError(f"{where}: {e}") from None
    try:
        profile = est.load_profile(args.device)
    except ValueError as e:
        raise LaminaError(f"plan: --device {e}") from None
    if args.price is not None:
        profile = dataclasses.replace(profile, price=args.price)
    sizes = {"tokens": tokens, "seq_len": seq_len, "chunk_tokens": chunk, "solve_rows": rows, **placement}
    try:
        if args.workers:
            run = est.estimate(shape, profile, workers=args.workers, **sizes)
        else:
            run = est.fastest(shape, profile, most=args.max_workers, **sizes)
    except ValueError as e:
        raise LaminaError(f"plan: {e}") from None
    print("\n".join(est.describe(run)))
    try:
        est.check_fits(run)
    except ValueError as e:
        raise LaminaError(f"plan: {e}") from None
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lamina", description="Distributed quantization of large language models.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model as a recipe says")
    q.add_argument("recipe")
    q.add_argument("--workers", type=int, help="override resources.workers")
    q.set_defaults(func=cmd_quantize)
    x = sub.add_parser("export", help="write a published artifact in a format serving engines load")
    x.add_argument("artifact")
    x.add_argument("--format", required=True, choices=["gptq", "compressed-tensors", "awq", "aqlm", "vptq", "gguf"])
    x.add_argument(
        "--gguf-type",
        help="llama.cpp file type of a gguf export: F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M (default) or Q4_0",
    )
    x.add_argument("dest")
    x.set_defaults(func=cmd_export)
    e = sub.add_parser("eval", help="perplexity of an artifact (and of its source) on held-out text")
    e.add_argument("artifact")
    e.add_argument("--against", help="the unquantized source: KL, top-1 agreement and NLL increases against it")
    e.add_argument("--data", help="text URI (default: the eval section of the artifact's recipe)")
    e.add_argument("--glob", help="files under --data to use")
    e.add_argument("--tokens", type=int)
    e.add_argument("--window", type=int)
    e.add_argument("--long-window", type=int, help="the long context (0: the model's longest)")
    e.add_argument("--workers", type=int)
    e.add_argument("--report", help="where to write eval.json, eval.md and plots (default: ARTIFACT/eval)")
    e.add_argument("--kernel", choices=["auto", "reference", "cpu", "triton"], help="low-bit kernel (default: auto)")
    e.set_defaults(func=cmd_eval)
    r = sub.add_parser("release", help="quantize, eval against the source, check the gates, publish the version")
    r.add_argument("recipe")
    r.add_argument("--workers", type=int, help="override resources.workers")
    r.set_defaults(func=cmd_release)
    sm = sub.add_parser("submit", help="run quantize or release as a Ray job on a cluster; follow its logs")
    sm.add_argument("recipe", help="a recipe inside the working directory")
    sm.add_argument("--address", help="the job server, http://HEAD:8265 (default: RAY_ADDRESS, or a local cluster)")
    sm.add_argument("--command", dest="command_", choices=["quantize", "release"], default="quantize")
    sm.add_argument("--working-dir", default=".", help="uploaded to the cluster (default: the current directory)")
    sm.add_argument("--submission-id", help="the job's id (default: lamina-COMMAND-RANDOM)")
    sm.add_argument("--workers", type=int, help="override resources.workers")
    sm.add_argument("--no-wait", action="store_true", help="return once submitted; do not follow the logs")
    sm.set_defaults(func=cmd_submit)
    pl = sub.add_parser("plan", help="memory, FLOPs, time and cost of a run per block and worker, from config.json")
    pl.add_argument("recipe", nargs="?", help="a recipe (its model's config.json and calibration sizes)")
    pl.add_argument("--config", help="a config.json, or the folder or URI holding it (instead of a recipe)")
    pl.add_argument("--device", default="h100", help="h100, h200, a100, a100-40gb, cpu, or a saved profile's path")
    pl.add_argument("--workers", type=int, help="workers (default: the count that finishes first)")
    pl.add_argument("--max-workers", type=int, default=8, help="the most workers tried (default 8)")
    pl.add_argument("--price", type=float, help="price per device-hour (default: the profile's)")
    pl.add_argument("--spill", action="store_true", help="plan with chunks spilled to files (resources.spill)")
    pl.add_argument("--solve-device", choices=["cpu", "gpu"], default="cpu", help="where the solves run")
    pl.add_argument("--inverse-on-cpu", action="store_true", help="with --solve-device gpu: factorize on the CPU")
    pl.set_defaults(func=cmd_plan)
    b = sub.add_parser("bench", help="benchmarks against a baseline measured in the same run")
    bsub = b.add_subparsers(dest="what", required=True)
    bk = bsub.add_parser("kernels", help="low-bit kernel vs the dense matmul on Llama-3-70B shapes")
    from kernels.bench import add_arguments

    add_arguments(bk)
    bk.set_defaults(func=cmd_bench)
    bp = bsub.add_parser("profile", help="this machine's matmul and factorization rates, for lamina plan --device")
    bp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bp.add_argument("--size", type=int, default=0, help="matrix size (default 2048 on CPU, 8192 on a GPU)")
    bp.add_argument("--price", type=float, default=0.0, help="price per device-hour, kept in the profile")
    bp.add_argument("--save", help="write the profile (JSON) here, for lamina plan --device PATH")
    bp.set_defaults(func=cmd_bench_profile)
    v = sub.add_parser("verify", help="re-hash every file of an artifact against its manifest")
    v.add_argument("artifact")
    v.set_defaults(func=cmd_verify)
    st = sub.add_parser("status", help="progress of a running or dead run on OUTPUT, from its journal")
    st.add_argument("output")
    st.set_defaults(func=cmd_status)
    ls = sub.add_parser("ls", help="published versions in a registry (REGISTRY/<model>/<version>/)")
    ls.add_argument("registry")
    ls.set_defaults(func=cmd_ls)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (LaminaError, StorageError) as e:
        print(f"lamina: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
