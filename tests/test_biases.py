"""Biased linears survive quantization: a tiny random Qwen2 (whose q/k/v projections carry
a bias) quantized by the pipeline keeps each bias in the artifact bit for bit, the
artifact's eval path (BlockRunner, then its final norm and head) adds it, giving the
log-probs of the transformers model run with the dequantized weights, and the vptq
export carries it on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from algorithms import weight_from_tensors
from kernels.reference import dequantize
from pipeline.architectures import ARCHITECTURES
from storage.checkpoint import Checkpoint
from tests.conftest import MODEL, recipe_doc
from workers.block import STORED, BlockRunner, stored_format

BIASED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
SCHEMES = {
    "gptq": {"algorithm": "gptq", "bits": 4, "group_size": 32, "sym": True},
    "vptq": {"algorithm": "vptq", "vptq": {"vector_len": 4, "num_centroids": 16, "kmeans_iters": 2}},
}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    """A 2-block Qwen2 of random weights and biases (transformers initialises biases to
    zero, so they are drawn here), with the fixture model's tokenizer."""
    out = tmp_path_factory.mktemp("qwen2")
    vocab = json.loads((MODEL / "config.json").read_text())["vocab_size"]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in BIASED:
                layer.get_submodule(linear).bias.normal_(0, 0.5)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / name, out / name)
    return out


def tensors_of(uri: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read straight from its safetensors shards."""
    out = {}
    for file in sorted(set(Checkpoint(uri).weight_map.values())):
        with safe_open(Path(uri) / file, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return out


def assert_biases_kept(source: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], marker: str) -> None:
    """Each quantized q/k/v projection (stored with `marker`) has its source bias, exactly."""
    names = [f"model.layers.{i}.{linear}" for i in range(2) for linear in BIASED]
    assert all(f"{n}.{marker}" in tensors and f"{n}.weight" not in tensors for n in names)
    assert [n for n in names if f"{n}.bias" not in tensors] == [], "biases dropped"
    for n in names:
        assert torch.equal(tensors[f"{n}.bias"], source[f"{n}.bias"]), n


def dequantized_model(source: Path, artifact: str) -> torch.nn.Module:
    """The source model in transformers with each quantized linear's weight replaced by
    the artifact's, dequantized; its biases are the source's."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    checkpoint = Checkpoint(artifact)
    fmt = stored_format(checkpoint.config["quantization_config"])
    stored = checkpoint.read(checkpoint.names("model.layers."))
    linears = {n.rpartition(".")[0] for n in stored if n.endswith((".qweight", ".indices"))}
    assert len(linears) == 2 * 7
    with torch.no_grad():
        for linear in linears:
            parts = {s: stored[f"{linear}.{s}"] for s in STORED if f"{linear}.{s}" in stored}
            model.get_submodule(linear).weight.copy_(dequantize(weight_from_tensors(parts, fmt)))
    return model


def artifact_nll(artifact: str, ids: np.ndarray) -> torch.Tensor:
    """Per-token NLL of one sequence [T] through the artifact's eval path: [T-1]."""
    runner = BlockRunner(model_uri=artifact, layout=ARCHITECTURES["qwen2"], threads=1)
    runner.set_inputs({0: ids[None]})
    for i in range(2):
        runner.load_block(i)
        runner.forward()
    return torch.from_numpy(runner.score()[0]["nll"]).float()


@pytest.mark.parametrize("algorithm", sorted(SCHEMES))
def test_quantized_linears_keep_their_biases(tmp_path, ray_cluster, qwen2, docs_dir, algorithm) -> None:
    from pipeline.driver import quantize
    from pipeline.export import export
    from pipeline.recipe import parse

    doc = recipe_doc(
        tmp_path,
        model=str(qwen2),
        calibration={"samples": 4, "seq_len": 64, "chunk_size": 2},
        scheme=SCHEMES[algorithm],
        resources={"workers": 1},
    )
    doc.pop("eval")
    artifact = quantize(parse(doc), progress=False).output
    source = tensors_of(str(qwen2))
    marker = "qweight" if algorithm == "gptq" else "indices"
    assert_biases_kept(source, tensors_of(artifact), marker)

    ids = np.random.default_rng(0).integers(0, source["model.embed_tokens.weight"].shape[0], 48)  # [T]
    with torch.no_grad():
        logits = dequantized_model(qwen2, artifact)(torch.from_numpy(ids)[None]).logits[0]  # [T, vocab]
    expected = -torch.log_softmax(logits[:-1], -1).gather(1, torch.from_numpy(ids[1:])[:, None])[:, 0]  # [T-1]
    torch.testing.assert_close(artifact_nll(artifact, ids), expected, atol=1e-4, rtol=1e-4)

    if algorithm == "vptq":
        dest = str(tmp_path / "vptq-export")
        export(artifact, "vptq", dest, progress=False)
        assert_biases_kept(source, tensors_of(dest), "indices")
        layers = json.loads((Path(dest) / "config.json").read_text())["quantization_config"]["config_for_layers"]
        assert {name for name, layer in layers.items() if layer["bias"]} == {
            f"model.layers.{i}.{linear}" for i in range(2) for linear in BIASED
        }
