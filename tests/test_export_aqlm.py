"""The `aqlm` export (AQLM's Hugging Face format) of codebook artifacts, read back by the
`aqlm` package's own dequantizer and loaded by transformers, against lamina's `decode`.

The native artifacts here are written by hand (the fixture model cut to 2 blocks, random
codes and codebooks), not by the quantize pipeline: the export only needs their layout.

What runs on CPU (aqlm 1.1.7, inference_kernels/kernel_selector.py): a codebook of 256
entries (1x8, 2x8) with out_group_size 1 selects `numba_kernel.numba_gemm_lut`, which
needs numba (not installed here); every other CPU case, 1x16 among them, selects
`dequantization.dequantize_gemm`, pure torch (`_dequantize_weight`, then `F.linear`). So
the transformers forward runs on the 1x16 export; the 2x8 export is checked through
aqlm's dequantizer on the loaded modules' parameters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from aqlm import QuantizedLinear
from aqlm.utils import _dequantize_weight, unpack_int_data
from safetensors.torch import load_file

from algorithms.codebook import CodebookScheme, CodebookWeight, decode, store_codes
from algorithms.formats import aqlm_tensors
from algorithms.rtn import rtn
from algorithms.types import UniformScheme
from pipeline.architectures import layout_for
from pipeline.cli import main
from pipeline.errors import LaminaError
from pipeline.export import export
from scripts.resize_model import resize_model
from storage.fs import open_location
from storage.manifest import MANIFEST, read_manifest, verify, write_manifest
from storage.writer import put_bytes, put_json, put_tensors
from tests.conftest import MODEL

SCHEMES = {
    "1x16": CodebookScheme(num_codebooks=1, nbits_per_codebook=16, in_group_size=8),
    "2x8": CodebookScheme(num_codebooks=2, nbits_per_codebook=8, in_group_size=8),
}
BLOCKS = 2
KEPT = ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj")  # left in full precision


def random_weight(scheme: CodebookScheme, out: int, n: int, *, seed: int, spread: float = 1.0) -> CodebookWeight:
    """Random codes in [0, K) and codebooks; each row's scale gives it about `spread` std."""
    gen = torch.Generator().manual_seed(seed)
    M, K, g = scheme.num_codebooks, scheme.codebook_size, scheme.in_group_size
    codes = torch.randint(0, K, (out, scheme.groups(n), M), generator=gen)  # [out, in/g, M]
    books = torch.randn(M, K, 1, g, generator=gen)  # [M, K, 1, g]
    scales = spread / M**0.5 * (0.5 + torch.rand(out, 1, 1, 1, generator=gen))  # [out, 1, 1, 1]
    return CodebookWeight(
        codes=store_codes(codes, scheme.nbits_per_codebook), codebooks=books.half(), scales=scales.half()
    )


def aqlm_decode(cw: CodebookWeight, dtype: torch.dtype) -> torch.Tensor:
    """aqlm's own dequantization (the one its pure-torch kernel runs), in `dtype`."""
    codes = unpack_int_data(cw.codes, cw.scheme.nbits_per_codebook)
    return _dequantize_weight(codes, cw.codebooks.to(dtype), cw.scales.to(dtype))


@pytest.mark.parametrize("name", SCHEMES)
def test_aqlm_dequantizes_our_tensors_to_our_weights(name) -> None:
    """In fp32 aqlm's dequantizer gives exactly `decode`. On the stored fp16 it sums the
    codewords and scales in fp16: exactly `decode(cw, float16)`, which for one codebook is
    `decode` rounded to fp16, and for two is within 1 fp16 ulp of it (rounded twice)."""
    scheme = SCHEMES[name]
    cw = random_weight(scheme, 96, 128, seed=1)
    tensors = aqlm_tensors(cw)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()} == {
        "codes": (torch.int16 if name == "1x16" else torch.int8, (96, 16, scheme.num_codebooks)),
        "codebooks": (torch.float16, (scheme.num_codebooks, scheme.codebook_size, 1, 8)),
        "scales": (torch.float16, (96, 1, 1, 1)),
    }
    assert all(torch.equal(tensors[k], v) for k, v in cw.tensors().items())
    exported = CodebookWeight.from_tensors(tensors)
    assert torch.equal(aqlm_decode(exported, torch.float32), decode(cw))
    half = aqlm_decode(exported, torch.float16)
    assert torch.equal(half, decode(cw, torch.float16))
    ulps = (half.view(torch.int16).int() - decode(cw).half().view(torch.int16).int()).abs().max()
    assert ulps == (0 if scheme.num_codebooks == 1 else 1)


def test_aqlm_tensors_refuse_what_the_layout_cannot_hold() -> None:
    cw = random_weight(SCHEMES["2x8"], 16, 32, seed=2)
    with pytest.raises(ValueError, match=r"codes: expected torch.int8 \[16, 4, 2\], got torch.int16"):
        aqlm_tensors(CodebookWeight(codes=cw.codes.to(torch.int16), codebooks=cw.codebooks, scales=cw.scales))
    with pytest.raises(ValueError, match=r"scales: expected torch.float16 \[16, 1, 1, 1\], got torch.float32"):
        aqlm_tensors(CodebookWeight(codes=cw.codes, codebooks=cw.codebooks, scales=cw.scales.float()))
    with pytest.raises(ValueError, match="codebooks: expected"):  # out_group_size 2
        aqlm_tensors(CodebookWeight(codes=cw.codes, codebooks=cw.codebooks.reshape(2, 256, 2, 4), scales=cw.scales))


# ---- artifacts written by hand ----------------------------------------------------------


def write_native(dest: Path, model: Path, qc: dict, quantize: Callable[[str, torch.Tensor], dict]) -> str:
    """A published native artifact of `model` as the driver lays it out (a shard per block,
    one for the other tensors, config.json with `qc`, the index, side files, the manifest
    last), each block linear's weight replaced by quantize(name, W) unless it is in KEPT."""
    config = json.loads((model / "config.json").read_text())
    layout = layout_for(config)
    source = load_file(model / "model.safetensors")
    location = open_location(str(dest))
    shards, weight_map, records = BLOCKS + 1, {}, []
    for i in range(shards):
        block = layout.block(i) if i < BLOCKS else None  # the last shard: the tensors outside the blocks
        tensors = {n: t for n, t in source.items() if (n.startswith(block) if block else ".layers." not in n)}
        for linear in (f"{block}{lin}" for lin in layout.linears if block):
            if linear not in KEPT:
                W = tensors.pop(f"{linear}.weight")
                tensors.update({f"{linear}.{s}": t for s, t in quantize(linear, W).items()})
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        records.append(put_tensors(location.uri, file, tensors))
        weight_map.update(dict.fromkeys(tensors, file))
    records.append(put_json(location, "config.json", {**config, "quantization_config": qc}))
    records.append(put_json(location, "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map}))
    records += [put_bytes(location, f.name, f.read_bytes()) for f in model.glob("tokenizer*")]
    write_manifest(location, records, recipe_hash=f"hand-written:{qc['format']}")
    return location.uri


@pytest.fixture(scope="module")
def two_blocks(tmp_path_factory) -> Path:
    return resize_model(MODEL, tmp_path_factory.mktemp("two-blocks"), BLOCKS)


@pytest.fixture(scope="module")
def weights(two_blocks) -> dict[str, dict[str, CodebookWeight]]:
    """{scheme: {linear: CodebookWeight}} for the quantized linears: random, with rows of
    about the spread of the fixture's (std 0.05), so that the logits stay finite."""
    source = load_file(two_blocks / "model.safetensors")
    shapes = {n.removesuffix(".weight"): t.shape for n, t in source.items() if n.endswith("_proj.weight")}
    linears = sorted(set(shapes) - set(KEPT))
    return {
        name: {lin: random_weight(scheme, *shapes[lin], seed=seed, spread=0.05) for seed, lin in enumerate(linears)}
        for name, scheme in SCHEMES.items()
    }


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, two_blocks, weights) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("aqlm")
    out = {}
    for name, scheme in SCHEMES.items():
        qc = {
            "quant_method": "lamina",
            "format": "codebook",
            "algorithm": "aqlm",
            "num_codebooks": scheme.num_codebooks,
            "nbits_per_codebook": scheme.nbits_per_codebook,
            "in_group_size": scheme.in_group_size,
            "out_group_size": 1,
            "recipe_hash": "hand-written",
        }
        ours = weights[name]
        out[name] = write_native(tmp / name, two_blocks, qc, lambda linear, W, ours=ours: ours[linear].tensors())
    uniform = UniformScheme(bits=4, group_size=64)
    qc = {"quant_method": "lamina", "format": "uniform", "algorithm": "rtn", "bits": 4, "group_size": 64, "sym": True}
    out["uniform"] = write_native(tmp / "uniform", two_blocks, qc, lambda linear, W: rtn(W, uniform).tensors())
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, artifacts) -> dict[str, str]:
    """Each codebook artifact exported through the CLI."""
    tmp = tmp_path_factory.mktemp("aqlm-export")
    for name in SCHEMES:
        assert main(["-q", "export", artifacts[name], "--format", "aqlm", str(tmp / name)]) == 0
    return {name: str(tmp / name) for name in SCHEMES}


def test_export_is_published_with_aqlms_config(exports, artifacts) -> None:
    for name, scheme in SCHEMES.items():
        config = json.loads((Path(exports[name]) / "config.json").read_text())
        modules = ["lm_head", *KEPT]
        assert config["quantization_config"] == {
            "quant_method": "aqlm",
            "nbits_per_codebook": scheme.nbits_per_codebook,
            "num_codebooks": scheme.num_codebooks,
            "in_group_size": 8,
            "out_group_size": 1,
            "linear_weights_not_to_quantize": [*(f"{m}.weight" for m in modules), *modules],
        }
        assert read_manifest(exports[name])["export"] == {"format": "aqlm", "from": artifacts[name]}
        assert verify(exports[name]) == []


def load_aqlm(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def check_modules(model, ours: dict[str, CodebookWeight], source: dict[str, torch.Tensor]) -> None:
    """Every quantized linear an aqlm QuantizedLinear holding our tensors, the rest nn.Linear."""
    for linear, cw in ours.items():
        module = model.get_submodule(linear)
        assert isinstance(module, QuantizedLinear), linear
        assert torch.equal(module.codes, cw.codes), linear
        assert module.codebooks.dtype == module.scales.dtype == torch.float32  # loaded in the model's dtype
        assert torch.equal(module.codebooks, cw.codebooks.float()) and torch.equal(module.scales, cw.scales.float())
    for linear in KEPT:
        module = model.get_submodule(linear)
        assert type(module) is torch.nn.Linear and torch.equal(module.weight, source[f"{linear}.weight"]), linear
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_transformers_runs_the_1x16_export_as_our_decoded_weights(exports, weights, two_blocks) -> None:
    """aqlm's QuantizedLinear forward (pure torch on CPU for 1x16) gives exactly the logits
    of the fixture model whose linears hold `decode(cw)`."""
    from transformers import AutoModelForCausalLM

    ours, source = weights["1x16"], load_file(two_blocks / "model.safetensors")
    model = load_aqlm(exports["1x16"])
    check_modules(model, ours, source)
    reference = AutoModelForCausalLM.from_pretrained(two_blocks, dtype=torch.float32).eval()
    for linear, cw in ours.items():
        reference.get_submodule(linear).weight.data = decode(cw)
    tokens = torch.tensor([[1, 504, 3458, 282, 4667, 314, 253, 1345]])
    with torch.no_grad():
        logits, expected = model(tokens).logits, reference(tokens).logits
    assert torch.isfinite(expected).all() and torch.equal(logits, expected)


def test_transformers_loads_the_2x8_export_to_our_decoded_weights(exports, weights, two_blocks) -> None:
    """2x8 on CPU would run aqlm's numba kernel: its dequantizer stands in for the forward."""
    ours, source = weights["2x8"], load_file(two_blocks / "model.safetensors")
    model = load_aqlm(exports["2x8"])
    check_modules(model, ours, source)
    for linear, cw in ours.items():
        module = model.get_submodule(linear)
        W = _dequantize_weight(unpack_int_data(module.codes, 8), module.codebooks, module.scales)
        assert torch.equal(W, decode(cw)), linear


@pytest.mark.parametrize(
    ("artifact", "fmt", "needle"),
    [
        ("1x16", "gptq", "of the codebook format, which the gptq format cannot hold; export it as aqlm"),
        ("2x8", "compressed-tensors", "which the compressed-tensors format cannot hold; export it as aqlm"),
        ("uniform", "aqlm", "of the uniform format, which the aqlm format cannot hold; export it as gptq or compr"),
    ],
)
def test_a_format_that_does_not_fit_the_artifact_is_refused(artifacts, tmp_path, capsys, artifact, fmt, needle):
    dest = tmp_path / "export"
    assert main(["-q", "export", artifacts[artifact], "--format", fmt, str(dest)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lamina: error: ") and needle in lines[0], lines
    assert not dest.exists()


def test_a_linear_of_another_scheme_is_refused_before_anything_is_written(tmp_path, two_blocks) -> None:
    """AQLM's config names one scheme for the model; the headers show the odd linear."""
    odd = "model.layers.1.mlp.up_proj"
    qc = {"quant_method": "lamina", "format": "codebook", "algorithm": "aqlm", "num_codebooks": 2}
    qc |= {"nbits_per_codebook": 8, "in_group_size": 8, "out_group_size": 1}

    def quantize(linear: str, W: torch.Tensor) -> dict:
        scheme = SCHEMES["1x16" if linear == odd else "2x8"]
        return random_weight(scheme, *W.shape, seed=0).tensors()

    artifact = write_native(tmp_path / "mixed", two_blocks, qc, quantize)
    assert (Path(artifact) / MANIFEST).exists()
    dest = tmp_path / "export"
    with pytest.raises(LaminaError, match=rf"{odd}: codes I16 \[1536, 72, 1\], .* not of the artifact's scheme 2x8 g8"):
        export(artifact, "aqlm", str(dest), progress=False)
    assert not dest.exists()
