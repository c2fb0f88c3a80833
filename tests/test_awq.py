"""AWQ and SmoothQuant: the searches' math, the folding of their scales into a real block
(exact: the block computes the same function), the channel statistics' sums, and runs of
the pipeline on a real Ray that give the same bytes on any number of workers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.awq import AWQConfig, clip, fake_quantize, output_error, search_scale
from algorithms.rtn import rtn
from algorithms.smoothquant import smoothing_scale
from algorithms.types import UniformScheme
from kernels.reference import dequantize
from pipeline.architectures import layout_for
from storage.checkpoint import Checkpoint
from tests.conftest import small_recipe_doc
from workers.block import ABSMEAN, BlockRunner
from workers.chunk_sum import MAXIMA, fold, push

W4 = UniformScheme(bits=4, group_size=64, sym=False)


def outlier_inputs(tokens: int = 2048, n: int = 256, seed: int = 0) -> torch.Tensor:
    """Activations with a few channels 20-50x larger than the rest, as LLMs' are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)  # [tokens, in]
    x[:, torch.randperm(n, generator=g)[:6]] *= torch.linspace(20, 50, 6)
    return x


def test_the_scale_search_lowers_the_output_error_on_outlier_channels():
    x = outlier_inputs()
    W = torch.randn(384, 256, generator=torch.Generator().manual_seed(1)) * 0.02  # [out, in]
    H = x.T @ x / len(x)  # [in, in]
    found = search_scale([W[:128], W[128:]], H, x.abs().mean(0), W4, AWQConfig())
    s = found.scale
    plain = output_error(W, fake_quantize(W, W4), H)
    scaled = output_error(W, fake_quantize(W * s, W4) / s, H)
    assert found.alpha > 0 and found.loss_ratio < 0.9
    assert scaled == pytest.approx(found.loss_ratio * plain, rel=1e-4)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-4)  # normalised as AutoAWQ does


def test_no_scaling_is_a_candidate_so_the_search_never_loses_to_round_to_nearest():
    H = torch.eye(256)  # every channel alike: nothing for the scales to find
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    found = search_scale([W], H, torch.ones(256), W4, AWQConfig(duo_scaling=False))
    assert found.alpha is None and found.loss_ratio == 1.0 and torch.equal(found.scale, torch.ones(256))
    x = outlier_inputs(seed=2)
    for duo in (True, False):
        found = search_scale([W], x.T @ x / len(x), x.abs().mean(0), W4, AWQConfig(duo_scaling=duo))
        assert found.loss_ratio <= 1.0


def test_clipping_never_raises_the_output_error_and_keeps_the_grid():
    x = outlier_inputs(seed=3)
    H = x.T @ x / len(x)
    W = torch.randn(96, 256) * 0.02
    W[:, 7] *= 8  # a few large weights that a shrunk range clips
    Wc = clip(W, H, W4, AWQConfig())
    assert (Wc.abs() <= W.abs() + 1e-7).all()
    before = output_error(W, dequantize(rtn(W, W4)), H)
    after = output_error(W, dequantize(rtn(Wc, W4)), H)
    # per row and group the unclipped range is a candidate; across groups H couples them, so allow 1%
    assert after < before * 1.01
    assert not torch.equal(Wc, W)


def test_smoothquant_scale_flattens_the_activations_and_keeps_dead_channels():
    x = outlier_inputs(seed=4)
    x[:, 3] = 0  # a channel that never fires
    W = torch.randn(128, 256) * 0.02
    s = smoothing_scale(x.abs().amax(0), [W[:64], W[64:]], 0.5)
    assert s[3] == 1
    ratio = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).median())  # noqa: E731
    assert ratio(x / s) < ratio(x) / 4
    # alpha 0.5 balances the two: max|x_j / s_j| == max|W_j * s_j| on live channels
    live = x.abs().amax(0) > 0
    torch.testing.assert_close((x / s).abs().amax(0)[live], (W * s).abs().amax(0)[live], rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scale(x.abs().amax(0), [W], 1.5)


def test_channel_maxima_fold_by_maximum_in_any_partition():
    rng = np.random.default_rng(0)
    chunks = [{"g" + MAXIMA: rng.random(5), "g": rng.random(5)} for _ in range(7)]

    def folded(split: list[int]) -> dict:
        stacks, start = [], 0
        for size in split:
            stack = []
            for c in range(start, start + size):
                push(stack, (c, 1, chunks[c]), 7)
            stacks += stack
            start += size
        return fold(stacks, 7)

    one, three = folded([7]), folded([2, 3, 2])
    assert np.array_equal(one["g" + MAXIMA], np.max([c["g" + MAXIMA] for c in chunks], axis=0))
    assert np.array_equal(one["g" + MAXIMA], three["g" + MAXIMA])
    assert np.array_equal(one["g"], three["g"])


@pytest.fixture(scope="module")
def runner(small_model: Path):
    """A block runner over the small real model with one chunk of real-token-like ids."""
    config = Checkpoint(str(small_model)).config
    r = BlockRunner(model_uri=str(small_model), layout=layout_for(config), threads=1)
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], size=(2, 64))
    return r, {0: ids}


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_folding_the_scales_keeps_the_block_function_exactly(runner, method):
    r, tokens = runner

    def at_block_1() -> None:
        r.set_inputs(tokens)
        r.load_block(0)
        r.forward()
        r.load_block(1)

    at_block_1()
    r.forward()
    expected = r.hidden[0]

    at_block_1()
    hessians = r.reduce(1, r.calibrate(1, channels=True))
    groups = [g for _, g in r.layout.smooth]
    config = AWQConfig() if method == "awq" else 0.5
    found = r.smooth_search(1, groups, hessians, tokens=128, method=method, config=config, scheme=W4)
    # GQA (9 heads, 3 KV heads): v's outputs are not o's inputs one to one, so o is not smoothed
    want = {"self_attn.q_proj", "mlp.gate_proj"} | ({"mlp.down_proj"} if method == "awq" else set())
    assert set(found) == want
    smoothed = r.smooth(1, method, found)
    assert smoothed == len(want)
    s = torch.from_numpy(found["self_attn.q_proj"][0])
    assert torch.equal(r.raw["input_layernorm.weight"], r.layer.input_layernorm.weight.data)
    r.forward()
    torch.testing.assert_close(r.hidden[0], expected, rtol=2e-4, atol=2e-4)

    # the solves' Hessians of the scaled inputs are H / (s s^T): recalibrate the smoothed block
    at_block_1()
    r.smooth(1, method, found)
    again = r.reduce(1, r.calibrate(1, ["self_attn.q_proj"], None, True))
    H = torch.from_numpy(hessians["self_attn.q_proj"])
    torch.testing.assert_close(
        torch.from_numpy(again["self_attn.q_proj"]), H / s[:, None] / s[None, :], rtol=1e-3, atol=1e-3
    )
    mean = torch.from_numpy(again["self_attn.q_proj" + ABSMEAN])
    torch.testing.assert_close(mean, torch.from_numpy(hessians["self_attn.q_proj" + ABSMEAN]) / s, rtol=1e-4, atol=1e-4)


def shard_tensors(artifact: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(artifact.glob("model-*.safetensors")):
        out.update({k: v.numpy().tobytes() for k, v in load_file(f).items()})
    return out


@pytest.mark.slow
def test_awq_on_ray_gives_the_same_bytes_on_one_and_two_workers_and_beats_round_to_nearest(
    tmp_path, ray_cluster, small_model
):
    from pipeline.driver import quantize
    from pipeline.recipe import parse

    runs = {}
    plain = {"n_grid": 1, "clip": False}  # alpha 0 only and no clipping: round-to-nearest, its error measured by H
    for name, options, workers in [("awq1", {}, 1), ("awq2", {}, 2), ("rtn", plain, 2)]:
        doc = small_recipe_doc(
            tmp_path / name,
            small_model,
            scheme={"algorithm": "awq", "sym": False, "awq": options},
            resources={"workers": workers},
        )
        runs[name] = (quantize(parse(doc), progress=False), Path(doc["output"]))
    one, two = shard_tensors(runs["awq1"][1]), shard_tensors(runs["awq2"][1])
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one)

    source = Checkpoint(str(small_model))
    norm = "model.layers.0.input_layernorm.weight"
    from safetensors.torch import load_file

    stored = {}
    for f in runs["awq2"][1].glob("model-*.safetensors"):
        stored.update(load_file(f))
    assert not torch.equal(stored[norm], source.read([norm])[norm])  # the scale went into the norm

    events = [json.loads(line) for line in (runs["awq2"][1] / "lamina-events.jsonl").read_text().splitlines()]
    smoothed = [e for e in events if e["event"] == "block_smoothed"]
    assert [e["block"] for e in smoothed] == [0, 1, 2, 3]
    assert all(g["alpha"] is None or 0 <= g["alpha"] < 1 for e in smoothed for g in e["groups"].values())
    assert all(g["loss_ratio"] <= 1 for e in smoothed for g in e["groups"].values())

    # each linear's output error relative to its output, tr(D H D^T) / tr(W H W^T), is the same
    # in the scaled and the original space: AWQ's against round-to-nearest's
    def errors(run: str) -> dict[str, float]:
        lines = (runs[run][1] / "lamina-events.jsonl").read_text().splitlines()
        done = [json.loads(line) for line in lines if '"block_finished"' in line]
        return {f"{e['block']}.{k}": v for e in done for k, v in e["error"].items()}

    awq_errors, rtn_errors = errors("awq2"), errors("rtn")
    assert awq_errors.keys() == rtn_errors.keys() and len(awq_errors) == 4 * 7
    assert sum(awq_errors.values()) < 0.9 * sum(rtn_errors.values())
    assert sum(awq_errors[k] <= rtn_errors[k] for k in awq_errors) >= 0.8 * len(awq_errors)

    config = json.loads((runs["awq2"][1] / "config.json").read_text())["quantization_config"]
    assert config["algorithm"] == "awq" and config["bits"] == 4 and config["sym"] is False


def test_the_example_recipe_is_valid_and_plans():
    import yaml

    from pipeline.recipe import load

    recipe = load(str(Path(__file__).parents[1] / "examples" / "awq.yaml"))
    assert recipe.scheme.smoothing[0] == "awq" and recipe.scheme.options.clip
    assert yaml.safe_load((Path(__file__).parents[1] / "examples" / "awq.yaml").read_text())["scheme"]["sym"] is False
