"""End to end on the real fixture model with a local Ray cluster: quantize, verify, eval.

Quality is measured under the reference protocol of shared/FIXTURES.md: calibration on the
first 64 x 512 tokens of library/, perplexity on the first 16,384 tokens of tutorial/ in
windows of 1024. Measured there: unquantized 11.60, RTN 4-bit g64 symmetric 16.89.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.driver import quantize
from pipeline.evaluate import evaluate
from pipeline.recipe import parse
from storage.fs import open_location
from storage.manifest import read_manifest, verify
from tests.conftest import SMALL_BLOCKS, recipe_doc, small_recipe_doc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def protocol_runs(tmp_path_factory, ray_cluster):
    """4-bit and 3-bit GPTQ artifacts of the reference scheme, and their and the source's
    perplexities. (RTN end to end is the `partial` artifact of test_export.py, whose
    perplexity is checked there; GPTQ against RTN layer by layer in test_algorithms.py.)"""
    tmp = tmp_path_factory.mktemp("protocol")
    gptq = parse(recipe_doc(tmp / "gptq"))
    gptq3 = parse(recipe_doc(tmp / "gptq3", scheme={"bits": 3}))
    runs = {name: quantize(recipe, progress=False) for name, recipe in (("gptq", gptq), ("gptq3", gptq3))}
    evals = {name: evaluate(run.output, gptq.eval, gptq.resources, progress=False) for name, run in runs.items()}
    ppl = {name: report.perplexity for name, report in evals.items()}
    print(f"\nreference protocol perplexities: {ppl}")
    assert {r.kernel for r in evals.values()} == {"cpu"}  # eval's `auto` picks the C kernel on this CPU
    return runs, ppl


def test_the_demo_artifact_has_the_same_perplexity_through_each_kernel(protocol_runs, small_reference) -> None:
    """The 4-bit g64 artifact (the demo's recipe) through the reference and the C kernel.
    Triton, interpreted on a CPU, is too slow for 30 blocks: there it runs the 4-block
    artifact of the same recipe against the reference instead (on a GPU, the 30-block one)."""
    runs, _ = protocol_runs
    recipe = parse(recipe_doc(Path("unused")))
    gpu = torch.cuda.is_available()
    few = recipe.eval.model_copy(update={"tokens": 2048})
    kernels = ("reference", "cpu", "triton") if gpu else ("reference", "cpu")
    reports = {
        k: evaluate(runs["gptq"].output, few.model_copy(update={"kernel": k}), recipe.resources, progress=False)
        for k in kernels
    }
    print(
        f"\nperplexity by kernel, 4-bit g64 artifact, {few.tokens} tokens:",
        {k: r.perplexity for k, r in reports.items()},
    )
    assert {k: r.kernel for k, r in reports.items()} == {k: k for k in kernels}
    assert reports["cpu"].tokens == reports["reference"].tokens == 2 * 1023
    for k in kernels[1:]:
        assert reports[k].perplexity == pytest.approx(reports["reference"].perplexity, rel=1e-3)
    if gpu:
        return
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton cannot be installed on this machine: its eval is untested here")
    tiny = recipe.eval.model_copy(update={"tokens": 64, "window": 64, "long_window": 64})
    one = recipe.resources.model_copy(update={"workers": 1})
    small = {
        k: evaluate(small_reference.output, tiny.model_copy(update={"kernel": k}), one, progress=False).perplexity
        for k in ("reference", "triton")
    }
    print("perplexity by kernel, 4-block artifact, a window of 64 (Triton interpreted):", small)
    assert small["triton"] == pytest.approx(small["reference"], rel=1e-3)


def test_artifact_is_complete_and_verifies(protocol_runs) -> None:
    runs, _ = protocol_runs
    manifest = read_manifest(runs["gptq"].output)
    shards = [f for f in manifest["files"] if f.endswith(".safetensors")]
    assert len(shards) == 31  # 30 blocks + embeddings/norm
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= set(manifest["files"])
    assert not any(f.startswith(".lamina") for f in open_location(runs["gptq"].output).list_files())
    assert manifest["source"]["fingerprint"] and manifest["recipe_hash"] == runs["gptq"].recipe_hash
    assert verify(runs["gptq"].output) == []
    assert runs["gptq"].artifact_bytes < runs["gptq"].source_bytes / 2.5


def test_gptq_3bit_g64_sym_with_act_order_groups_stays_usable(protocol_runs) -> None:
    runs, ppl = protocol_runs
    # an established open implementation measured 45.67 here, RTN 86.3 (shared/FIXTURES.md);
    # act-order with groups in solve order (g_idx) measured 22.96, static groups 21.92
    assert ppl["gptq3"] <= 45.7
    index = json.loads(open_location(runs["gptq3"].output).read_bytes("model.safetensors.index.json"))
    assert "model.layers.0.mlp.down_proj.g_idx" in index["weight_map"]
    assert verify(runs["gptq3"].output) == []


def test_eval_of_the_source_equals_transformers_own_loss(ray_cluster) -> None:
    """Our block-by-block distributed eval against the whole model's loss in transformers on
    the same windows (the protocol's first two), so the protocol's unquantized 11.60 and
    every perplexity above are computed the way everyone computes them."""
    from transformers import AutoModelForCausalLM

    from pipeline.data import load_tokenizer, sequences, token_stream

    recipe = parse(recipe_doc(Path("unused")))
    data = recipe.eval.model_copy(update={"tokens": 2048})
    ours = evaluate(recipe.model, data, recipe.resources, progress=False)
    stream = token_stream(
        uri=data.source, pattern=data.glob, tokenizer=load_tokenizer(recipe.model), needed=data.tokens, what="eval"
    )
    windows = torch.as_tensor(sequences(stream, count=data.windows, length=data.window))
    model = AutoModelForCausalLM.from_pretrained(recipe.model, dtype=torch.float32).eval()
    with torch.inference_mode():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert ours.tokens == len(windows) * (data.window - 1) and ours.kernel == "none"  # no quantized linears
    assert ours.nll == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_gptq_4bit_g64_sym_quality(protocol_runs) -> None:
    _, ppl = protocol_runs
    # an established open implementation measured 14.42 here; RTN on GPTQ's grid 17.18 (the
    # protocol quotes 16.89 for an RTN whose grid it does not name)
    assert ppl["gptq"] <= 14.4


FLAKY = {"fail_rate": 0.05, "truncate_rate": 0.05, "seed": 7}  # of every storage call, in every process


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory, ray_cluster, s3_endpoint, small_model, small_reference):
    """The small recipe (4-block copy of the model) read from and written to S3 (loopback),
    and on a store that fails and truncates a fraction of all calls, next to the same recipe
    on local files (small_reference; worker counts are compared in test_distributed.py)."""
    tmp = tmp_path_factory.mktemp("small")
    s3_model, s3_registry = f"{s3_endpoint}/models/smollm2-135m", f"{s3_endpoint}/registry/smollm2-135m/w4g64"
    open_location(s3_model).fs.put(str(small_model) + "/", open_location(s3_model).root, recursive=True)
    docs = {
        "s3": small_recipe_doc(tmp / "s3", small_model, model=s3_model, output=s3_registry),
        "faulty": small_recipe_doc(
            tmp / "faulty",
            small_model,
            model=f"faulty::file://{small_model}",
            output=f"faulty::file://{tmp}/faulty/artifact",
            storage={"faulty::file://": FLAKY},
        ),
    }
    return {"local": small_reference, **{name: quantize(parse(doc), progress=False) for name, doc in docs.items()}}


def shard_hashes(run) -> dict[str, str]:
    return {f: r.sha256 for f, r in run.files.items() if f.endswith(".safetensors")}


def test_s3_source_and_registry_give_the_same_artifact(small_runs) -> None:
    run = small_runs["s3"]
    assert run.output.startswith("s3://")
    assert verify(run.output) == []
    assert (
        read_manifest(run.output)["source"]["fingerprint"]
        == read_manifest(small_runs["local"].output)["source"]["fingerprint"]
    )
    assert shard_hashes(run) == shard_hashes(small_runs["local"])


def test_registry_lists_the_published_version(small_runs, s3_endpoint, capsys) -> None:
    assert main(["ls", f"{s3_endpoint}/registry"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("smollm2-135m/w4g64  gptq w4 g64 sym  ")
    assert main(["ls", f"{s3_endpoint}/empty-registry"]) == 0
    assert "no published versions" in capsys.readouterr().out


def test_transformers_does_not_mistake_our_kernels_package() -> None:
    import transformers.utils

    spec = importlib.util.find_spec("kernels")
    assert spec is not None and Path(spec.origin).parent == ROOT / "kernels"  # ours is importable...
    assert transformers.utils.is_kernels_available() is False  # ...and not taken for Hugging Face's


def test_a_flaky_store_still_gives_the_same_verified_artifact(small_runs) -> None:
    run = small_runs["faulty"]
    plain = run.output.removeprefix("faulty::file://")
    injected = open_location(run.output).fs.injected  # this process's share: claim, journal, publish
    assert injected["failures"] > 0 and injected["truncations"] > 0
    assert verify(plain) == []
    assert shard_hashes(run) == shard_hashes(small_runs["local"])
    assert len(shard_hashes(run)) == SMALL_BLOCKS + 1
    assert not any(f.startswith(".lamina") for f in open_location(plain).list_files())
