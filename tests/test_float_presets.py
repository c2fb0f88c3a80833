"""The compressed-tensors presets (FP8, FP8-dynamic, W8A8 int8 with SmoothQuant, NVFP4,
NVFP4A16) through the whole pipeline on a real Ray: the native artifact's tensors, the
static activation scales from calibration, the export read back by compressed-tensors
itself, and the activations quantized when the artifact runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from algorithms.float_activations import quantize_activations
from algorithms.floatq import PRESETS, FloatWeight, global_scale
from algorithms.floatq import dequantize as float_dequantize
from kernels.quant_linear import ActQuantLinear
from pipeline.architectures import layout_for
from pipeline.driver import quantize
from pipeline.errors import LaminaError
from pipeline.export import export
from pipeline.plan import make_plan
from pipeline.recipe import parse
from storage.checkpoint import Checkpoint
from storage.fs import open_location
from storage.manifest import verify
from tests.conftest import small_recipe_doc
from workers.block import BlockRunner

SCHEMES = {
    "fp8": {"algorithm": "rtn", "preset": "fp8"},
    "fp8-dynamic": {"algorithm": "rtn", "preset": "fp8-dynamic"},
    "w8a8": {"algorithm": "smoothquant", "smoothquant": {"alpha": 0.5}},
    "nvfp4": {"algorithm": "rtn", "preset": "nvfp4"},
    "nvfp4a16": {"algorithm": "rtn", "preset": "nvfp4a16"},
}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, ray_cluster, small_model) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("presets")
    out = {}
    for name, scheme in SCHEMES.items():
        doc = small_recipe_doc(tmp / name, small_model, scheme=scheme)
        doc["export"] = [{"format": "compressed-tensors", "output": str(tmp / f"{name}-ct")}]
        report = quantize(parse(doc), progress=False)
        out[name], out[f"{name}-ct"] = (
            Path(open_location(report.output).root),
            Path(open_location(report.exports[0]).root),
        )
    return out


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_the_artifact_stores_the_presets_tensors(artifacts, name):
    scheme = PRESETS[name]
    config = json.loads((artifacts[name] / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float" and config["kind"] == scheme.kind
    tensors = tensors_of(artifacts[name])
    weight = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "nvfp4": torch.uint8}[scheme.kind]
    for block in range(4):
        for linear in layout_for(config | {"model_type": "llama"}).linears:
            prefix = f"model.layers.{block}.{linear}."
            stored = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            fw = FloatWeight.from_tensors(stored, scheme)  # checks every dtype and shape
            assert fw.weight.dtype == weight
            assert (fw.activation_scale is not None) == scheme.static_activations
    if scheme.kind == "nvfp4":  # vLLM fuses q/k/v and gate/up: one global scale each
        for group in (QKV, ("mlp.gate_proj", "mlp.up_proj")):
            scales = {float(tensors[f"model.layers.1.{lin}.weight_global_scale"]) for lin in group}
            assert len(scales) == 1


def test_static_activation_scales_come_from_the_calibration_inputs(artifacts, small_model, tmp_path):
    """input_scale = max |x| / 448 over the calibration set's inputs of block 0's q/k/v,
    recomputed here from the same tokens through the real embedding and norm."""
    doc = json.loads((artifacts["fp8"] / "lamina.json").read_text())["recipe"]
    plan = make_plan(parse({**doc, "output": str(tmp_path / "again"), "export": []}))  # the same calibration tokens
    checkpoint = Checkpoint(str(small_model))
    runner = BlockRunner(model_uri=str(small_model), layout=layout_for(checkpoint.config), threads=1)
    runner.set_inputs({0: plan.calibration})
    runner.load_block(0)
    seen = []
    hook = runner.layer.self_attn.q_proj.register_forward_pre_hook(lambda _m, x: seen.append(x[0].abs().max()))
    runner.forward()
    hook.remove()
    tensors = tensors_of(artifacts["fp8"])
    expected = float(seen[0]) / 448
    for linear in QKV:
        assert float(tensors[f"model.layers.0.{linear}.input_scale"]) == pytest.approx(expected, rel=1e-6)
    nvfp4 = tensors_of(artifacts["nvfp4"])
    assert float(nvfp4["model.layers.0.self_attn.q_proj.input_global_scale"]) == pytest.approx(
        float(global_scale(float(seen[0]))), rel=1e-6
    )


@pytest.mark.parametrize("name", list(SCHEMES))
def test_compressed_tensors_reads_the_export_back_to_our_weights(artifacts, name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    assert verify(str(artifacts[f"{name}-ct"])) == []
    config = json.loads((artifacts[f"{name}-ct"] / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(config)
    args = qc.config_groups["group_0"]
    assert qc.ignore == ["lm_head"]
    assert (args.input_activations is None) == (PRESETS[name].activations is None)
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    ours, theirs = tensors_of(artifacts[name]), tensors_of(artifacts[f"{name}-ct"])
    linears = sorted({k.rsplit(".", 1)[0] for k in ours if k.endswith(".weight_scale")})
    assert len(linears) == 4 * 7

    def of(tensors: dict[str, torch.Tensor], linear: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(f"{linear}."): v for k, v in tensors.items() if k.startswith(f"{linear}.")}

    for linear in linears:
        fw = FloatWeight.from_tensors(of(ours, linear), PRESETS[name])
        weight = compressor.decompress(of(theirs, linear), args)["weight"]  # nvfp4: bfloat16 from float32 products
        assert torch.equal(weight, float_dequantize(fw, weight.dtype)), linear
    # the smoothed norms travel with the export
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(theirs[norm], ours[norm])


def test_smoothquant_moved_the_scales_into_the_norms(artifacts, small_model):
    source = Checkpoint(str(small_model))
    stored = tensors_of(artifacts["w8a8"])
    for norm in ("input_layernorm", "post_attention_layernorm"):
        name = f"model.layers.2.{norm}.weight"
        assert not torch.equal(stored[name], source.read([name])[name])
    events = [json.loads(line) for line in (artifacts["w8a8"] / "lamina-events.jsonl").read_text().splitlines()]
    smoothed = [e for e in events if e["event"] == "block_smoothed"]
    assert len(smoothed) == 4 and all(e["method"] == "smoothquant" for e in smoothed)
    assert all(set(e["groups"]) == {"self_attn.q_proj", "mlp.gate_proj"} for e in smoothed)


def test_the_artifact_runs_with_its_activations_quantized(artifacts):
    """A block of the W8A8 artifact as lamina runs it (propagation and eval): its linears
    quantize their inputs per token to int8, so the outputs differ from the weight-only
    ones by exactly that rounding."""
    artifact = str(artifacts["w8a8"])
    checkpoint = Checkpoint(artifact)
    runner = BlockRunner(model_uri=artifact, layout=layout_for(checkpoint.config), threads=1)
    ids = np.random.default_rng(0).integers(0, checkpoint.config["vocab_size"], size=(1, 32))
    runner.set_inputs({0: ids})
    runner.load_block(0)
    q = runner.layer.self_attn.q_proj
    assert isinstance(q, ActQuantLinear)
    x = torch.randn(3, q.in_features)
    expected = quantize_activations(x, PRESETS["w8a8"].activations, None) @ q.weight.T
    torch.testing.assert_close(q(x), expected)
    assert not torch.allclose(q(x), x @ q.weight.T, rtol=0, atol=1e-6)


def test_a_preset_is_refused_where_it_cannot_go(tmp_path, small_model):
    with pytest.raises(LaminaError, match="preset fp8 is solved by algorithm rtn or smoothquant, not gptq"):
        parse(small_recipe_doc(tmp_path, small_model, scheme={"algorithm": "gptq", "preset": "fp8"}))
    with pytest.raises(LaminaError, match="preset nvfp4 is solved by algorithm rtn, not smoothquant"):
        parse(small_recipe_doc(tmp_path, small_model, scheme={"algorithm": "smoothquant", "preset": "nvfp4"}))
    doc = small_recipe_doc(tmp_path, small_model, scheme={"algorithm": "rtn", "preset": "nvfp4"})
    doc["export"] = [{"format": "gptq", "output": str(tmp_path / "x")}]
    with pytest.raises(LaminaError, match="format gptq cannot hold preset nvfp4"):
        make_plan(parse(doc))
    doc = small_recipe_doc(tmp_path, small_model, scheme={"algorithm": "rtn", "preset": "fp8"})
    doc.pop("calibration")
    with pytest.raises(
        LaminaError, match=r"calibration: required by the static activation scales of scheme\.preset fp8"
    ):
        make_plan(parse(doc))


def test_exporting_a_float_artifact_in_another_format_is_refused(artifacts, tmp_path):
    with pytest.raises(LaminaError, match="float format"):
        export(str(artifacts["fp8"]), "gptq", str(tmp_path / "g"), progress=False)
