"""Mixture-of-experts models end to end: a tiny Mixtral and a tiny Qwen2-MoE (random
weights, transformers' own classes, saved per expert as transformers saves them;
scripts/tiny_moe.py) whose expert 3 the router seldom picks. Each expert's Hessian comes from its routed tokens; the
recipe's policy handles an expert that got too few, and the report names it."""

from __future__ import annotations

import json

import pytest
import torch

from algorithms.rtn import rtn
from algorithms.types import UniformScheme
from pipeline.architectures import layout_for
from pipeline.errors import LaminaError
from pipeline.evaluate import evaluate
from pipeline.recipe import EvalData, Resources, parse
from scripts.tiny_moe import RARE, tiny_moe
from storage.checkpoint import Checkpoint
from storage.fs import open_location
from tests.conftest import DOCS, MODEL, recipe_doc
from workers.block import BlockRunner

CALIBRATION = {"samples": 8, "seq_len": 128, "chunk_size": 1}  # 1024 tokens, 8 chunks
MIN_TOKENS = 64  # expert 3 gets ~1% of the tokens, every other expert > 90
EXPERT = "model.layers.{block}.block_sparse_moe.experts.{expert}.{w}"


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return tiny_moe(MODEL, tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="module")
def qwen_moe(tmp_path_factory):
    return tiny_moe(MODEL, tmp_path_factory.mktemp("tiny-qwen-moe"), family="qwen2_moe")


def moe_recipe(tmp, model, policy: str, workers: int, min_tokens: int = MIN_TOKENS) -> dict:
    doc = recipe_doc(
        tmp,
        model=str(model),
        calibration=CALIBRATION,
        resources={"workers": workers},
        experts={"min_tokens": min_tokens, "under_calibrated": policy},
    )
    doc.pop("eval")
    return doc


@pytest.fixture(scope="module")
def runs(ray_cluster, moe_model, tmp_path_factory):
    """The tiny MoE quantized with the rare expert rounded to nearest (1 worker) and
    calibrated on every token (2 workers)."""
    from pipeline.driver import quantize

    out = {}
    for policy, workers in (("rtn", 1), ("all_tokens", 2)):
        doc = moe_recipe(tmp_path_factory.mktemp(policy), moe_model, policy, workers)
        out[policy] = quantize(parse(doc), progress=False)
    return out


def tensors(folder: str) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(folder)
    return checkpoint.read(checkpoint.names())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_sparse_moe_computes_what_transformers_computes(family, moe_model, qwen_moe) -> None:
    """The runner's block (per-expert linears under the checkpoint's names) against the
    same block loaded by transformers (fused experts): same routing, same outputs."""
    from transformers import AutoModelForCausalLM

    model = moe_model if family == "mixtral" else qwen_moe
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    config = json.loads((model / "config.json").read_text())
    runner = BlockRunner(model_uri=str(model), layout=layout_for(config), threads=1)
    runner.load_block(0)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = runner.layer.mlp(x), hf.model.layers[0].mlp(x)
        _, _, chosen = hf.model.layers[0].mlp.gate(x.reshape(-1, 64))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert runner.layer.mlp.routed.tolist() == torch.bincount(chosen.reshape(-1), minlength=8).tolist()
    names = runner.layer.state_dict()
    if family == "mixtral":
        assert "block_sparse_moe.experts.7.w2.weight" in names and not any(k.startswith("mlp.") for k in names)
    else:
        wanted = {"mlp.experts.7.down_proj.weight", "mlp.shared_expert.up_proj.weight", "mlp.shared_expert_gate.weight"}
        assert wanted <= set(names)


def test_every_expert_is_quantized_and_the_rare_one_reported(runs, moe_model) -> None:
    report = runs["rtn"]
    for block in (0, 1):
        counts = report.expert_tokens[block]
        w1 = {g: n for g, n in counts.items() if g.endswith(".w1")}
        assert sum(w1.values()) == 8 * 128  # top-1 routing: every token reaches exactly one expert
        assert counts[f"block_sparse_moe.experts.{RARE}.w1"] < MIN_TOKENS
        assert all(n >= MIN_TOKENS for g, n in w1.items() if f".{RARE}." not in g)
    rare = [(u["block"], u["group"], u["action"]) for u in report.under_calibrated]
    assert rare == [(b, f"block_sparse_moe.experts.{RARE}.{w}", "rtn") for b in (0, 1) for w in ("w1", "w2")]
    stored, source = tensors(report.output), tensors(str(moe_model))
    scheme = UniformScheme(bits=4, group_size=64, sym=True)
    for block in (0, 1):
        assert f"model.layers.{block}.block_sparse_moe.gate.weight" in stored  # the router stays as it is
        for expert in range(8):
            for w in ("w1", "w2", "w3"):
                name = EXPERT.format(block=block, expert=expert, w=w)
                assert f"{name}.qweight" in stored and f"{name}.weight" not in stored
        # the rare expert is exactly round-to-nearest of its source weights; the others are GPTQ's
        for expert, same in ((RARE, True), (0, False)):
            name = EXPERT.format(block=block, expert=expert, w="w1")
            expected = rtn(source[f"{name}.weight"].float(), scheme).qweight
            assert torch.equal(stored[f"{name}.qweight"], expected) is same
    events = [json.loads(line) for line in open_location(report.output).read_bytes("lamina-events.jsonl").splitlines()]
    calibrated = [e for e in events if e["event"] == "experts_calibrated"]
    assert [e["block"] for e in calibrated] == [0, 1] and calibrated[0]["under"] == [
        f"block_sparse_moe.experts.{RARE}.w1",
        f"block_sparse_moe.experts.{RARE}.w2",
    ]


def test_all_tokens_calibrates_the_rare_expert_on_every_token(runs, moe_model) -> None:
    """With all_tokens the rare expert's Hessian is every token's: a GPTQ solve, not RTN;
    block 0's other experts (same inputs, same Hessians) are the rtn run's byte for byte,
    although that run had 1 worker and this one 2."""
    report = runs["all_tokens"]
    assert {u["action"] for u in report.under_calibrated} == {"all_tokens"} and len(report.under_calibrated) == 4
    stored, other, source = tensors(report.output), tensors(runs["rtn"].output), tensors(str(moe_model))
    scheme = UniformScheme(bits=4, group_size=64, sym=True)
    rare = EXPERT.format(block=0, expert=RARE, w="w1")
    assert not torch.equal(stored[f"{rare}.qweight"], rtn(source[f"{rare}.weight"].float(), scheme).qweight)
    for expert in (e for e in range(8) if e != RARE):
        for w in ("w1", "w2", "w3"):
            name = EXPERT.format(block=0, expert=expert, w=w)
            assert torch.equal(stored[f"{name}.qweight"], other[f"{name}.qweight"])


def test_the_moe_artifact_runs_on_the_kernels_close_to_its_source(runs, moe_model) -> None:
    data = EvalData(source=str(DOCS / "tutorial"), glob="*.rst.txt", tokens=512, window=128, long_window=128)
    result = evaluate(runs["all_tokens"].output, data, Resources(workers=1), against=str(moe_model), progress=False)
    (context,) = result.contexts
    assert context.tokens == 4 * 127
    # a random model is near-uniform over 49152 tokens; 4-bit experts stay close to it
    assert context.perplexity == pytest.approx(context.reference["perplexity"], rel=0.05)
    assert 0 < context.kl < 0.05


def test_qwen2_moe_with_a_shared_expert_quantizes_and_reports_its_rare_expert(ray_cluster, qwen_moe, tmp_path) -> None:
    """DeepSeekMoE's shape: top-2 of 8 routed experts plus a shared expert every token
    reaches. The shared expert is calibrated on all tokens and quantized; the router and
    the shared expert's gate stay as they are; the rare routed expert is rounded to nearest."""
    from pipeline.driver import quantize

    report = quantize(parse(moe_recipe(tmp_path, qwen_moe, "rtn", 1, min_tokens=128)), progress=False)
    for block in (0, 1):
        counts = report.expert_tokens[block]
        assert sum(n for g, n in counts.items() if g.endswith(".gate_proj")) == 2 * 8 * 128  # top-2
        assert "mlp.shared_expert.gate_proj" not in counts  # every token reaches it: not an expert group
    assert [(u["block"], u["group"]) for u in report.under_calibrated] == [
        (b, f"mlp.experts.{RARE}.{w}") for b in (0, 1) for w in ("down_proj", "gate_proj")
    ]
    stored, source = tensors(report.output), tensors(str(qwen_moe))
    scheme = UniformScheme(bits=4, group_size=64, sym=True)
    for block in (0, 1):
        prefix = f"model.layers.{block}.mlp."
        for kept in ("gate.weight", "shared_expert_gate.weight"):
            assert torch.equal(stored[prefix + kept], source[prefix + kept])
        for w in ("gate_proj", "up_proj", "down_proj"):
            assert f"{prefix}shared_expert.{w}.qweight" in stored
        rare = f"{prefix}experts.{RARE}.up_proj"
        assert torch.equal(stored[f"{rare}.qweight"], rtn(source[f"{rare}.weight"].float(), scheme).qweight)


def test_the_error_policy_stops_naming_the_expert_and_publishes_nothing(ray_cluster, moe_model, tmp_path) -> None:
    from pipeline.driver import quantize

    doc = moe_recipe(tmp_path, moe_model, "error", 1)
    with pytest.raises(LaminaError, match=rf"block 0: experts reached by fewer than 64 .*experts\.{RARE}\.w1 \(\d+\)"):
        quantize(parse(doc), progress=False)
    assert not open_location(doc["output"]).exists("manifest.json")


def test_rtn_fallback_needs_gptq_and_the_policy_is_part_of_the_hash(tmp_path) -> None:
    doc = recipe_doc(tmp_path, experts={"under_calibrated": "rtn"}, scheme={"algorithm": "aqlm", "bits": 2})
    with pytest.raises(LaminaError, match="rtn falls back to GPTQ's uniform grid; with algorithm aqlm"):
        parse(doc)
    plain = recipe_doc(tmp_path)
    hashes = {parse({**plain, **extra}).hash() for extra in ({}, {"experts": {}}, {"experts": {"min_tokens": 1}})}
    assert len(hashes) == 3
